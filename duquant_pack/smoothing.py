"""SmoothQuant-style per-input-channel smoothing folded into the weight (activation-aware builds).

    s_j = max|X_j|^a / max_i|W_ij|^(1-a)        a = lambda_smooth in [0, 1]
    x' = x / s,   W' = W * s (column j scaled by s_j)   =>   x' W'^T = x W^T

Large activation channels are divided down and the weight absorbs the factor, moving
quantization difficulty from activations to weights (a = 0.5 splits it evenly). Computed in
float64, stored as float32; channels never seen active (max|X_j| = 0) or with an all-zero weight
column get s_j = 1. The runtime divides x by the stored float32 s before the permutation, and the
compiler folds the same float32 s into W, so with nothing quantized the layer is exact to rounding.
"""

from __future__ import annotations

import torch

S_MIN, S_MAX = 1e-5, 1e5  # clamp of s: keeps both x / s and W * s finite


def smoothing_factors(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (in,) float32 from the per-channel activation absmax (in,) and the weight W (out, in)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing strength must be in [0, 1], got {alpha}")
    a = act_absmax.to(torch.float64)
    wmax = w.abs().amax(dim=0).to(torch.float64)
    ok = (a > 0) & (wmax > 0)
    s = torch.ones_like(a)
    s[ok] = a[ok].pow(alpha) / wmax[ok].pow(1.0 - alpha)
    return s.clamp(S_MIN, S_MAX).to(torch.float32)


def fold_into_weight(w: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """W * s along the input columns (float32 (out, in))."""
    return w * smooth.to(w.dtype).unsqueeze(0)
