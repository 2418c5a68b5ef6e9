"""Per-output-row weight scales for symmetric b-bit quantization of the transformed weight.

- `max`: s = max|W_row| / qmax.
- `mse`: s = (max|W_row| / qmax) / alpha for the alpha in MSE_ALPHAS that minimises the row's
  squared quantization error sum((clamp(round(W/s)) * s - W)^2) = s^2 sum((q - W/s)^2); ties
  keep the earlier alpha.
Rows are processed in chunks so the temporaries stay in cache-sized pieces; the error sums are
float32 dot products per row, scaled and compared in float64. Works on any device.
"""

from __future__ import annotations

import torch

from duquant_runtime.quant import absmax_scales, qrange

MSE_ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5)
_CHUNK_ELEMS = 1 << 18


def weight_scales(w: torch.Tensor, bits: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (out,) float32 and the per-row squared error (out,) float64 of W (out, in) float32."""
    base = absmax_scales(w, bits)
    if method == "max":
        alphas = (1.0,)
    elif method == "mse":
        alphas = MSE_ALPHAS
    else:
        raise ValueError(f"unknown scale method {method!r}")
    qmin, qmax = qrange(bits)
    out_rows, cols = w.shape
    step = max(1, _CHUNK_ELEMS // max(cols, 1)) if w.device.type == "cpu" else out_rows
    best_s = torch.empty(out_rows, dtype=torch.float32, device=w.device)
    best_e = torch.empty(out_rows, dtype=torch.float64, device=w.device)
    for r0 in range(0, out_rows, step):
        wc = w[r0:r0 + step]
        bc = base[r0:r0 + step]
        cur_s = cur_e = None
        for alpha in alphas:
            s = (bc / alpha).to(torch.float32)
            u = wc / s[:, None]  # exactly what quantize_rows divides
            d = torch.round(u).clamp_(qmin, qmax).sub_(u)
            e = torch.linalg.vecdot(d, d, dim=1).to(torch.float64) * s.to(torch.float64) ** 2
            if cur_s is None:
                cur_s, cur_e = s, e
            else:
                better = e < cur_e
                cur_s = torch.where(better, s, cur_s)
                cur_e = torch.where(better, e, cur_e)
        best_s[r0:r0 + step] = cur_s
        best_e[r0:r0 + step] = cur_e
    return best_s, best_e
