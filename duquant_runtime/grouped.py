"""Per-group weight scales: one scale per row and group of `group_size` consecutive columns of W_t.

A weight_scale of shape (out, n_groups), n_groups = ceil(in / group_size), scales columns
g*group_size .. (g+1)*group_size - 1 of row i by scale[i, g] (the last group may be shorter).
"""

from __future__ import annotations

import torch

from .quant import qrange


def expand_group_scales(scale: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(out, in) float32 per-element scales from (out, n_groups) group scales."""
    return scale.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_grouped(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integers clamp(round(w / s)) (out, in) int8/int16 with group scales (out, n_groups)."""
    qmin, qmax = qrange(bits)
    s = expand_group_scales(scale, w.shape[1], group_size)
    return torch.clamp(torch.round(w / s), qmin, qmax).to(torch.int8 if bits <= 8 else torch.int16)


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 (out, in) values q * s of integers q (out, in) with group scales (out, n_groups)."""
    return q.to(torch.float32) * expand_group_scales(scale, q.shape[1], group_size)
