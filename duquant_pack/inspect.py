"""`duquant-pack inspect`: what a pack holds, read from its manifest and the files' sizes.

    info = inspect_pack("packs/pi05-w4a8")   # JSON-serialisable dict (the --json output)
    print(format_inspect(info))              # the readable table

Only the manifest is read and validated (`load_pack`); layer files are not opened, only their
sizes are taken (a missing file counts 0 bytes and is counted in ``bytes.missing_files``). Use
`duquant_pack.verify.verify_pack` to check the files' contents.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from duquant_runtime.format import MANIFEST
from duquant_runtime.pack import load_pack

from .formatting import fmt_bytes, fmt_n
from .groups import GROUPS, group_summary


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def inspect_pack(pack_dir) -> dict:
    """Summary of the pack at `pack_dir`; raises `PackError` when its manifest is missing or invalid.

    Keys: ``pack`` (path), ``format``, ``format_version``, ``tool`` ({name, version,
    algorithm_version}), ``preset``, ``config`` (the full resolved config), ``config_hash``,
    ``checkpoint`` (the manifest's fingerprint: sha256 and files), ``layers`` (count),
    ``weights`` (sum of out*in over layers), ``groups`` ({group: {layers, weights, w_rel_err,
    rtn_rel_err}} for the groups present, in `GROUPS` order; errors are None for groups without
    quantized layers), ``bits_blocks`` (list of {wbits, block_in, block_out, layers}, one per
    distinct combination, sorted), ``quantized`` (layers with wbits > 0), ``permuted`` (layers
    with a permutation), ``input_groups`` / ``input_group_layers`` (groups sharing one input
    transform, build --share-inputs, and their member count), ``calibration`` (bool), ``calibration_info`` (the manifest's
    calibration object or None), ``bytes`` ({manifest, layers, calibration, total,
    manifest_layer_bytes, missing_files}; sizes on disk, total = manifest + layers + calibration).
    """
    pack = load_pack(pack_dir)
    m = pack.manifest
    entries = m["layers"]
    tool = m["tool"]
    combos = Counter((e["wbits"], e["block_in"], e["block_out"]) for e in entries)
    bits_blocks = [{"wbits": w, "block_in": bi, "block_out": bo, "layers": n}
                   for (w, bi, bo), n in sorted(combos.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0))]
    missing = 0
    layer_bytes = 0
    for e in entries:
        s = _size(pack.path / e["file"])
        if s is None:
            missing += 1
        else:
            layer_bytes += s
    cal = m.get("calibration")
    cal_bytes = 0
    if cal is not None:
        s = _size(pack.path / cal["file"])
        if s is None:
            missing += 1
        else:
            cal_bytes = s
    manifest_bytes = _size(pack.path / MANIFEST) or 0
    groups = group_summary(entries)
    return {
        "pack": str(pack.path),
        "format": m["format"],
        "format_version": m["format_version"],
        "tool": {"name": tool.get("name"), "version": tool.get("version"),
                 "algorithm_version": tool.get("algorithm_version")},
        "preset": m["preset"],
        "config": m["config"],
        "config_hash": m["config_hash"],
        "checkpoint": m["checkpoint"],
        "layers": len(entries),
        "weights": sum(e["in_features"] * e["out_features"] for e in entries),
        "groups": {g: groups[g] for g in GROUPS if g in groups},
        "bits_blocks": bits_blocks,
        "quantized": sum(1 for e in entries if e["wbits"] > 0),
        "permuted": sum(1 for e in entries if e["permuted"]),
        "input_groups": len({tuple(e["input_group"]) for e in entries if "input_group" in e}),
        "input_group_layers": sum(1 for e in entries if "input_group" in e),
        "calibration": cal is not None,
        "calibration_info": cal,
        "bytes": {"manifest": manifest_bytes, "layers": layer_bytes, "calibration": cal_bytes,
                  "total": manifest_bytes + layer_bytes + cal_bytes,
                  "manifest_layer_bytes": m["totals"].get("layer_bytes"), "missing_files": missing},
    }


def _fmt_val(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return repr(v) if v == "" or " " in v else v
    if isinstance(v, dict):
        return ", ".join(f"{k}:{x}" for k, x in v.items()) if v else "{}"
    if isinstance(v, list):
        return ",".join(map(str, v)) if v else "[]"
    return str(v)


def format_inspect(info: dict) -> str:
    """The readable multi-line table of an `inspect_pack` result (no trailing newline)."""
    t = info["tool"]
    ck = info["checkpoint"]
    b = info["bytes"]
    files = ck.get("files") or []
    ck_files = ", ".join(f"{f.get('name')} ({fmt_bytes(f.get('size', 0))})" for f in files[:3])
    if len(files) > 3:
        ck_files += f", ... ({len(files)} files)"
    lines = [
        f"pack         {info['pack']}",
        f"format       {info['format']} v{info['format_version']}",
        f"tool         {t['name']} {t['version']} (algorithm {t['algorithm_version']})",
        f"preset       {info['preset'] if info['preset'] is not None else '-'}",
        f"config hash  {info['config_hash']}",
        f"checkpoint   sha256 {ck.get('sha256')}",
        f"             {ck_files}",
        f"layers       {info['layers']} ({info['quantized']} quantized, {info['permuted']} permuted), "
        f"{info['weights']:,} weights",
    ]
    if info["input_groups"]:
        lines.append(f"input groups {info['input_groups']} ({info['input_group_layers']} layers share one input "
                     "transform per group)")
    cal = info["calibration_info"]
    if cal is None:
        lines.append("calibration  none")
    else:
        lines.append(f"calibration  {cal['layers']} layers, abits {cal['abits']}, {cal['act_mode']}, "
                     f"percentile {cal['act_percentile']}, {cal['calib_steps']} steps")
    size = (f"size         {fmt_bytes(b['total'])} (manifest {fmt_bytes(b['manifest'])}, "
            f"layers {fmt_bytes(b['layers'])}, calibration {fmt_bytes(b['calibration'])})")
    lines.append(size)
    if b["missing_files"]:
        lines.append(f"             {b['missing_files']} referenced file(s) missing (run verify)")
    lines.append("")
    lines.append("config")
    width = max((len(k) for k in info["config"]), default=0)
    for k in sorted(info["config"]):
        lines.append(f"  {k:<{width}}  {_fmt_val(info['config'][k])}")
    lines.append("")
    lines.append(f"{'group':<16} {'layers':>6} {'weights':>9}  {'W err pack':>10}  {'W err RTN':>9}")
    for name, g in info["groups"].items():
        we = f"{g['w_rel_err']:.4f}" if g["w_rel_err"] is not None else "-"
        re_ = f"{g['rtn_rel_err']:.4f}" if g["rtn_rel_err"] is not None else "-"
        lines.append(f"{name:<16} {g['layers']:>6} {fmt_n(g['weights']):>9}  {we:>10}  {re_:>9}")
    lines.append("")
    lines.append(f"{'wbits':>5} {'block_in':>8} {'block_out':>9} {'layers':>6}")
    for c in info["bits_blocks"]:
        bits = str(c["wbits"]) if c["wbits"] else "off"
        bo = str(c["block_out"]) if c["block_out"] is not None else "-"
        lines.append(f"{bits:>5} {c['block_in']:>8} {bo:>9} {c['layers']:>6}")
    return "\n".join(lines)


__all__ = ["inspect_pack", "format_inspect"]
