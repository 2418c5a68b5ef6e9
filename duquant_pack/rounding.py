"""Weight rounding beyond per-row round-to-nearest: per-group scales (`--group-size`) and GPTQ
(`--rounding gptq`). Both store the integers of W_t in the pack (format v2 `qweight`), since the
runtime cannot re-derive GPTQ's integers from the float weight.

    scale, stats, qweight = quantize_weight(w, w_t, spec, layer_stats, smooth, perm, r_in)

`scale` is (out,) or (out, n_groups) float32 (groups of `group_size` consecutive columns of W_t,
the last one possibly shorter). `stats` are the manifest stats of layer.scales_and_stats
(w_rel_err of the stored integers, rtn_rel_err, w_fro) plus, with GPTQ, `proxy_rel_err`:
tr(dW H_t dW^T) / tr(W_t H_t W_t^T) and `proxy_rel_err_rtn` (the same for RTN with the same scales).
"""

from __future__ import annotations

import numpy as np
import torch

from duquant_runtime.grouped import dequantize_grouped, expand_group_scales, quantize_grouped

from .gptq import gptq_quantize, proxy_loss, transformed_hessian
from .scales import weight_scales


def group_scales(w_t: torch.Tensor, bits: int, method: str, group_size: int) -> torch.Tensor:
    """Scales (out, n_groups) float32: the scale search on each group of columns."""
    cols = w_t.shape[1]
    return torch.stack([weight_scales(w_t[:, c:c + group_size].contiguous(), bits, method)[0]
                        for c in range(0, cols, group_size)], dim=1)


def quantize_weight(w: torch.Tensor, w_t: torch.Tensor, spec, stats, smooth, perm, r_in):
    """(scale numpy, manifest stats dict, stored integers numpy) for a quantized layer."""
    from .layer import _rel, store_integers  # layer.py imports this module lazily

    bits, gs = spec.wbits, spec.group_size
    dev = w_t.device  # the build's device: the CPU, or the GPU of a --device cuda build
    extra = {}
    if spec.rounding == "gptq":
        h_t = transformed_hessian(stats.xtx.to(dev), smooth, perm, r_in)
        q, scale = gptq_quantize(w_t, h_t, bits, spec.scale, group_size=gs)
        w_hat = _dequantize(q, scale, gs)
        rtn = _dequantize(_quantize(w_t, scale, bits, gs), scale, gs)
        ref = float(proxy_loss(torch.zeros_like(w_t), w_t, h_t))
        extra = {"proxy_rel_err": _rel(proxy_loss(w_hat, w_t, h_t), ref),
                 "proxy_rel_err_rtn": _rel(proxy_loss(rtn, w_t, h_t), ref)}
        del h_t
    else:
        scale = group_scales(w_t, bits, spec.scale, gs) if gs else weight_scales(w_t, bits, spec.scale)[0]
        q = _quantize(w_t, scale, bits, gs)
        w_hat = _dequantize(q, scale, gs)
    norm2 = float(torch.linalg.vector_norm(w, dtype=torch.float64) ** 2)
    err2 = float(torch.linalg.vector_norm(w_hat - w_t, dtype=torch.float64) ** 2)
    rtn_err2 = float(weight_scales(w, bits, "max")[1].sum())
    out = {"w_rel_err": _rel(err2, norm2), "rtn_rel_err": _rel(rtn_err2, norm2), "w_fro": float(np.sqrt(norm2)),
           **extra}
    return scale.cpu().numpy(), out, store_integers(q.cpu(), bits)


def _quantize(w_t, scale, bits, gs):
    if gs:
        return quantize_grouped(w_t, scale, bits, gs)
    from duquant_runtime.quant import quantize_rows
    return quantize_rows(w_t, scale, bits)


def _dequantize(q, scale, gs):
    if gs:
        return dequantize_grouped(q, scale, gs)
    return q.to(torch.float32) * scale.unsqueeze(1)


__all__ = ["quantize_weight", "group_scales", "expand_group_scales"]
