"""Streaming access to safetensors checkpoints (single file, sharded index, or a directory).

Headers are parsed and checked here (sizes and offsets against the file, dtypes); tensor data is
read one tensor at a time through `safetensors.safe_open` (memory-mapped), so memory stays near
the size of the tensors in use, whatever the checkpoint size.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = ("BF16", "F16", "F32")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path


class Checkpoint:
    """Tensors of a safetensors checkpoint, by name, read lazily.

    `Checkpoint(path)` accepts a ``.safetensors`` file, a ``model.safetensors.index.json`` or a
    directory holding either; every header is read and checked on construction.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.files, index_map = _resolve_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        self._file_meta = []
        for f in self.files:
            header, header_bytes, size = _read_header(f)
            self._file_meta.append({"name": f.name, "size": size,
                                    "header_sha256": hashlib.sha256(header_bytes).hexdigest()})
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise CheckpointError(f"{f}: tensor '{name}' also appears in {self.tensors[name].file.name}")
                self.tensors[name] = TensorInfo(name, info["dtype"], tuple(info["shape"]), f)
        for name, fname in (index_map or {}).items():
            if name not in self.tensors or self.tensors[name].file.name != fname:
                raise CheckpointError(f"{self.path}: index lists '{name}' in {fname} but that shard does not hold it")
        self._handles: dict[Path, object] = {}

    def fingerprint(self) -> dict:
        """Identity of the checkpoint: file names, sizes and header hashes, and their combined hash."""
        h = hashlib.sha256()
        for m in self._file_meta:
            h.update(f"{m['name']}\0{m['size']}\0{m['header_sha256']}\n".encode())
        return {"sha256": h.hexdigest(), "files": list(self._file_meta)}

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype), CPU."""
        info = self.tensors[name]
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = safe_open(str(info.file), framework="pt", device="cpu")
                self._handles[info.file] = handle
            return handle.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor '{name}' ({_one_line(err)})") from None

    def read_weight(self, name: str) -> torch.Tensor:
        """A 2-D float weight as float32, checked for NaN/Inf."""
        info = self.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype}; "
                                  f"only {', '.join(FLOAT_DTYPES)} weights can be packed")
        if len(info.shape) != 2:
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}; a linear weight is 2-D")
        w = self.read(name).to(torch.float32)
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise CheckpointError(f"{info.file}: tensor '{name}' has {bad} NaN/Inf values")
        return w


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or err.__class__.__name__


def _resolve_files(path: Path) -> tuple[list[Path], dict | None]:
    """Shard files of a checkpoint path, and the index's name -> file map when there is one."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / SINGLE_NAME).is_file():
            return [path / SINGLE_NAME], None
        if (path / INDEX_NAME).is_file():
            return _index_files(path / INDEX_NAME)
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found, None
        raise CheckpointError(f"{path}: directory holds neither {SINGLE_NAME} nor {INDEX_NAME}")
    if path.name.endswith(".index.json"):
        return _index_files(path)
    return [path], None


def _index_files(index: Path) -> tuple[list[Path], dict]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a name -> file mapping")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a valid safetensors index ({_one_line(err)})") from None
    files = []
    for fname in sorted(set(weight_map.values())):
        if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard name {fname!r} is not a plain file name")
        f = index.parent / fname
        if not f.is_file():
            raise CheckpointError(f"{index}: shard {fname} is missing")
        files.append(f)
    return files, weight_map


def _read_header(f: Path) -> tuple[dict, bytes, int]:
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{f}: not a safetensors file (too short: {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{f}: not a safetensors file (header length {n} does not fit the file of {size} bytes)")
            raw = fh.read(n)
    except OSError as err:
        raise CheckpointError(f"{f}: cannot read ({_one_line(err)})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{f}: not a safetensors file (header is not JSON: {_one_line(err)})") from None
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(start, int) and isinstance(end, int) and all(isinstance(s, int) and s >= 0 for s in shape)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{f}: header entry for '{name}' is malformed") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{f}: tensor '{name}' has unknown dtype {dtype!r}")
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * DTYPE_BYTES[dtype] or start < 0:
            raise CheckpointError(f"{f}: header of '{name}' is inconsistent (offsets {start}..{end} for {dtype} {shape})")
        if end > data_len:
            raise CheckpointError(f"{f}: truncated: tensor '{name}' ends at byte {end} of a {data_len}-byte data section")
        spans.append((start, end, name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{f}: header is inconsistent: tensors '{n0}' and '{n1}' overlap")
    return header, raw, size


def natural_key(name: str):
    """Sort key that orders 'layers.2' before 'layers.10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


__all__ = ["Checkpoint", "TensorInfo", "natural_key", "FLOAT_DTYPES"]
