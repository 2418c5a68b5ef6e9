"""Streaming access to safetensors checkpoints (single file, sharded index, or a directory).

Headers are parsed and checked here (sizes and offsets against the file, dtypes); tensor data is
read one tensor at a time with plain positioned reads (`os.pread`) at the offsets of the checked
header, so memory stays near the size of the tensors in use, whatever the checkpoint size. No
memory map: the pages a build reads stay reclaimable page cache and do not count in its RSS.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import os

from .errors import CheckpointError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = ("BF16", "F16", "F32")
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset of the data in `file`
    nbytes: int = 0


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
            data_start = 8 + len(header_bytes)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise CheckpointError(f"{f}: tensor '{name}' also appears in {self.tensors[name].file.name}")
                start, end = info["data_offsets"]
                self.tensors[name] = TensorInfo(name, info["dtype"], tuple(info["shape"]), f,
                                                offset=data_start + start, nbytes=end - start)
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
        """The tensor as stored (its own dtype), CPU, in freshly allocated memory."""
        info = self.tensors[name]
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, which cannot be read")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        try:
            fd = self._handles.get(info.file)
            if fd is None:
                fd = os.open(info.file, os.O_RDONLY)
                self._handles[info.file] = fd
            got = 0
            while got < info.nbytes:
                n = os.preadv(fd, [view[got:]], info.offset + got)
                if n <= 0:
                    raise OSError(f"file ends {info.nbytes - got} bytes early")
                got += n
        except OSError as err:
            raise CheckpointError(f"{info.file}: cannot read tensor '{name}' ({_one_line(err)})") from None
        return buf.view(dtype).reshape(info.shape)

    def close(self) -> None:
        """Close the open file descriptors (reads reopen them)."""
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def read_weight(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """A 2-D float weight, checked for NaN/Inf, as `dtype` (None: as stored)."""
        info = self.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype}; "
                                  f"only {', '.join(FLOAT_DTYPES)} weights can be packed")
        if len(info.shape) != 2:
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}; a linear weight is 2-D")
        w = self.read(name)
        if w.numel():
            lo, hi = torch.aminmax(w)  # NaN propagates, Inf shows: one cheap pass instead of isfinite
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                bad = int((~torch.isfinite(w)).sum())
                raise CheckpointError(f"{info.file}: tensor '{name}' has {bad} NaN/Inf values")
        return w if dtype is None else w.to(dtype)


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
