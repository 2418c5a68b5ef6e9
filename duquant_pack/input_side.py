"""The input side of a layer beyond the weight-only default: smoothing, activation zigzag and the
rotation choice (`--rotation`, `--act-stats`, `--lambda-smooth`).

    w', smooth, perm, r_in = input_side(w, spec, block, stats)

- smoothing (stats and lambda_smooth given): s = smoothing_factors(absmax, W, lambda_smooth),
  W' = W * s; the runtime divides x by s first (smoothing.py);
- permutation: zigzag on the activation maxima of x / s when statistics are given (the DuQuant
  paper's rule), else on the weight metric as before; interleave / none as configured;
- rotation: 'svd' (principal axes of W' P, rotation.py), 'hadamard' / 'random' (hadamard.py,
  seeded by rotation_seed), 'greedy' (greedy.py, needs statistics), 'none' (identity blocks: the
  no-transform baseline).
"""

from __future__ import annotations

import numpy as np
import torch

from .greedy import greedy_rotations
from .hadamard import hadamard_rotations, random_rotations
from .permutation import compute_permutation, interleave_permutation, zigzag_permutation
from .rotation import input_rotations
from .smoothing import fold_into_weight, smoothing_factors


def uses_input_side(spec) -> bool:
    """True when the layer needs this module (a non-default rotation or activation statistics)."""
    return getattr(spec, "rotation", "svd") != "svd" or getattr(spec, "act_stats", None) is not None


def input_side(w: torch.Tensor, spec, block: int, stats=None):
    """(W' (out, in) float32, smooth (in,) float32 or None, perm int64 numpy or None, r_in (nb, B, B) float32)."""
    in_f = w.shape[1]
    smooth = None
    act_max = stats.absmax.to(torch.float64) if stats is not None else None
    if stats is not None and spec.lambda_smooth is not None:
        smooth = smoothing_factors(stats.absmax.to(w.device), w, spec.lambda_smooth)
        w = fold_into_weight(w, smooth)
        act_max = act_max / smooth.cpu().to(torch.float64)
    if spec.permute == "zigzag" and act_max is not None:
        perm = zigzag_permutation(act_max.numpy(), block)
    elif spec.permute == "interleave" and act_max is not None:
        perm = interleave_permutation(act_max.numpy() ** 2)
    else:
        perm = compute_permutation(w, spec.permute, block, spec.permute_metric)
    perm_t = torch.from_numpy(perm) if perm is not None else None
    rotation = spec.rotation
    if rotation == "svd":
        r_in = input_rotations(w[:, perm_t] if perm_t is not None else w, block)
    elif rotation == "hadamard":
        r_in = hadamard_rotations(in_f, block, spec.rotation_seed)
    elif rotation == "random":
        r_in = random_rotations(in_f, block, spec.rotation_seed)
    elif rotation == "greedy":
        if act_max is None:
            raise ValueError("the greedy rotation needs activation statistics (--act-stats)")
        r_in = greedy_rotations(act_max[perm_t] if perm_t is not None else act_max, block,
                                seed=spec.rotation_seed)
    elif rotation == "none":
        nb = -(-in_f // block)
        r_in = torch.eye(block, dtype=torch.float64).expand(nb, block, block).clone()
    else:
        raise ValueError(f"unknown rotation {rotation!r}")
    return w, smooth, (perm.astype(np.int64) if perm is not None else None), r_in.to(w.device, torch.float32)
