"""Small helpers shared by the tests (imported as a plain module: tests/ is on sys.path)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def tree_bytes(root) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root` (hidden files included)."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def save_ckpt(directory, tensors: dict, name: str = "model.safetensors") -> Path:
    """Write `tensors` as directory/name with safetensors.torch.save_file; returns the file path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_raw_safetensors(path, header: dict, data: bytes) -> Path:
    """A hand-made safetensors file: u64 header length, JSON header, data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return Path(path)


def random_orthogonal_blocks(nb: int, b: int, *, tail: int | None = None, seed: int = 0,
                             dtype=torch.float64) -> torch.Tensor:
    """(nb, b, b) random orthogonal blocks; with `tail`, the last block is a tail x tail rotation in the
    top-left corner of an identity (the layout the pack format uses for a partial last block)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(nb, b, b, generator=g, dtype=torch.float64))
    if tail is not None and tail != b:
        last = torch.eye(b, dtype=torch.float64)
        qt, _ = torch.linalg.qr(torch.randn(tail, tail, generator=g, dtype=torch.float64))
        last[:tail, :tail] = qt
        q[-1] = last
    return q.to(dtype)


def ortho_err(r: torch.Tensor) -> float:
    """max |R_b^T R_b - I| over blocks, in float64."""
    r = r.double()
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    return float((r.transpose(-1, -2) @ r - eye).abs().max())


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (float64)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
