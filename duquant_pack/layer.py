"""The per-layer DuQuant algorithm: from a weight W (out, in) to its transforms and scales.

    perm  = permutation of input channels (zigzag / interleave / none)
    R_in  = canonical principal-axis rotation per block of B permuted input columns
    R_out = same per block of B_out output rows (row rotation 'restore'), else none
    W_t   = BD(R_out)^T W P BD(R_in)         (float32, with the stored float32 rotations)
    scale = per-row scale of W_t ('mse' grid search or 'max')

Rotations are computed in float64 and stored in float32; W_t is computed from the stored float32
rotations with the runtime's own `transform_weight`, so the scales fit what the runtime quantizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from duquant_runtime.quant import is_quantized, pack_int4, quantize_rows, storage_dtype
from duquant_runtime.transforms import transform_weight

from .input_side import input_side, uses_input_side
from .permutation import compute_permutation
from .rotation import input_rotations, output_rotations
from .rounding import quantize_weight
from .scales import weight_scales
from .smoothing import fold_into_weight

ALGORITHM_VERSION = 3  # bump when the numbers a given spec produces change (2: cache-sized Gram chunks; 3: greedy Q factor)


@dataclass(frozen=True)
class LayerSpec:
    """Everything the layer's data depends on (besides the weight itself)."""

    wbits: int  # 0: not quantized
    block: int
    block_out: int | None  # None: no output rotation
    permute: str  # zigzag | interleave | none
    permute_metric: str | None  # absmax | energy (zigzag only)
    scale: str  # mse | max
    compat: str | None = None  # 'openpi-duquant': the old fork's R_out convention (stored r_out = U^T)
    store_qweights: bool = False  # also store the quantized integers of W_t
    # activation-aware options (input_side.py, rounding.py); left out of the key at their defaults
    rotation: str = "svd"  # svd | hadamard | random | greedy | none
    rotation_seed: int = 0
    act_stats: str | None = None  # data_sha256 of the layer's activation statistics
    lambda_smooth: float | None = None  # smoothing strength (only with act_stats)
    rounding: str = "rtn"  # rtn | gptq
    group_size: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["compat"] is None:
            del d["compat"]  # absent = null: layer keys of ordinary builds are unchanged
        if not d["store_qweights"]:
            del d["store_qweights"]
        for key, default in _SPEC_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d


_SPEC_DEFAULTS = {"rotation": "svd", "rotation_seed": 0, "act_stats": None, "lambda_smooth": None,
                  "rounding": "rtn", "group_size": None}


@dataclass
class LayerResult:
    perm: np.ndarray | None  # int32 (in,)
    r_in: np.ndarray  # float32 (nb_in, B_in, B_in)
    r_out: np.ndarray | None  # float32 (nb_out, B_out, B_out)
    weight_scale: np.ndarray | None  # float32 (out,)
    block_in: int
    block_out: int | None
    stats: dict
    qweight: np.ndarray | None = None  # stored integers of W_t (layout: duquant_runtime.quant.pack_int4)
    smooth: np.ndarray | None = None  # float32 (in,): x / smooth before the permutation (smoothing.py)


@dataclass
class InputSide:
    """The input-side transforms of a layer (or of layers that read one activation, --share-inputs):
    smooth float32 (in,) on W's device or None, perm int64 numpy (in,) or None, r_in float32 (nb, B, B)."""
    smooth: torch.Tensor | None
    perm: np.ndarray | None
    r_in: torch.Tensor


def compute_input_side(w: torch.Tensor, spec: LayerSpec, act_stats=None) -> InputSide:
    """Smoothing factors, permutation and input rotations of W (out, in) float32 (what
    `compute_layer` derives from W; for a shared input, W is the members' rows stacked)."""
    return _input_side(w, spec, act_stats)[0]


def _input_side(w: torch.Tensor, spec: LayerSpec, act_stats=None):
    """(InputSide, W with the smoothing folded in, W' = that W[:, perm] or None when not formed)."""
    b_in = min(spec.block, w.shape[1])
    if uses_input_side(spec):  # smoothing, activation zigzag, other rotations (input_side.py)
        w, smooth, perm, r_in = input_side(w, spec, b_in, act_stats)
        return InputSide(smooth, perm, r_in), w, None
    perm = compute_permutation(w, spec.permute, b_in, spec.permute_metric)
    w_perm = w.index_select(1, torch.from_numpy(perm).to(w.device)) if perm is not None else w
    return InputSide(None, perm, input_rotations(w_perm, b_in).to(torch.float32)), w, w_perm


def compute_layer(w: torch.Tensor, spec: LayerSpec, act_stats=None, shared: InputSide | None = None) -> LayerResult:
    """Transforms and scales of one float32 weight W (out, in) on the CPU or a CUDA device; the
    result's arrays are numpy (host). Deterministic for a given W, spec and device.
    `shared`: input-side transforms computed for a group of layers (`compute_input_side` on their
    stacked rows) used instead of W's own; everything else is computed from W."""
    out_f, in_f = w.shape
    b_in = min(spec.block, in_f)
    w_perm = None
    if shared is None:
        side, w, w_perm = _input_side(w, spec, act_stats)  # w: smoothing folded in
    else:
        side = shared
        if side.smooth is not None:
            w = fold_into_weight(w, side.smooth.to(w.device))
    smooth, perm, r_in = side.smooth, side.perm, side.r_in
    perm_t = torch.from_numpy(perm).to(w.device) if perm is not None else None
    if w_perm is None:
        w_perm = w.index_select(1, perm_t) if perm_t is not None else w
    r_in = r_in.to(w.device)
    b_out = r_out = None
    if spec.block_out is not None:
        b_out = min(spec.block_out, out_f)
        r_out = output_rotations(w, b_out)
        if spec.compat == "openpi-duquant":
            # the old code applied W_t = U W' (U: principal axes of the row block) and restored with
            # y U; in this format W_t = BD(r_out)^T W', so r_out = U^T per block (algorithm.md §13)
            r_out = r_out.transpose(1, 2).contiguous()
        r_out = r_out.to(torch.float32)
    w_t = transform_weight(w_perm, None, r_in, r_out)  # = transform_weight(w, perm, r_in, r_out)
    del w_perm
    scale, stats = scales_and_stats(w, w_t, spec.wbits, spec.scale)
    qweight = None
    if spec.store_qweights and scale is not None:
        qweight = store_integers(quantize_rows(w_t, torch.from_numpy(scale).to(w.device), spec.wbits).cpu(),
                                 spec.wbits)
    if scale is not None and (spec.rounding != "rtn" or spec.group_size):  # GPTQ, group scales (rounding.py)
        scale, stats, qweight = quantize_weight(w, w_t, spec, act_stats, smooth, perm_t, r_in)
    del w_t
    return LayerResult(
        perm=perm.astype(np.int32) if perm is not None else None,
        r_in=r_in.cpu().numpy(), r_out=r_out.cpu().numpy() if r_out is not None else None,
        weight_scale=scale, block_in=b_in, block_out=b_out, stats=stats, qweight=qweight,
        smooth=smooth.cpu().numpy() if smooth is not None else None)


def store_integers(q: torch.Tensor, wbits: int) -> np.ndarray:
    """The stored form of integers q (out, in): packed uint8 for <= 4 bits, else int8/int16."""
    if wbits <= 4:
        return pack_int4(q).numpy()
    return q.to(storage_dtype(wbits)).numpy()


def scales_and_stats(w: torch.Tensor, w_t: torch.Tensor, wbits: int, method: str) -> tuple[np.ndarray | None, dict]:
    """Per-row scales (float32 numpy, or None when not quantized) of the transformed weight W_t and
    the manifest stats (w_rel_err, rtn_rel_err, w_fro; {} when not quantized) for the original W."""
    if not is_quantized(wbits):
        return None, {}
    scale, row_err = weight_scales(w_t, wbits, method)
    norm2 = float(torch.linalg.vecdot(w, w, dim=1).to(torch.float64).sum())
    rtn_err2 = float(weight_scales(w, wbits, "max")[1].sum())  # plain RTN, absmax scales
    stats = {"w_rel_err": _rel(float(row_err.sum()), norm2), "rtn_rel_err": _rel(rtn_err2, norm2),
             "w_fro": float(np.sqrt(norm2))}
    return scale.cpu().numpy(), stats


def _rel(err2: float, norm2: float) -> float:
    return float(np.sqrt(err2 / norm2)) if norm2 > 0 else 0.0
