"""Weight-quality numbers of one packed layer against its checkpoint weight (no activations).

    q = layer_error(ckpt.read_weight(name + ".weight"), pack.layer(name))
    q["w_rel_err"], q["rtn_rel_err"], q["block_max"], q["block_median"]

`w_rel_err` is ||Q(W_t) - W_t||_F / ||W||_F with W_t = BD(R_out)^T W P BD(R_in) (the runtime's
transform) and Q the pack's per-row fake quantization at the layer's bits. The transforms are
orthogonal, so this is also the error in the original basis. For a weight built from this checkpoint
it reproduces the manifest's `stats.w_rel_err`. `rtn_rel_err` is plain round-to-nearest of W with
per-row absmax scales at the same bits. Both are 0.0 for an unquantized layer (wbits 0).

The block statistics describe the transformed weight per input block k (columns k*B .. k*B+B-1 of
W_t, B = block_in; the last block may be partial): the max and the median of |W_t| over the block's
rows and columns. A large max/median ratio means outliers the rotation did not spread out.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from duquant_runtime.errors import DuquantError
from duquant_runtime.pack import LayerPack
from duquant_runtime.quant import fake_quantize_rows, is_quantized
from duquant_runtime.transforms import n_blocks, transform_weight

from .scales import weight_scales


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32 like the runtime."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def transformed_weight(w: torch.Tensor, layer: LayerPack) -> torch.Tensor:
    """W_t of weight W (out, in) under the layer's transforms, in float32 (float64 for a float64 W)."""
    if tuple(w.shape) != (layer.out_features, layer.in_features):
        raise DuquantError(f"layer '{layer.name}': weight shape {list(w.shape)} does not match the pack "
                           f"({layer.out_features} x {layer.in_features})")
    dt = _work_dtype(w)
    w = w.detach().to("cpu", dt)
    r_out = layer.r_out.to(dt) if layer.r_out is not None else None
    return transform_weight(w, layer.perm, layer.r_in.to(dt), r_out)


def block_abs_stats(w_t: torch.Tensor, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per input block of `w_t` (out, in): (max |w_t|, median |w_t|) as float64 arrays (n_blocks,)."""
    a = w_t.abs().to(torch.float64).numpy()
    rows, cols = a.shape
    nb = n_blocks(cols, block)
    full = cols // block
    bmax = np.empty(nb, dtype=np.float64)
    bmed = np.empty(nb, dtype=np.float64)
    if full:
        blocks = a[:, :full * block].reshape(rows, full, block)
        bmax[:full] = blocks.max(axis=(0, 2))
        bmed[:full] = np.median(blocks.transpose(1, 0, 2).reshape(full, rows * block), axis=1)
    if nb > full:  # partial last block
        tail = a[:, full * block:]
        bmax[full] = tail.max()
        bmed[full] = np.median(tail)
    return bmax, bmed


def layer_error(w: torch.Tensor, layer: LayerPack, *, block_stats: bool = True) -> dict:
    """Weight reconstruction error of `layer`'s quantization of W, RTN for comparison, and per-block
    max/median of |W_t|. Plain floats and lists (JSON-ready):

    ``{"name", "wbits", "w_fro", "w_rel_err", "rtn_rel_err", "block_in", "block_max": [...],
    "block_median": [...]}`` (the block lists are absent with ``block_stats=False``).
    """
    w_t = transformed_weight(w, layer)
    w_ref = w.detach().to("cpu", w_t.dtype)
    norm2 = float(torch.linalg.vector_norm(w_ref, dtype=torch.float64) ** 2)
    w_fro = math.sqrt(norm2)
    bits = layer.wbits
    if is_quantized(bits):
        if layer.weight_scale is None:
            raise DuquantError(f"layer '{layer.name}': wbits={bits} but the pack holds no weight_scale")
        q = fake_quantize_rows(w_t, layer.weight_scale.to(w_t.dtype), bits)
        err2 = float(torch.linalg.vector_norm(q.sub_(w_t), dtype=torch.float64) ** 2)
        del q
        rtn_err2 = float(weight_scales(w_ref.to(torch.float32), bits, "max")[1].sum())
        w_rel = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
        rtn_rel = math.sqrt(rtn_err2 / norm2) if norm2 > 0 else 0.0
    else:
        w_rel = rtn_rel = 0.0
    out = {"name": layer.name, "wbits": int(bits), "w_fro": w_fro, "w_rel_err": w_rel, "rtn_rel_err": rtn_rel,
           "block_in": int(layer.block_in)}
    if block_stats:
        bmax, bmed = block_abs_stats(w_t, layer.block_in)
        out["block_max"] = [float(v) for v in bmax]
        out["block_median"] = [float(v) for v in bmed]
    return out


__all__ = ["layer_error", "transformed_weight", "block_abs_stats"]
