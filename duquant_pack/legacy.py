"""Import a directory of openpi_duquant per-layer ``.npz`` packs into a format-1 pack.

    summary = import_legacy("duquant_packed/", "ckpt_dir", "packs/imported")

Every file is read with ``np.load(..., allow_pickle=False)`` and checked completely (keys, dtypes,
shapes, block coverage, orthogonality in float64, permutation validity, agreement with the
checkpoint's weight) and every layer's arrays and scales are computed *before* anything is
written. Writing then uses the build's machinery: the directory lock, ``.pending.json``, atomic
layer files, and the manifest written last (the commit point); on an error the files this import
wrote are removed, and a directory it created is removed again.

Mapping (docs/format.md §9): ``perm`` int64 -> ``perm`` int32; ``Rin_b`` -> ``r_in[b]`` (a
partial last block r x r goes into the top-left corner of a B x B identity; blocks missing from
``R_in_blocks`` are the identity, as the old runtime treated them); ``Rout_b`` -> ``r_out[b] =
Rout_b^T`` (the old code applied ``W_t = Rout W'`` and restored with ``y Rout``; format 1 applies
``BD(r_out)^T W'`` and restores with ``y BD(r_out)^T``). The stored ``weight_scale`` is validated
but not imported: the old runtime ignored it and recomputed the scales with the MSE grid, which
is what this import does (``duquant_pack.scales.weight_scales(W_t, bits, 'mse')`` from the
checkpoint weight and the imported rotations).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from duquant_runtime import __version__
from duquant_runtime.atomic import TMP_PREFIX, fsync_dir, pack_lock, write_json_atomic
from duquant_runtime.fingerprint import weight_fingerprint
from duquant_runtime.format import (CALIBRATION_DIR, FORMAT_NAME, FORMAT_VERSION, LAYERS_DIR, MANIFEST,
                                    canonical_json, file_sha256)
from duquant_runtime.format import PENDING_NAME
from duquant_runtime.transforms import n_blocks, transform_weight

from .build import (BuildSummary, discard_new_layer_files, inspect_out_dir, missing_ancestors, remove_created,
                    prune_calibration, layer_file_name)
from .checkpoint import FLOAT_DTYPES, Checkpoint, natural_key
from .config import BuildConfig, config_hash_of, normalize_bits, validate
from .errors import BuildError, CheckpointError, DuquantError
from .layer import ALGORITHM_VERSION, scales_and_stats

LEGACY_FORMAT = "openpi-duquant-npz"
ORTHO_TOL = 1e-5
_BLOCK_KEY = re.compile(r"^(Rin|Rout)_(\d+)$")
_KNOWN_KEYS = {"weight_scale", "meta", "perm", "R_in_blocks", "R_out_blocks"}


class LegacyImportError(DuquantError):
    """A legacy .npz pack (or the directory holding them) cannot be imported."""


def old_sanitize(name: str) -> str:
    """openpi_duquant's file-name sanitizer: chars outside [A-Za-z0-9_.-] -> '_', then '..' -> '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).replace("..", ".")


# --- reading and checking one file -------------------------------------------------------------

def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, read without unpickling; any problem -> LegacyImportError naming the file."""
    if not zipfile.is_zipfile(path):
        try:
            with open(path, "rb") as fh:
                magic = fh.read(6)
        except OSError as err:
            raise LegacyImportError(f"{path}: cannot read ({err.strerror or err})") from None
        if magic == b"\x93NUMPY":
            raise LegacyImportError(f"{path}: a single .npy array, not an openpi_duquant .npz pack "
                                    "(np.savez archive)")
        raise LegacyImportError(f"{path}: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as err:
        if "pickle" in str(err).lower() or "object arrays" in str(err).lower():
            raise LegacyImportError(f"{path}: holds pickled (object) arrays; refused "
                                    "(legacy packs are read with allow_pickle=False)") from None
        raise LegacyImportError(f"{path}: unreadable .npz ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as err:
        raise LegacyImportError(f"{path}: unreadable .npz ({err})") from None


def _meta(path: Path, arr: np.ndarray) -> dict:
    if arr.shape != () or arr.dtype.kind not in "US":
        raise LegacyImportError(f"{path}: 'meta' must be a JSON string, got {arr.dtype} array of shape {arr.shape}")
    text = arr.item()
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        meta = json.loads(text)
    except ValueError:
        raise LegacyImportError(f"{path}: 'meta' is not valid JSON") from None
    if not isinstance(meta, dict):
        raise LegacyImportError(f"{path}: 'meta' is not a JSON object")
    for key in ("in_features", "out_features", "block_size"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise LegacyImportError(f"{path}: meta.{key} must be a positive integer, got {v!r}")
    v = meta.get("block_out_size", meta["block_size"])
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise LegacyImportError(f"{path}: meta.block_out_size must be a positive integer, got {v!r}")
    if "enable_permute" in meta and not isinstance(meta["enable_permute"], bool):
        raise LegacyImportError(f"{path}: meta.enable_permute must be true or false")
    ls = meta.get("lambda_smooth")
    if ls is not None and (not isinstance(ls, (int, float)) or isinstance(ls, bool)):
        raise LegacyImportError(f"{path}: meta.lambda_smooth must be a number")
    wb = meta.get("wbits")
    if wb is not None and (not isinstance(wb, int) or isinstance(wb, bool)):
        raise LegacyImportError(f"{path}: meta.wbits must be an integer")
    return meta


def _int_vector(path: Path, arrays: dict, key: str) -> np.ndarray:
    a = arrays[key]
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise LegacyImportError(f"{path}: '{key}' must be a 1-D integer array, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def _blocks(path: Path, arrays: dict, kind: str, list_key: str, n: int, block: int) -> np.ndarray:
    """(nb, B, B) float64 rotations of `n` features in blocks of `block`; missing blocks = identity."""
    nb = n_blocks(n, block)
    out = np.tile(np.eye(block), (nb, 1, 1))
    listed = _int_vector(path, arrays, list_key) if list_key in arrays else np.zeros(0, dtype=np.int64)
    if len(set(listed.tolist())) != listed.size:
        raise LegacyImportError(f"{path}: '{list_key}' lists a block twice")
    stored = {int(m.group(2)) for k in arrays if (m := _BLOCK_KEY.match(k)) and m.group(1) == kind}
    if stored != set(listed.tolist()):
        extra = sorted(stored ^ set(listed.tolist()))
        raise LegacyImportError(f"{path}: '{list_key}' and the {kind}_<b> arrays disagree (blocks {extra[:5]})")
    for b in sorted(stored):
        key = f"{kind}_{b}"
        if not 0 <= b < nb:
            raise LegacyImportError(f"{path}: block {key}: index {b} outside 0..{nb - 1} "
                                    f"({n} features in blocks of {block})")
        size = min(block, n - b * block)
        r = arrays[key]
        if r.dtype.kind != "f":
            raise LegacyImportError(f"{path}: block {key}: dtype {r.dtype}, expected float32")
        if r.shape != (size, size):
            raise LegacyImportError(f"{path}: block {key}: shape {r.shape}, expected ({size}, {size}): the "
                                    f"blocks do not cover {n} features in blocks of {block}")
        r = r.astype(np.float64)
        if not np.isfinite(r).all():
            raise LegacyImportError(f"{path}: block {key} holds NaN/Inf")
        err = float(np.abs(r.T @ r - np.eye(size)).max())
        if err > ORTHO_TOL:
            raise LegacyImportError(f"{path}: block {key} is not orthogonal (max |R^T R - I| = {err:.2e} > {ORTHO_TOL:g})")
        out[b, :size, :size] = r
    return out


def read_legacy_file(path: Path) -> dict:
    """Parse and check one old .npz (independently of any checkpoint).

    Returns {meta, perm (int64 or None), r_in (nb, B, B) float64 in the old = new convention,
    rout_old (nb_o, Bo, Bo) float64 in the OLD convention (Rout_b) or None, block_in, block_out, sha256}."""
    path = Path(path)
    arrays = _load_npz(path)
    missing = {"meta", "weight_scale"} - set(arrays)
    if missing:
        raise LegacyImportError(f"{path}: not an openpi_duquant pack (missing {sorted(missing)}; has "
                                f"{sorted(arrays)[:6]})")
    unknown = sorted(k for k in arrays if k not in _KNOWN_KEYS and not _BLOCK_KEY.match(k))
    if unknown:
        raise LegacyImportError(f"{path}: not an openpi_duquant pack (unexpected arrays {unknown[:5]})")
    meta = _meta(path, arrays["meta"])
    in_f, out_f = meta["in_features"], meta["out_features"]
    ws = arrays["weight_scale"]
    if ws.dtype.kind != "f" or ws.shape != (out_f,):
        raise LegacyImportError(f"{path}: 'weight_scale' is {ws.dtype} {ws.shape}, expected float32 ({out_f},)")
    perm = None
    if "perm" in arrays:
        perm = _int_vector(path, arrays, "perm")
        if perm.shape != (in_f,) or not np.array_equal(np.sort(perm), np.arange(in_f)):
            raise LegacyImportError(f"{path}: 'perm' is not a permutation of {in_f} input channels")
    if "enable_permute" in meta and meta["enable_permute"] != (perm is not None):
        raise LegacyImportError(f"{path}: meta.enable_permute is {meta['enable_permute']} but 'perm' is "
                                f"{'present' if perm is not None else 'absent'}")
    block_in = min(meta["block_size"], in_f)
    block_out = min(meta.get("block_out_size", meta["block_size"]), out_f)
    r_in = _blocks(path, arrays, "Rin", "R_in_blocks", in_f, block_in)
    rout_old = None
    if "R_out_blocks" in arrays or any(k.startswith("Rout_") for k in arrays):
        rout_old = _blocks(path, arrays, "Rout", "R_out_blocks", out_f, block_out)
    return {"meta": meta, "perm": perm, "r_in": r_in, "rout_old": rout_old, "block_in": block_in,
            "block_out": block_out, "sha256": file_sha256(path)}


# --- names -------------------------------------------------------------------------------------

def _layer_names(ckpt: Checkpoint, stems: list[str], files: list[Path]) -> list[str]:
    """Map file stems to checkpoint layer names: exact `<stem>.weight`, else the unique layer whose
    name the old sanitizer turns into `stem`."""
    layer_names = [k[: -len(".weight")] for k in ckpt.names() if k.endswith(".weight")]
    by_sanitized: dict[str, list[str]] = {}
    for n in layer_names:
        by_sanitized.setdefault(old_sanitize(n), []).append(n)
    out = []
    for stem, f in zip(stems, files):
        if stem + ".weight" in ckpt.tensors:
            out.append(stem)
            continue
        cands = by_sanitized.get(stem, [])
        if len(cands) == 1:
            out.append(cands[0])
        elif cands:
            raise LegacyImportError(f"{f}: the file name matches several checkpoint layers {sorted(cands)[:3]}")
        else:
            raise LegacyImportError(f"{f}: the checkpoint has no tensor '{stem}.weight' (layer name = file "
                                    "name minus .npz)")
    seen: dict[str, Path] = {}
    for n, f in zip(out, files):
        if n in seen:
            raise LegacyImportError(f"{f} and {seen[n]} are both packs of layer '{n}'")
        seen[n] = f
    return out


def _common(files: list[Path], values: list, what: str):
    first = values[0]
    for f, v in zip(files, values):
        if v != first:
            raise LegacyImportError(f"{f}: {what} is {v}, but {files[0].name} has {first}; all layers of an "
                                    "old pack directory share one setting")
    return first


# --- the import --------------------------------------------------------------------------------

def import_legacy(npz_dir, ckpt, out_dir, *, overwrite: bool = False, wbits: int | None = None,
                  abits: int = 8, row_rot: str = "restore") -> BuildSummary:
    """Convert a directory of openpi_duquant ``*.npz`` packs into a format-1 pack at `out_dir`.

    wbits: weight bits of every layer (normalised: >= 16 or <= 0 = not quantized); None: a file's
      ``meta.wbits`` when present, else 4 (OPENPI_DUQUANT_WBITS_DEFAULT's default).
    abits: activation bits recorded for the runtime (the old ABITS; default 8).
    row_rot: 'restore' (the old ROW_ROT=restore: the stored Rout blocks are imported) or 'disabled'
      (ROW_ROT=0: Rout is dropped). 'propagate' is refused, as in builds.
    overwrite: replace an existing pack at `out_dir` (a directory holding anything else is refused).
    Nothing is written until every file has been checked and every layer computed.
    """
    t0 = time.perf_counter()
    src = Path(npz_dir)
    if not src.is_dir():
        raise LegacyImportError(f"{src}: not a directory")
    if row_rot not in ("restore", "disabled"):
        raise LegacyImportError(f"row_rot '{row_rot}' cannot be imported (use 'restore' or 'disabled'; the old "
                                "code never restored the output in other modes)")
    files = sorted((p for p in src.iterdir() if p.name.endswith(".npz") and p.is_file()),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise LegacyImportError(f"{src}: holds no .npz files")
    checkpoint = Checkpoint(ckpt)
    parsed = [read_legacy_file(f) for f in files]
    names = _layer_names(checkpoint, [f.name[: -len(".npz")] for f in files], files)

    block = _common(files, [p["meta"]["block_size"] for p in parsed], "meta.block_size")
    block_out = _common(files, [p["meta"].get("block_out_size", p["meta"]["block_size"]) for p in parsed],
                        "meta.block_out_size")
    permuted = _common(files, [p["perm"] is not None for p in parsed], "'perm' present")
    ls_values = {p["meta"].get("lambda_smooth") for p in parsed}
    ls = ls_values.pop() if len(ls_values) == 1 else None
    if ls is not None and not 0 <= ls <= 1:
        ls = None
    default_bits = 4 if wbits is None else wbits
    layer_bits = {}
    for f, p, n in zip(files, parsed, names):
        bits = p["meta"].get("wbits", default_bits) if wbits is None else wbits
        bits = normalize_bits(int(bits), f"{f}: wbits")
        if bits != normalize_bits(int(default_bits), "wbits"):
            layer_bits[n] = bits
    order = sorted(range(len(files)), key=lambda i: natural_key(names[i]))
    cfg = validate(BuildConfig(
        include="", exclude="", layers=tuple(names[i] for i in order), wbits=default_bits, abits=abits,
        layer_wbits=layer_bits, block=block, block_out=block_out if row_rot == "restore" else None,
        permute="interleave" if permuted else "none", permute_metric="energy", row_rot=row_rot, scale="mse", lambda_smooth=ls,
        compat="openpi-duquant"))
    chash = config_hash_of(cfg)

    layers = []
    for i in order:
        layers.append(_convert(checkpoint, files[i], parsed[i], names[i], cfg))
        parsed[i] = None  # keep only the float32 results

    out = Path(out_dir)
    identity = {"config_hash": chash, "checkpoint": checkpoint.fingerprint()["sha256"]}
    if out.exists() and not overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise BuildError(f"{out}: exists and is not empty; use --overwrite to replace a pack there, "
                             "or another --out")
    inspect_out_dir(out, identity, True)  # even with overwrite: only our own packs are replaced
    created = missing_ancestors(out)
    out.mkdir(parents=True, exist_ok=True)
    with pack_lock(out, BuildError, "another build is writing this pack"):
        try:
            manifest = _write(out, checkpoint, cfg, identity, layers, len(files))
        except BaseException:
            # only while we hold the lock: a writer that lost the race for it must not delete the
            # directory the lock holder is filling
            remove_created(out, created)
            raise
    entries = manifest["layers"]
    return BuildSummary(out_dir=out, config_hash=chash, layers=len(entries), computed=len(entries), reused=0,
                        weights=manifest["totals"]["weights"], seconds=time.perf_counter() - t0,
                        pack_bytes=manifest["totals"]["layer_bytes"] + (out / MANIFEST).stat().st_size,
                        entries=entries)


def _convert(ckpt: Checkpoint, path: Path, p: dict, name: str, cfg: BuildConfig) -> dict:
    """Check one parsed file against the checkpoint; compute W_t, scales and stats. Nothing is written."""
    key = name + ".weight"
    info = ckpt.info(key)
    if info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
        raise LegacyImportError(f"{path}: checkpoint tensor '{key}' is {info.dtype} {list(info.shape)}, "
                                "not a 2-D float weight")
    meta = p["meta"]
    if tuple(info.shape) != (meta["out_features"], meta["in_features"]):
        raise LegacyImportError(f"{path}: meta says out x in = {meta['out_features']} x {meta['in_features']} "
                                f"but checkpoint tensor '{key}' is {list(info.shape)}")
    try:
        w = ckpt.read_weight(key)
    except CheckpointError as err:
        raise LegacyImportError(f"{path}: {err}") from None
    spec = cfg.layer_spec(name)
    r_in = torch.from_numpy(p["r_in"]).to(torch.float32)
    r_out = None
    if cfg.row_rot == "restore":
        if p["rout_old"] is None:
            raise LegacyImportError(f"{path}: no Rout blocks, but row_rot is 'restore' (import with "
                                    "row_rot='disabled')")
        r_out = torch.from_numpy(p["rout_old"]).transpose(1, 2).contiguous().to(torch.float32)  # old -> ours
    perm = torch.from_numpy(p["perm"]) if p["perm"] is not None else None
    w_t = transform_weight(w, perm, r_in, r_out)
    scale, stats = scales_and_stats(w, w_t, spec.wbits, "mse")
    fp = weight_fingerprint(w)
    lkey = hashlib.sha256(canonical_json({
        "legacy": LEGACY_FORMAT, "npz_sha256": p["sha256"], "algorithm": ALGORITHM_VERSION,
        "format": FORMAT_VERSION, "name": name, "spec": spec.to_dict(), "weight": fp}).encode()).hexdigest()
    entry = {"name": name, "file": layer_file_name(name, lkey), "in_features": meta["in_features"],
             "out_features": meta["out_features"], "wbits": spec.wbits, "block_in": p["block_in"],
             "block_out": p["block_out"] if r_out is not None else None, "permuted": perm is not None,
             "weight_fingerprint": fp, "layer_key": lkey, "stats": stats}
    return {"entry": entry, "dtype": info.dtype,
            "perm": p["perm"].astype(np.int32) if p["perm"] is not None else None,
            "r_in": r_in.numpy(), "r_out": r_out.numpy() if r_out is not None else None, "scale": scale}


def _write(out: Path, ckpt: Checkpoint, cfg: BuildConfig, identity: dict, layers: list[dict], n_files: int) -> dict:
    from .writer import write_layer_file
    layers_dir = out / LAYERS_DIR
    layers_dir.mkdir(exist_ok=True)
    for stale in (*out.glob(TMP_PREFIX + "*"), *layers_dir.glob(TMP_PREFIX + "*")):
        stale.unlink()
    before = {p.name for p in layers_dir.iterdir()}
    write_json_atomic(out / PENDING_NAME, identity)
    entries = []
    try:
        for lay in layers:
            e = dict(lay["entry"])
            path = out / e["file"]
            write_layer_file(path, name=e["name"], layer_key=e["layer_key"], weight_fingerprint=e["weight_fingerprint"],
                             perm=lay["perm"], r_in=lay["r_in"], r_out=lay["r_out"], weight_scale=lay["scale"],
                             entry_json=canonical_json(e))
            e["source_dtype"] = lay["dtype"]
            e["sha256"] = file_sha256(path)
            entries.append(e)
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "tool": {"name": "duquant", "version": __version__, "algorithm_version": ALGORITHM_VERSION},
            "preset": None, "config": cfg.to_dict(), "config_hash": identity["config_hash"],
            "checkpoint": ckpt.fingerprint(), "layers": entries,
            "totals": {"layers": len(entries), "weights": sum(e["in_features"] * e["out_features"] for e in entries),
                       "layer_bytes": sum((out / e["file"]).stat().st_size for e in entries)},
            "imported_from": {"format": LEGACY_FORMAT, "files": n_files},
        }
        write_json_atomic(out / MANIFEST, manifest)  # the commit point
    except BaseException:
        discard_new_layer_files(out, before)
        raise
    (out / PENDING_NAME).unlink(missing_ok=True)
    prune_calibration(out / CALIBRATION_DIR, None)  # a replaced pack's activation scales do not apply
    keep = {Path(e["file"]).name for e in entries}
    for p in layers_dir.iterdir():
        if p.name not in keep:
            p.unlink()
    fsync_dir(layers_dir)
    return manifest


__all__ = ["import_legacy", "read_legacy_file", "old_sanitize", "LegacyImportError", "LEGACY_FORMAT"]
