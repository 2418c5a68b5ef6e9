"""Read side of a pack directory: `load_pack` gives a read-only view with lazy per-layer access.

    pack = load_pack("packs/my-pack")
    pack.layer_names                       # in manifest order
    lp = pack.layer("...mlp.down_proj")    # LayerPack: perm, r_in, r_out, weight_scale tensors
    lps = pack.read_layers(names)          # the same for many layers, read by a few threads
    problems = pack.verify()               # [] when every file and array checks out
    pack.calibration_scales()              # {layer: act_scale (in,)} when the pack holds saved scales

Every layer read checks the file's sha256 against the manifest, the HDF5 datasets' names, dtypes
and shapes, finiteness, permutation validity and orthogonality, and raises `PackError` otherwise.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import PackError
from .format import (CALIBRATION_FORMAT_NAME, CALIBRATION_FORMAT_VERSION, LAYER_DATASETS, LAYERS_DIR,
                     MANIFEST, ORTHO_TOL, validate_manifest)
from .quant import qrange, unpack_int4
from .transforms import n_blocks


READ_WORKERS = min(8, os.cpu_count() or 1)  # threads of `Pack.read_layers`


@dataclass(frozen=True)
class LayerPack:
    """One layer's transforms. Tensors are float32 on CPU (perm int64)."""

    name: str
    in_features: int
    out_features: int
    wbits: int  # 0: weight not quantized
    block_in: int
    block_out: int | None
    perm: torch.Tensor | None  # (in,) int64, None = identity
    r_in: torch.Tensor  # (nb_in, block_in, block_in)
    r_out: torch.Tensor | None  # (nb_out, block_out, block_out)
    weight_scale: torch.Tensor | None  # (out,) or (out, n_groups)
    meta: dict  # the manifest entry
    smooth: torch.Tensor | None = None  # (in,) float32: x / smooth before the permutation (v2)
    qweight: torch.Tensor | None = None  # stored integers of W_t (v2; layout: quant.pack_int4)
    group_size: int | None = None  # columns per weight_scale group (None: one scale per row)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.perm, self.r_in, self.r_out, self.weight_scale, self.smooth, self.qweight)
                   if t is not None)


class Pack:
    """A validated pack directory (manifest loaded eagerly, layers read on demand)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._entries = {e["name"]: e for e in manifest["layers"]}

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def layer_names(self) -> list[str]:
        return [e["name"] for e in self.manifest["layers"]]

    def entry(self, name: str) -> dict:
        try:
            return self._entries[name]
        except KeyError:
            raise PackError(f"{self.path}: no layer named '{name}' in the pack") from None

    def layer(self, name: str) -> LayerPack:
        """Read, check and return one layer's transforms."""
        return read_layer(self.path, self.entry(name))

    def layers(self):
        """Iterate over all layers (each read and checked on the fly)."""
        for name in self.layer_names:
            yield self.layer(name)

    def read_layers(self, names, workers: int | None = None) -> list[LayerPack]:
        """The layers `names`, in that order, read and checked by `workers` threads (default: up to
        8, one per CPU). The checksum, the array copies and the orthogonality checks release the
        GIL, so the reads overlap; HDF5 parsing does not. On failure, the PackError of the first
        failing name in order, as a loop over `layer` would raise; the reads not started are
        cancelled."""
        return _in_threads(self.layer, names, READ_WORKERS if workers is None else workers)

    @property
    def calibration(self) -> dict | None:
        """The manifest's ``calibration`` object (saved activation scales), or None."""
        return self.manifest.get("calibration")

    def calibration_scales(self) -> dict[str, torch.Tensor]:
        """{pack layer name: static activation scale float32 (in_features,)} of the saved
        calibration, after checking the file's checksum, layout, names, shapes and values."""
        if self.calibration is None:
            raise PackError(f"{self.path}: the pack holds no calibration (see save_calibration)")
        return read_calibration(self.path, self.manifest)

    def verify(self) -> list[str]:
        """Check every layer file (and the calibration file, if any); one line per problem."""
        def problem(entry: dict) -> str | None:
            try:
                read_layer(self.path, entry)
            except PackError as err:
                return str(err)
            return None

        problems = [p for p in _in_threads(problem, self.manifest["layers"], READ_WORKERS) if p is not None]
        if self.calibration is not None:
            try:
                read_calibration(self.path, self.manifest)
            except PackError as err:
                problems.append(str(err))
        return problems

    def __repr__(self) -> str:
        return f"Pack({str(self.path)!r}, {len(self._entries)} layers, {self.manifest['config_hash'][:19]})"


def _in_threads(fn, items, workers: int) -> list:
    """[fn(x) for x in items], computed by up to `workers` threads, in order. The first exception
    in order propagates, and the calls not yet started are cancelled."""
    items = list(items)
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    ex = ThreadPoolExecutor(workers, thread_name_prefix="duquant-read")
    try:
        return list(ex.map(fn, items))
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def load_pack(pack_dir) -> Pack:
    """Open a pack directory: read and validate manifest.json (layers are read lazily)."""
    path = Path(pack_dir)
    if not path.is_dir():
        raise PackError(f"{path}: pack directory does not exist")
    mpath = path / MANIFEST
    if not mpath.is_file():
        hint = " (an interrupted build? rerun the same build to resume)" if (path / LAYERS_DIR).is_dir() else ""
        raise PackError(f"{path}: no {MANIFEST}: not a complete pack{hint}")
    _resolve_inside(path, MANIFEST)  # a manifest symlinked from elsewhere is not this pack's
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except OSError as err:
        raise PackError(f"{mpath}: cannot read ({err.__class__.__name__}: {err.strerror or err})") from None
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, not UTF-8, a 5000-digit number
        raise PackError(f"{mpath}: not valid JSON ({err.__class__.__name__}: {' '.join(str(err).split())[:200]})") \
            from None
    validate_manifest(manifest)
    return Pack(path, manifest)


def _resolve_inside(pack_dir: Path, rel: str) -> Path:
    p = pack_dir / rel
    root = os.path.realpath(pack_dir)
    real = os.path.realpath(p)
    if os.path.commonpath([root, real]) != root:
        raise PackError(f"{p}: resolves outside the pack directory")
    return p


def _read_checked(path: Path, sha256: str, what: str) -> bytes:
    """The file's bytes, read once: the checksum covers exactly the bytes that are parsed (no
    second read that a concurrent writer could change, half the I/O)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PackError(f"{path}: unreadable ({err.strerror or err}; {what})") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise PackError(f"{path}: checksum mismatch (file changed or corrupt; {what})")
    return raw


def read_layer(pack_dir: Path, entry: dict) -> LayerPack:
    """Read one layer file described by a manifest entry; every check failure raises PackError."""
    name = entry["name"]
    path = _resolve_inside(Path(pack_dir), entry["file"])
    if not path.is_file():
        raise PackError(f"{path}: layer file missing (layer '{name}')")
    raw = _read_checked(path, entry["sha256"], f"layer '{name}'")
    fin, fout = entry["in_features"], entry["out_features"]
    bin_, bout = entry["block_in"], entry["block_out"]
    try:
        with h5py.File(io.BytesIO(raw), "r") as f:
            extra = set(f.keys()) - LAYER_DATASETS
            if extra:
                raise PackError(f"{path}: unexpected datasets {sorted(extra)}")
            data = {k: _read_dataset(f, k, path) for k in f.keys()}
    except PackError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:  # RuntimeError: h5py, corrupt metadata
        raise PackError(f"{path}: unreadable HDF5 layer file ({' '.join(str(err).split())})") from None

    if "r_in" not in data:
        raise PackError(f"{path}: missing dataset 'r_in'")
    r_in = _check_rotation(data["r_in"], fin, bin_, path, "r_in")
    r_out = _listed(data, "r_out", bout is not None, path, f" (manifest says block_out={bout})",
                    "manifest has no output rotation")
    if r_out is not None:
        r_out = _check_rotation(r_out, fout, bout, path, "r_out")
    perm = _listed(data, "perm", bool(entry["permuted"]), path, "", "manifest says not permuted")
    if perm is not None:
        perm = _check_perm(perm, fin, path)
    gs = entry.get("group_size")
    scale = _listed(data, "weight_scale", entry["wbits"] > 0, path, f" (wbits={entry['wbits']})",
                    "layer is not quantized")
    if scale is not None:
        scale = _positive_float32(scale, (fout,) if gs is None else (fout, n_blocks(fin, gs)), path, "weight_scale")
    qweight = _listed(data, "qweight", entry.get("qweight", False) is True, path,
                      " (manifest says the integers are stored)", "the manifest does not list it")
    if qweight is not None:
        if entry["wbits"] <= 0:
            raise PackError(f"{path}: stored integers for a layer that is not quantized")
        qweight = _check_qweight(qweight, fout, fin, entry["wbits"], path)
    smooth = _listed(data, "smooth", entry.get("smoothed", False) is True, path,
                     " (manifest says the layer is smoothed)", "the manifest does not list it")
    if smooth is not None:
        smooth = _positive_float32(smooth, (fin,), path, "smooth")
    return LayerPack(name=name, in_features=fin, out_features=fout, wbits=entry["wbits"],
                     block_in=bin_, block_out=bout, perm=perm, r_in=r_in, r_out=r_out,
                     weight_scale=scale, meta=entry, qweight=qweight, smooth=smooth,
                     group_size=entry.get("group_size") if scale is not None else None)


def _listed(data: dict, key: str, listed: bool, path: Path, why_needed: str, why_not: str):
    """data[key] when the manifest lists the dataset (missing: an error saying `why_needed`), else
    None (present anyway: an error saying `why_not`)."""
    if listed:
        if key not in data:
            raise PackError(f"{path}: missing dataset '{key}'{why_needed}")
        return data[key]
    if key in data:
        raise PackError(f"{path}: dataset '{key}' present but {why_not}")
    return None


def _positive_float32(a: np.ndarray, shape: tuple, path: Path, key: str) -> torch.Tensor:
    """A float32 array of `shape` with finite, positive values (scales, smoothing factors)."""
    if a.dtype != np.float32 or a.shape != shape:
        raise PackError(f"{path}: {key} must be float32 {shape}, got {a.dtype} {a.shape}")
    if not (np.isfinite(a).all() and (a > 0).all()):
        raise PackError(f"{path}: {key} has non-finite or non-positive values")
    return torch.from_numpy(a)


def _check_qweight(q: np.ndarray, out_f: int, in_f: int, wbits: int, path: Path) -> torch.Tensor:
    """Stored integers: uint8 (out, ceil(in/2)) packed for wbits <= 4, int8 (out, in) for 5..8,
    int16 (out, in) above; values within the wbits range."""
    want_dtype = np.uint8 if wbits <= 4 else (np.int8 if wbits <= 8 else np.int16)
    want_shape = (out_f, (in_f + 1) // 2) if wbits <= 4 else (out_f, in_f)
    if q.dtype != want_dtype or q.shape != want_shape:
        raise PackError(f"{path}: qweight must be {np.dtype(want_dtype).name} {want_shape} for "
                        f"wbits={wbits}, got {q.dtype} {q.shape}")
    t = torch.from_numpy(q)
    if wbits <= 4:
        if in_f % 2 and q.size and (q[:, -1] >> 4).any():
            raise PackError(f"{path}: qweight padding nibbles are not zero")
        vals = unpack_int4(t, in_f) if wbits < 4 else None
    else:
        vals = t
    if vals is not None and vals.numel():
        qmin, qmax = qrange(wbits)
        if int(vals.min()) < qmin or int(vals.max()) > qmax:
            raise PackError(f"{path}: qweight values outside the {wbits}-bit range [{qmin}, {qmax}]")
    return t


def calibration_dataset_names(n: int) -> list[str]:
    """Dataset names of a calibration file with n layers: ``scale_<index>``, zero-padded to 5 digits
    (more when n > 100000), index = position in the file's ``names`` list."""
    width = max(5, len(str(n - 1)))
    return [f"scale_{i:0{width}d}" for i in range(n)]


def read_calibration(pack_dir: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Read and check the calibration file a (validated) manifest points to; see docs/format.md §10."""
    cal = manifest["calibration"]
    entries = {e["name"]: e for e in manifest["layers"]}
    path = _resolve_inside(Path(pack_dir), cal["file"])
    if not path.is_file():
        raise PackError(f"{path}: calibration file missing")
    raw = _read_checked(path, cal["sha256"], "calibration file")
    try:
        with h5py.File(io.BytesIO(raw), "r") as f:
            attrs = {k: f.attrs[k] for k in ("format", "format_version", "names", "layer_keys", "abits",
                                             "act_mode", "act_percentile", "calib_steps") if k in f.attrs}
            attrs = {k: v.item() if isinstance(v, np.generic) else v for k, v in attrs.items()}
            if attrs.get("format") != CALIBRATION_FORMAT_NAME:
                raise PackError(f"{path}: not a duquant calibration file (format {attrs.get('format')!r})")
            if attrs.get("format_version") != CALIBRATION_FORMAT_VERSION:
                raise PackError(f"{path}: calibration format version {attrs.get('format_version')!r} is not "
                                f"supported (supports {CALIBRATION_FORMAT_VERSION}); upgrade duquant")
            names, keys = json.loads(attrs["names"]), json.loads(attrs["layer_keys"])
            if not (isinstance(names, list) and isinstance(keys, list) and len(names) == len(keys)
                    and all(isinstance(n, str) for n in names)):
                raise PackError(f"{path}: attributes 'names' and 'layer_keys' must be lists of equal length")
            expect = calibration_dataset_names(len(names))
            if set(f.keys()) != set(expect):
                odd = sorted(set(f.keys()) ^ set(expect))
                raise PackError(f"{path}: datasets do not match the {len(names)} listed names "
                                f"(missing or unexpected: {', '.join(odd[:3])})")
            data = {n: _read_dataset(f, k, path) for n, k in zip(names, expect)}
    except PackError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:  # RuntimeError: h5py, corrupt metadata
        raise PackError(f"{path}: unreadable calibration file ({err.__class__.__name__}: "
                        f"{' '.join(str(err).split())})") from None
    if len(set(names)) != len(names):
        raise PackError(f"{path}: a layer name is listed twice")
    if len(names) != cal["layers"]:
        raise PackError(f"{path}: holds {len(names)} layers, manifest says {cal['layers']}")
    for key in ("abits", "act_mode", "act_percentile", "calib_steps"):
        val = attrs.get(key)
        if not (isinstance(val, (str, int, float)) and val == cal[key]):
            raise PackError(f"{path}: attribute {key}={val!r} disagrees with the manifest ({cal[key]!r})")
    out = {}
    for (name, arr), key in zip(data.items(), keys):
        e = entries.get(name)
        if e is None:
            raise PackError(f"{path}: layer '{name}' is not a layer of the pack")
        if key != e["layer_key"]:
            raise PackError(f"{path}: layer '{name}' was calibrated for other transforms (layer_key "
                            f"{str(key)[:16]} vs {e['layer_key'][:16]})")
        if arr.dtype != np.float32 or arr.shape != (e["in_features"],):
            raise PackError(f"{path}: scales of '{name}' must be float32 ({e['in_features']},), "
                            f"got {arr.dtype} {arr.shape}")
        if not (np.isfinite(arr).all() and (arr > 0).all()):
            raise PackError(f"{path}: scales of '{name}' have non-finite or non-positive values")
        out[name] = torch.from_numpy(arr)
    return out


def _read_dataset(f, key: str, path: Path) -> np.ndarray:
    if not isinstance(f.get(key, getlink=True), h5py.HardLink):  # soft/external links: no reads elsewhere
        raise PackError(f"{path}: '{key}' is a link, not a dataset stored in the file")
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise PackError(f"{path}: '{key}' is not a dataset")
    if obj.is_virtual or obj.external:  # data mapped from other files
        raise PackError(f"{path}: dataset '{key}' keeps its data outside the file")
    if obj.dtype.kind not in "fiu":
        raise PackError(f"{path}: dataset '{key}' has non-numeric dtype {obj.dtype}")
    return obj[()]


def _check_rotation(r: np.ndarray, features: int, block: int, path: Path, key: str) -> torch.Tensor:
    nb = n_blocks(features, block)
    if r.dtype != np.float32 or r.shape != (nb, block, block):
        raise PackError(f"{path}: {key} must be float32 ({nb}, {block}, {block}), got {r.dtype} {r.shape}")
    if not np.isfinite(r).all():
        raise PackError(f"{path}: {key} has NaN or Inf")
    t = torch.from_numpy(r)
    err = orthogonality_error(t)
    if err > ORTHO_TOL:
        raise PackError(f"{path}: {key} is not orthogonal (max |R^T R - I| = {err:.2e} > {ORTHO_TOL:g})")
    tail = features - (nb - 1) * block
    if tail != block:
        last = t[-1].double()
        expect = torch.eye(block, dtype=torch.float64)
        if not (torch.equal(last[tail:, :], expect[tail:, :]) and torch.equal(last[:, tail:], expect[:, tail:])):
            raise PackError(f"{path}: {key} last block must be identity outside its {tail}x{tail} corner")
    return t


def orthogonality_error(r: torch.Tensor) -> float:
    """max |R_b^T R_b - I| over blocks, computed in float64."""
    r64 = r.double()
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    return float((r64.transpose(1, 2) @ r64 - eye).abs().max()) if r.numel() else 0.0


def _check_perm(p: np.ndarray, features: int, path: Path) -> torch.Tensor:
    if p.dtype.kind != "i" or p.shape != (features,):
        raise PackError(f"{path}: perm must be integer ({features},), got {p.dtype} {p.shape}")
    if not np.array_equal(np.sort(p), np.arange(features)):
        raise PackError(f"{path}: perm is not a permutation of 0..{features - 1}")
    return torch.from_numpy(p.astype(np.int64))
