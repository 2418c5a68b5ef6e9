"""GPTQ error-compensating rounding (Frantar et al., 2023) of the transformed weight W_t.

The layer's proxy loss for a quantized Q is  L(Q) = tr((Q - W_t) H_t (Q - W_t)^T)  with
H_t = M^T (X^T X) M the second moment of the transformed inputs x_t = x M, M = S^-1 P BD(R_in)
(`transformed_hessian`, float64; the factor 2 of the paper's H = 2 X^T X cancels). Columns are
quantized one at a time in order; the rounding error of column j, divided by U_jj, is fed back
into the columns not yet quantized through row j of U = chol(H_t^-1)^T (upper), in blocks of
128 columns with lazy updates of the rest. Damping: H_t + 0.01 * mean(diag H_t) I; columns with
no input energy (diag 0) get H_jj = 1 and their weights are zeroed before quantization.

Precision: H_t and its Cholesky factorisations in float64, the column loop in float32. The scales
are fixed before the loop (per row: the build's scale search on W_t) or, with a group size, found
by the same search on each group of consecutive columns of the partially updated W_t when the
loop reaches the group's first column. Deterministic (fixed order, no randomness).

Memory for in = 16384: H_t is 2 GiB in float64 (one more copy while it is permuted and rotated),
U 1 GiB in float32; time is dominated by three in^3 factorisations (see docs/quality.md).
Runs on the device of its inputs (`--device cuda` builds: the GPU, where the factorisations of
a 16384-wide layer take a fraction of a second; results then differ from a CPU build within
float rounding, like the other GPU-built data, docs/algorithm.md §8).
"""

from __future__ import annotations

import torch

from duquant_runtime.quant import qrange
from duquant_runtime.transforms import apply_blocks

from .scales import weight_scales

BLOCK_COLUMNS = 128
DAMP = 0.01


def transformed_hessian(xtx: torch.Tensor, smooth, perm, r_in: torch.Tensor) -> torch.Tensor:
    """H_t = BD(R)^T P^T S^-1 (X^T X) S^-1 P BD(R) (in, in) float64 from X^T X (in, in)."""
    h = xtx.to(torch.float64).clone()
    if smooth is not None:
        inv = 1.0 / smooth.to(torch.float64)
        h.mul_(inv.unsqueeze(0)).mul_(inv.unsqueeze(1))
    if perm is not None:
        h = h.index_select(0, perm).index_select(1, perm)
    r = r_in.to(torch.float64)
    h = apply_blocks(h, r)  # H P BD(R) on the right
    h = apply_blocks(h.t().contiguous(), r)  # symmetric: (BD(R)^T H BD(R))^T = same
    return (h + h.t()).mul_(0.5)


def proxy_loss(w_hat: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W_hat - W) H (W_hat - W)^T) in float64."""
    d = (w_hat.to(torch.float64) - w.to(torch.float64))
    return float(((d @ h.to(torch.float64)) * d).sum())


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """U upper with U^T U = H^-1 (float64), H symmetric positive definite."""
    lower = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(hinv, upper=True)


def gptq_quantize(w_t: torch.Tensor, h_t: torch.Tensor, bits: int, scale_method: str = "mse",
                  row_scale: torch.Tensor | None = None, group_size: int | None = None,
                  damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers q (out, in) int8/int16 and scales: (out,) float32 per row, or (out, n_groups) with
    `group_size`, such that q * scale approximates W_t (out, in) under the proxy loss of H_t (in, in)."""
    qmin, qmax = qrange(bits)
    out_f, in_f = w_t.shape
    h = h_t.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    w = w_t.to(torch.float32).clone()
    w[:, dead] = 0.0
    diag += damp * float(diag.mean())
    u = _upper_inverse_cholesky(h).to(torch.float32)
    del h
    if group_size is None and row_scale is None:
        row_scale = weight_scales(w, bits, scale_method)[0]
    n_groups = -(-in_f // group_size) if group_size else 0
    dev = w.device
    gscale = torch.empty(out_f, n_groups, dtype=torch.float32, device=dev) if group_size else None
    q = torch.empty(out_f, in_f, dtype=torch.int8 if bits <= 8 else torch.int16, device=dev)
    step = BLOCK_COLUMNS if not group_size else group_size * max(1, BLOCK_COLUMNS // group_size)
    s = row_scale.to(torch.float32) if row_scale is not None else None
    for i1 in range(0, in_f, step):
        i2 = min(i1 + step, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size and col % group_size == 0:
                g = col // group_size
                gscale[:, g] = weight_scales(w1[:, i:i + group_size].contiguous(), bits, scale_method)[0]
                s = gscale[:, g]
            wc = w1[:, i]
            qc = torch.clamp(torch.round(wc / s), qmin, qmax)
            q[:, col] = qc.to(q.dtype)
            e = (wc - qc * s) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        if i2 < in_f:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q, (gscale if group_size else s)
