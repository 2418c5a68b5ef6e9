"""Symmetric integer quantization of weight rows (pure functions).

A b-bit row is stored as integers q in [-2^(b-1), 2^(b-1) - 1] and a positive float32 scale s,
representing q * s. Rounding is round-half-to-even (torch.round).
Bits >= 16 or <= 0 mean "not quantized" (see `is_quantized`).
"""

from __future__ import annotations

import torch


def is_quantized(bits: int | None) -> bool:
    """True for bit widths that quantize (0 < bits < 16; 1 is invalid and refused by `qrange`)."""
    return bits is not None and 0 < bits < 16


def qrange(bits: int) -> tuple[int, int]:
    """Integer range (qmin, qmax) of a symmetric signed b-bit code."""
    if not 2 <= bits <= 15:
        raise ValueError(f"quantized bit width must be in 2..15, got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers of w (out, in) float32 with per-row scale (out,): clamp(round(w / s)), as int8/int16."""
    qmin, qmax = qrange(bits)
    q = torch.clamp(torch.round(w / scale.unsqueeze(1)), qmin, qmax)
    return q.to(torch.int8 if bits <= 8 else torch.int16)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 (out, in) values q * s of integer rows q (out, in) and scales s (out,)."""
    return q.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)


def fake_quantize_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize w (out, in) with per-row scales: the values the runtime multiplies."""
    qmin, qmax = qrange(bits)
    s = scale.unsqueeze(1)
    return torch.clamp(torch.round(w / s), qmin, qmax) * s


def absmax_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row scale max|w_row| / qmax (float32, shape (out,)); all-zero rows get scale 1."""
    _, qmax = qrange(bits)
    amax = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).to(torch.float32)  # = |w|.amax, no |w| copy
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack integers q (out, in) in [-8, 7] two per byte: uint8 (out, ceil(in/2)).

    Column 2j goes to the low nibble of byte j, column 2j+1 to the high nibble, each as a 4-bit
    two's complement code (q & 0xF); an odd last column leaves a zero high nibble. The result is
    row-major contiguous whatever q's strides (the GPU kernels read it as such).
    """
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values outside [-8, 7]")
    out, cols = q.shape
    codes = (q.to(torch.int16) & 0xF).to(torch.uint8)
    if cols % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # strided inputs may give a strided result


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 (out, cols) from uint8 (out, ceil(cols/2))."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (cols + 1) // 2:
        raise ValueError(f"unpack_int4 expects uint8 (out, {(cols + 1) // 2}), got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    b = packed.view(torch.int8)
    lo = (b << 4) >> 4  # arithmetic shifts sign-extend each nibble (4.6x faster than masking)
    hi = b >> 4
    both = torch.stack((lo, hi), dim=2).reshape(packed.shape[0], -1)
    return both if both.shape[1] == cols else both[:, :cols].contiguous()


def storage_dtype(bits: int) -> torch.dtype:
    """dtype of stored integers: uint8 packed for <= 4 bits (see pack_int4), int8 to 8, else int16."""
    return torch.uint8 if bits <= 4 else (torch.int8 if bits <= 8 else torch.int16)
