"""Write side of the pack format: layer files and the manifest, each atomically.

Every file goes to a temporary name in the same directory, is fsynced, renamed over its final
name, and the directory is fsynced: a reader sees either the old file or the complete new one.
HDF5 files are built in memory without timestamps (equal data gives equal bytes) and written with
plain file I/O, so a full disk is a clean OSError.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from duquant_runtime.atomic import atomic_file, h5_image
from duquant_runtime.format import LAYER_FORMAT_NAME, FORMAT_VERSION, file_sha256



def write_layer_file(path: Path, *, name: str, layer_key: str, weight_fingerprint: str,
                     perm: np.ndarray | None, r_in: np.ndarray, r_out: np.ndarray | None,
                     weight_scale: np.ndarray | None, entry_json: str, qweight: np.ndarray | None = None,
                     smooth: np.ndarray | None = None) -> str:
    """Write one layer's HDF5 file atomically; returns its sha256."""
    with atomic_file(path) as t:
        with h5_image(t.tmp) as f:
            f.attrs["format"] = LAYER_FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["name"] = name
            f.attrs["layer_key"] = layer_key
            f.attrs["weight_fingerprint"] = weight_fingerprint
            f.attrs["entry"] = entry_json
            arrays = {}
            for key, arr, dtype in (("perm", perm, np.int32), ("r_in", r_in, np.float32),
                                    ("r_out", r_out, np.float32), ("weight_scale", weight_scale, np.float32),
                                    ("smooth", smooth, np.float32),
                                    ("qweight", qweight, qweight.dtype if qweight is not None else None)):
                if arr is not None:
                    arrays[key] = np.ascontiguousarray(arr, dtype=dtype)
                    f.create_dataset(key, data=arrays[key], track_times=False)
            f.attrs["data_sha256"] = datasets_sha256(arrays)
        digest = file_sha256(t.tmp)
    return digest


def datasets_sha256(arrays: dict) -> str:
    """sha256 over the datasets of a layer file: for each name in sorted order, the name, dtype,
    shape and little-endian bytes. Lets a build check a layer file it is about to reuse."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def reusable_entry(path: Path, layer_key: str) -> dict | None:
    """The stored manifest entry of an existing layer file when it is the finished, intact result
    of computation `layer_key` (attributes match, datasets match their checksum); else None."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != LAYER_FORMAT_NAME or f.attrs.get("layer_key") != layer_key:
                return None
            arrays = {k: f[k][()] for k in f.keys()}
            if f.attrs.get("data_sha256") != datasets_sha256(arrays):
                return None
            entry = json.loads(f.attrs["entry"])
            return entry if isinstance(entry, dict) and entry.get("layer_key") == layer_key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
