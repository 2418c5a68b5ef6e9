"""The pack format, version 2 (reads 1 and 2): names, schema checks and hashing (read side; docs/format.md).

A pack is a directory::

    manifest.json                 the commit point: written last, atomically
    layers/<name>.<key16>.h5      one HDF5 file per layer (datasets below), referenced by the manifest
    calibration/act_scales.<sha16>.h5   optional: saved static activation scales (manifest "calibration")

Layer file datasets (float32 unless said): ``r_in`` (nb_in, B_in, B_in); optional ``perm``
int32 (in,) (absent: identity); optional ``r_out`` (nb_out, B_out, B_out) (absent: no output
rotation); optional ``weight_scale`` (out,) or (out, n_groups) (absent: weight not quantized);
version 2 adds optional ``smooth`` float32 (in,) (SmoothQuant divisor applied to x before the
permutation) and optional ``qweight`` (stored quantized weight of W_t; layout in `quant.pack_int4`:
uint8 (out, ceil(in/2)) for wbits <= 4, int8 (out, in) for 5..8, int16 (out, in) above).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from .errors import PackError

FORMAT_NAME = "duquant-pack"
FORMAT_VERSION = 2  # written by this version
SUPPORTED_VERSIONS = (1, 2)
LAYER_FORMAT_NAME = "duquant-layer"
MANIFEST = "manifest.json"
PENDING_NAME = ".pending.json"  # identity of an unfinished build in a pack directory
LAYERS_DIR = "layers"
CALIBRATION_DIR = "calibration"
CALIBRATION_FORMAT_NAME = "duquant-calibration"
CALIBRATION_FORMAT_VERSION = 1
ORTHO_TOL = 1e-5
LAYER_DATASETS = {"perm", "r_in", "r_out", "weight_scale", "smooth", "qweight"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CALIBRATION_FIELDS = {
    "file": str, "sha256": str, "layers": int, "act_percentile": (int, float), "calib_steps": int,
    "abits": int, "act_mode": str,
}


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text (sorted keys, no spaces) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of a resolved build config, as ``'sha256:<hex>'``."""
    return "sha256:" + hashlib.sha256(canonical_json(config).encode()).hexdigest()


def file_sha256(path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_LAYER_FIELDS = {
    "name": str, "file": str, "sha256": str, "in_features": int, "out_features": int,
    "wbits": int, "block_in": int, "block_out": (int, type(None)), "permuted": bool,
    "weight_fingerprint": str, "layer_key": str, "source_dtype": str, "stats": dict,
}
# version 2: "qweight" true when the file stores the integers; "smoothed" true when it holds `smooth`;
# "group_size" (int >= 1) when weight_scale is (out, ceil(in / group_size)); "input_group" (list of
# layer names, this one included) when the layer shares its input transform with those layers
# (build --share-inputs; readers that ignore it still get correct layers)
_OPTIONAL_LAYER_FIELDS = {"qweight": bool, "smoothed": bool, "group_size": int, "input_group": list}
_TOP_FIELDS = {
    "format": str, "format_version": int, "tool": dict, "preset": (str, type(None)),
    "config": dict, "config_hash": str, "checkpoint": dict, "layers": list, "totals": dict,
}


def _need(obj: dict, fields: dict, where: str) -> None:
    for key, typ in fields.items():
        if key not in obj:
            raise PackError(f"{where}: missing field '{key}'")
        val = obj[key]
        if isinstance(val, bool) and typ is int:
            raise PackError(f"{where}: field '{key}' must be an integer, got {val!r}")
        if not isinstance(val, typ):
            raise PackError(f"{where}: field '{key}' has the wrong type ({type(val).__name__})")


def validate_manifest(m: Any) -> dict:
    """Check a parsed manifest's schema and internal consistency; return it or raise PackError."""
    if not isinstance(m, dict):
        raise PackError("manifest.json: not a JSON object")
    if m.get("format") != FORMAT_NAME:
        raise PackError(f"manifest.json: format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    ver = m.get("format_version")
    if ver not in SUPPORTED_VERSIONS:
        raise PackError(f"manifest.json: format version {ver!r} is not supported by this reader "
                        f"(supports {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade duquant")
    _need(m, _TOP_FIELDS, "manifest.json")
    ck = m["checkpoint"]
    if not (isinstance(ck.get("sha256"), str) and isinstance(ck.get("files"), list)):
        raise PackError("manifest.json: checkpoint fingerprint lacks 'sha256' or 'files'")
    try:
        if config_hash(m["config"]) != m["config_hash"]:
            raise PackError("manifest.json: config_hash does not match its config (edited or corrupt)")
    except ValueError:
        raise PackError("manifest.json: config holds non-finite numbers") from None
    seen_names, seen_files = set(), set()
    for i, layer in enumerate(m["layers"]):
        if not isinstance(layer, dict):
            raise PackError(f"manifest.json: layers[{i}] is not an object")
        _need(layer, _LAYER_FIELDS, f"manifest.json: layers[{i}]")
        name = layer["name"]
        if name in seen_names:
            raise PackError(f"manifest.json: layer '{name}' listed twice")
        if layer["file"] in seen_files:
            raise PackError(f"manifest.json: file '{layer['file']}' used by two layers")
        seen_names.add(name)
        seen_files.add(layer["file"])
        check_relative_path(layer["file"], f"layer '{name}'")
        for key in ("in_features", "out_features", "block_in"):
            if layer[key] <= 0:
                raise PackError(f"manifest.json: layer '{name}': {key} must be positive")
        if layer["block_out"] is not None and (isinstance(layer["block_out"], bool) or layer["block_out"] <= 0):
            raise PackError(f"manifest.json: layer '{name}': block_out must be a positive integer or null")
        if not (layer["wbits"] == 0 or 2 <= layer["wbits"] <= 15):
            raise PackError(f"manifest.json: layer '{name}': wbits {layer['wbits']} is not 0 or 2..15")
        for key, typ in _OPTIONAL_LAYER_FIELDS.items():
            if key in layer and not isinstance(layer[key], typ):
                raise PackError(f"manifest.json: layer '{name}': field '{key}' has the wrong type "
                                f"({type(layer[key]).__name__})")
        if "group_size" in layer and (isinstance(layer["group_size"], bool) or layer["group_size"] < 1
                                      or layer["wbits"] == 0):
            raise PackError(f"manifest.json: layer '{name}': group_size must be a positive integer on a "
                            "quantized layer")
        if not _HEX64.fullmatch(layer["sha256"]):
            raise PackError(f"manifest.json: layer '{name}': sha256 is not a hex digest")
    _check_input_groups(m["layers"])
    if "calibration" in m:
        validate_calibration(m["calibration"], len(m["layers"]))
    return m


def _check_input_groups(layers: list[dict]) -> None:
    """Every ``input_group`` lists >= 2 distinct layers of the pack, this one included, with the same
    input width, and every member lists the same group."""
    by_name = {layer["name"]: layer for layer in layers}
    for layer in layers:
        group = layer.get("input_group")
        if group is None:
            continue
        name = layer["name"]
        where = f"manifest.json: layer '{name}': input_group"
        if len(group) < 2 or not all(isinstance(g, str) for g in group) or len(set(group)) != len(group) \
                or name not in group:
            raise PackError(f"{where} must list two or more distinct layer names, this one included")
        missing = [other for other in group if other not in by_name]
        if missing:
            raise PackError(f"{where} names '{missing[0]}', which is not in the pack")
        for other in group:
            o = by_name[other]
            if o.get("input_group") != group or o["in_features"] != layer["in_features"]:
                raise PackError(f"{where} disagrees with layer '{other}' (its group or input width differs)")


def validate_calibration(c: Any, n_layers: int) -> dict:
    """Check the optional top-level ``calibration`` object (saved activation scales; docs/format.md §10)."""
    where = "manifest.json: calibration"
    if not isinstance(c, dict):
        raise PackError(f"{where}: not a JSON object")
    _need(c, _CALIBRATION_FIELDS, where)
    check_relative_path(c["file"], "calibration", directory=CALIBRATION_DIR)
    if not _HEX64.fullmatch(c["sha256"]):
        raise PackError(f"{where}: sha256 is not a hex digest")
    if not 1 <= c["layers"] <= n_layers:
        raise PackError(f"{where}: layers must be 1..{n_layers} (the pack's layer count), got {c['layers']}")
    if isinstance(c["act_percentile"], bool) or not is_finite_number(c["act_percentile"]) \
            or not 0 < c["act_percentile"] <= 100:
        raise PackError(f"{where}: act_percentile must be a number in (0, 100], got {c['act_percentile']!r}")
    if c["calib_steps"] < 1:
        raise PackError(f"{where}: calib_steps must be >= 1, got {c['calib_steps']}")
    if not 2 <= c["abits"] <= 15:
        raise PackError(f"{where}: abits {c['abits']} is not 2..15")
    if c["act_mode"] != "static":
        raise PackError(f"{where}: act_mode must be 'static', got {c['act_mode']!r}")
    return c


def check_relative_path(rel: str, what: str, directory: str = LAYERS_DIR) -> None:
    """Refuse manifest paths that could leave the pack directory (must be ``<directory>/<file>``)."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or ":" in rel or any(p in ("", ".", "..") for p in parts):
        raise PackError(f"manifest.json: {what}: file path {rel!r} is not a plain relative path")
    if parts[0] != directory or len(parts) != 2:
        raise PackError(f"manifest.json: {what}: file path {rel!r} is not under {directory}/")


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
