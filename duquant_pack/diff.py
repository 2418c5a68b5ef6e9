"""Compare two packs (typically two configurations of one checkpoint): "is B better than A, and where".

    d = diff_packs("packs/block64", "packs/block32", ckpt="ckpt_dir")
    print(format_diff(d))          # one screen: verdict, per-group table, config changes, top layers
    json.dumps(d)                  # everything, every layer

Per common layer: permutation identical or the fraction of positions that differ; rotations
identical or max |R_A - R_B| after sign canonicalization (each column flipped so that its
largest-magnitude entry is positive; blocks of different sizes are reported as such, since no
blockwise distance is meaningful then); relative change of the weight scales ||s_A - s_B|| / ||s_A||.

With a checkpoint, each pack's weight reconstruction error is recomputed from the weights
(`quality.layer_error`, checked against each layer's weight fingerprint) and the packs are
compared per layer and per group (Frobenius-weighted: sqrt(sum err_i^2 |W_i|^2 / sum |W_i|^2)).
Without one, the errors recorded in the manifests' `stats` are used when both packs have them
(`errors_source` says which).
"""

from __future__ import annotations

import math

import torch

from duquant_runtime.errors import DuquantError
from duquant_runtime.fingerprint import weight_fingerprint
from duquant_runtime.pack import LayerPack, Pack, load_pack

from .checkpoint import Checkpoint, natural_key
from .groups import GROUPS, layer_group
from .quality import layer_error

TOP_LAYERS = 10
_TIE_RTOL = 1e-9  # relative difference under which two errors are a tie


def _as_pack(p) -> Pack:
    return p if isinstance(p, Pack) else load_pack(p)


def _as_ckpt(c) -> Checkpoint | None:
    if c is None or isinstance(c, Checkpoint):
        return c
    return Checkpoint(c)


def canonical_signs(r: torch.Tensor) -> torch.Tensor:
    """Blocks (nb, B, B) with each column multiplied by the sign of its largest-magnitude entry."""
    r = r.to(torch.float64)
    idx = r.abs().argmax(dim=1, keepdim=True)  # (nb, 1, B): row of each column's largest |entry|
    sign = torch.sign(torch.gather(r, 1, idx))
    sign[sign == 0] = 1.0
    return r * sign


def _compare_perm(a: LayerPack, b: LayerPack) -> dict:
    if a.perm is None and b.perm is None:
        return {"status": "identical", "frac_differ": 0.0, "a": "none", "b": "none"}
    n = a.in_features
    ident = torch.arange(n, dtype=torch.int64)
    pa = a.perm if a.perm is not None else ident
    pb = b.perm if b.perm is not None else ident
    frac = float((pa != pb).to(torch.float64).mean())
    return {"status": "identical" if frac == 0.0 else "differ", "frac_differ": frac,
            "a": "none" if a.perm is None else "perm", "b": "none" if b.perm is None else "perm"}


def _compare_rot(ra: torch.Tensor | None, rb: torch.Tensor | None, ba: int | None, bb: int | None) -> dict:
    out = {"block_a": ba, "block_b": bb, "max_abs_diff": None}
    if ra is None and rb is None:
        return {**out, "status": "none"}
    if ra is None or rb is None:
        return {**out, "status": "only in A" if rb is None else "only in B"}
    if ba != bb:
        return {**out, "status": "different block sizes"}
    if torch.equal(ra, rb):
        return {**out, "status": "identical", "max_abs_diff": 0.0}
    diff = float((canonical_signs(ra) - canonical_signs(rb)).abs().max())
    return {**out, "status": "differ", "max_abs_diff": diff}


def _compare_scales(a: LayerPack, b: LayerPack) -> float | None:
    if a.weight_scale is None or b.weight_scale is None:
        return None
    sa, sb = a.weight_scale.to(torch.float64), b.weight_scale.to(torch.float64)
    na = float(torch.linalg.vector_norm(sa))
    return float(torch.linalg.vector_norm(sa - sb)) / na if na > 0 else None


def _winner(ea: float, eb: float) -> str:
    if abs(ea - eb) <= _TIE_RTOL * max(abs(ea), abs(eb)):
        return "tie"
    return "b" if eb < ea else "a"


def _fro_weighted(pairs: list[tuple[float, float]]) -> float | None:
    """sqrt(sum err^2 fro^2 / sum fro^2) over (err, fro) pairs."""
    n2 = sum(f * f for _, f in pairs)
    return math.sqrt(sum((e * f) ** 2 for e, f in pairs) / n2) if n2 > 0 else None


def _pack_info(p: Pack) -> dict:
    m = p.manifest
    return {"path": str(p.path), "config_hash": m["config_hash"], "preset": m.get("preset"),
            "layers": len(m["layers"]), "checkpoint": m["checkpoint"]["sha256"]}


def _stats_errors(ea: dict, eb: dict) -> dict | None:
    """Errors recorded in two manifest entries, when both carry them (quantized layers)."""
    sa, sb = ea.get("stats") or {}, eb.get("stats") or {}
    if not ({"w_rel_err", "w_fro"} <= sa.keys() and {"w_rel_err", "w_fro"} <= sb.keys()):
        return None
    return {"a": sa["w_rel_err"], "b": sb["w_rel_err"], "rtn_a": sa.get("rtn_rel_err"),
            "rtn_b": sb.get("rtn_rel_err"), "w_fro": sa["w_fro"]}


def diff_packs(pack_a, pack_b, ckpt=None) -> dict:
    """Everything that differs between packs A and B (Pack objects or directories); JSON-ready.

    Keys: ``a``, ``b`` (path, config_hash, preset, layers, checkpoint), ``same_checkpoint``,
    ``config_diff`` ({field: [a, b]}), ``only_in_a``, ``only_in_b``, ``layers`` (one dict per common
    layer, natural name order: perm, r_in, r_out, scale_rel_change, wbits, identical, errors, change),
    ``errors_source`` ("checkpoint", "manifest" or None), ``groups`` ({group: layers, err_a, err_b,
    rtn_a, rtn_b, a_wins, b_wins, ties}), ``summary`` (common, identical, a_wins, b_wins, ties,
    compared, err_a, err_b) and ``verdict`` (one line, or None without errors).
    ``ckpt`` (Checkpoint or path) recomputes the errors from the weights; a weight whose fingerprint
    differs from what either pack was built from raises DuquantError.
    """
    pa, pb = _as_pack(pack_a), _as_pack(pack_b)
    ck = _as_ckpt(ckpt)
    ca, cb = pa.config, pb.config
    config_diff = {k: [ca.get(k), cb.get(k)] for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
    names_a, names_b = set(pa.layer_names), set(pb.layer_names)
    common = sorted(names_a & names_b, key=natural_key)
    warnings = []
    info_a, info_b = _pack_info(pa), _pack_info(pb)
    if info_a["checkpoint"] != info_b["checkpoint"]:
        warnings.append("the packs were built from different checkpoints")
    if ck is not None:
        ck_sha = ck.fingerprint()["sha256"]
        for tag, info in (("A", info_a), ("B", info_b)):
            if info["checkpoint"] != ck_sha:
                warnings.append(f"pack {tag} was built from a different checkpoint file set than {ck.path} "
                                "(layer weights are checked one by one)")

    layers = []
    use_stats = ck is None and all(_stats_errors(pa.entry(n), pb.entry(n)) is not None
                                   or (pa.entry(n)["wbits"] == 0 and pb.entry(n)["wbits"] == 0) for n in common)
    for name in common:
        la, lb = pa.layer(name), pb.layer(name)
        rec = {"name": name, "group": layer_group(name), "wbits": [la.wbits, lb.wbits]}
        if (la.out_features, la.in_features) != (lb.out_features, lb.in_features):
            rec.update(status="different shapes", shape_a=[la.out_features, la.in_features],
                       shape_b=[lb.out_features, lb.in_features], identical=False, change=math.inf)
            layers.append(rec)
            continue
        rec["perm"] = _compare_perm(la, lb)
        rec["r_in"] = _compare_rot(la.r_in, lb.r_in, la.block_in, lb.block_in)
        rec["r_out"] = _compare_rot(la.r_out, lb.r_out, la.block_out, lb.block_out)
        rec["scale_rel_change"] = _compare_scales(la, lb)
        rec["identical"] = (la.wbits == lb.wbits and rec["perm"]["status"] == "identical"
                            and rec["r_in"]["status"] == "identical" and rec["r_out"]["status"] in ("identical", "none")
                            and (rec["scale_rel_change"] == 0.0 or (la.weight_scale is None and lb.weight_scale is None)))
        errors = None
        if ck is not None:
            key = name + ".weight"
            if key not in ck.tensors:
                raise DuquantError(f"{ck.path}: has no tensor '{key}' (layer of both packs)")
            w = ck.read_weight(key)
            fp = weight_fingerprint(w)
            for tag, lp in (("A", la), ("B", lb)):
                if lp.meta["weight_fingerprint"] != fp:
                    raise DuquantError(f"layer '{name}': pack {tag} was built from a different weight than "
                                       f"{ck.path} holds; diff without --ckpt or pass the right checkpoint")
            qa, qb = layer_error(w, la, block_stats=False), layer_error(w, lb, block_stats=False)
            errors = {"a": qa["w_rel_err"], "b": qb["w_rel_err"], "rtn_a": qa["rtn_rel_err"],
                      "rtn_b": qb["rtn_rel_err"], "w_fro": qa["w_fro"]}
        elif use_stats:
            errors = _stats_errors(la.meta, lb.meta)
        if errors is not None:
            errors["winner"] = _winner(errors["a"], errors["b"])
            rec["errors"] = errors
            rec["change"] = abs(errors["b"] - errors["a"])
        else:
            rot = [r["max_abs_diff"] if r["status"] in ("differ", "identical") else
                   (0.0 if r["status"] == "none" else 1.0) for r in (rec["r_in"], rec["r_out"])]
            rec["change"] = (rec["scale_rel_change"] or 0.0) + rec["perm"]["frac_differ"] + max(rot)
        layers.append(rec)

    source = "checkpoint" if ck is not None else ("manifest" if use_stats and common else None)
    groups, summary, verdict = _summaries(layers, source)
    return {"a": info_a, "b": info_b, "same_checkpoint": info_a["checkpoint"] == info_b["checkpoint"],
            "config_diff": config_diff,
            "only_in_a": sorted(names_a - names_b, key=natural_key),
            "only_in_b": sorted(names_b - names_a, key=natural_key),
            "layers": layers, "errors_source": source, "groups": groups, "summary": summary,
            "verdict": verdict, "warnings": warnings}


def _summaries(layers: list[dict], source: str | None) -> tuple[dict, dict, str | None]:
    acc: dict[str, list[dict]] = {}
    for rec in layers:
        acc.setdefault(rec["group"], []).append(rec)
    order = [g for g in GROUPS if g in acc] + sorted(g for g in acc if g not in GROUPS)
    groups = {}
    for g in order:
        recs = acc[g]
        with_err = [r["errors"] for r in recs if "errors" in r]
        groups[g] = {"layers": len(recs), "identical": sum(1 for r in recs if r.get("identical")),
                     "compared": len(with_err),
                     "err_a": _fro_weighted([(e["a"], e["w_fro"]) for e in with_err]),
                     "err_b": _fro_weighted([(e["b"], e["w_fro"]) for e in with_err]),
                     "rtn_a": _fro_weighted([(e["rtn_a"], e["w_fro"]) for e in with_err if e["rtn_a"] is not None]),
                     "rtn_b": _fro_weighted([(e["rtn_b"], e["w_fro"]) for e in with_err if e["rtn_b"] is not None]),
                     "a_wins": sum(1 for e in with_err if e["winner"] == "a"),
                     "b_wins": sum(1 for e in with_err if e["winner"] == "b"),
                     "ties": sum(1 for e in with_err if e["winner"] == "tie")}
    all_err = [r["errors"] for r in layers if "errors" in r]
    summary = {"common": len(layers), "identical": sum(1 for r in layers if r.get("identical")),
               "compared": len(all_err),
               "a_wins": sum(1 for e in all_err if e["winner"] == "a"),
               "b_wins": sum(1 for e in all_err if e["winner"] == "b"),
               "ties": sum(1 for e in all_err if e["winner"] == "tie"),
               "err_a": _fro_weighted([(e["a"], e["w_fro"]) for e in all_err]),
               "err_b": _fro_weighted([(e["b"], e["w_fro"]) for e in all_err])}
    verdict = None
    if source is not None and all_err:
        parts = [f"{g} {v['err_a']:.4f} -> {v['err_b']:.4f}{_pct(v['err_a'], v['err_b'])}"
                 for g, v in groups.items() if v["err_a"] is not None]
        overall = f"; overall {summary['err_a']:.4f} -> {summary['err_b']:.4f}{_pct(summary['err_a'], summary['err_b'])}"
        verdict = (f"B better than A on {summary['b_wins']}/{summary['compared']} layers"
                   f" (A better on {summary['a_wins']}, ties {summary['ties']}); group errors A -> B: "
                   + ", ".join(parts) + overall)
    return groups, summary, verdict


def _pct(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return ""
    return f" ({100.0 * (b - a) / a:+.1f}%)"


def short_name(name: str) -> str:
    """'...language_model.layers.3.mlp.down_proj' -> 'layers.3.mlp.down_proj' (the group says the rest)."""
    i = name.rfind("layers.")
    s = name[i:] if i >= 0 else name
    return s if len(s) <= 44 else "..." + s[-41:]


def _fmt_err(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _fmt_rot(r: dict) -> str:
    st = r["status"]
    if st == "differ":
        return f"{r['max_abs_diff']:.3f}"
    if st == "identical":
        return "same"
    if st == "different block sizes":
        return f"B{r['block_a']}->{r['block_b']}"
    return {"none": "-", "only in A": "A only", "only in B": "B only"}[st]


def format_diff(d: dict, top: int = TOP_LAYERS) -> str:
    """One screen: verdict, per-group table, config differences, the `top` most-changed layers."""
    a, b = d["a"], d["b"]
    s = d["summary"]
    lines = [f"A: {a['path']}  ({a['preset'] or 'custom'}, {a['config_hash'][:19]}, {a['layers']} layers)",
             f"B: {b['path']}  ({b['preset'] or 'custom'}, {b['config_hash'][:19]}, {b['layers']} layers)"]
    if d["verdict"] is not None:
        src = "" if d["errors_source"] == "checkpoint" else "  [errors from the manifests' stats; pass --ckpt to recompute]"
        lines.insert(0, "VERDICT: " + d["verdict"] + src)
    else:
        lines.insert(0, "VERDICT: no weight errors to compare (pass --ckpt)")
    for w in d["warnings"]:
        lines.append(f"warning: {w}")
    lines.append("")
    has_err = any(g["compared"] for g in d["groups"].values())
    if has_err:
        lines.append(f"{'group':<16}{'layers':>7}{'err A':>9}{'err B':>9}{'change':>9}{'A wins':>8}{'B wins':>8}"
                     f"{'ties':>6}{'RTN A':>9}{'RTN B':>9}")
        for g, v in d["groups"].items():
            ch = _pct(v["err_a"], v["err_b"]).strip(" ()") or "-"
            lines.append(f"{g:<16}{v['layers']:>7}{_fmt_err(v['err_a']):>9}{_fmt_err(v['err_b']):>9}{ch:>9}"
                         f"{v['a_wins']:>8}{v['b_wins']:>8}{v['ties']:>6}{_fmt_err(v['rtn_a']):>9}{_fmt_err(v['rtn_b']):>9}")
    else:
        lines.append(f"{'group':<16}{'layers':>7}{'identical':>11}")
        for g, v in d["groups"].items():
            lines.append(f"{g:<16}{v['layers']:>7}{v['identical']:>11}")
    lines.append("")
    if d["config_diff"]:
        lines.append("config A -> B: " + "; ".join(f"{k}: {_short(v[0])} -> {_short(v[1])}"
                                                   for k, v in d["config_diff"].items()))
    else:
        lines.append("config: identical")
    lines.append(f"layers: {s['common']} common ({s['identical']} with identical transforms and scales), "
                 f"{len(d['only_in_a'])} only in A, {len(d['only_in_b'])} only in B")
    for tag, names in (("only in A", d["only_in_a"]), ("only in B", d["only_in_b"])):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            lines.append(f"  {tag}: " + ", ".join(names[:3]) + more)
    changed = [r for r in d["layers"] if not r.get("identical")]
    if changed:
        changed.sort(key=lambda r: (-r["change"], natural_key(r["name"])))
        shown = changed[:top]
        by = "|err B - err A|" if has_err else "transform/scale change"
        lines.append("")
        lines.append(f"most-changed layers (top {len(shown)} of {len(changed)} that differ, by {by}):")
        lines.append(f"{'layer':<46}{'group':<15}{'perm':>6}{'r_in':>9}{'r_out':>9}{'scales':>8}"
                     + (f"{'err A':>8}{'err B':>8}  win" if has_err else ""))
        for r in shown:
            if "perm" not in r:
                lines.append(f"{short_name(r['name']):<46}{r['group'][:14]:<15}  {r['status']}")
                continue
            perm = "same" if r["perm"]["status"] == "identical" else f"{r['perm']['frac_differ']:.0%}"
            sc = "-" if r["scale_rel_change"] is None else f"{r['scale_rel_change']:.3f}"
            row = (f"{short_name(r['name']):<46}{r['group'][:14]:<15}{perm:>6}{_fmt_rot(r['r_in']):>9}"
                   f"{_fmt_rot(r['r_out']):>9}{sc:>8}")
            if "errors" in r:
                e = r["errors"]
                row += f"{e['a']:>8.4f}{e['b']:>8.4f}  {e['winner'].upper() if e['winner'] != 'tie' else 'tie'}"
            lines.append(row)
    return "\n".join(lines)


def _short(v) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 40 else s[:37] + "..."


__all__ = ["diff_packs", "format_diff", "canonical_signs", "short_name"]
