"""The DuQuant paper's greedy, outlier-driven block rotation, from activation statistics.

For one block with per-channel activation maxima m (B,) (of x / s, permuted) and a rotation R,
the rotated activation x R satisfies |(x R)_k| <= sum_j m_j |R_jk| =: b_k(R). Starting from
R = I, each step takes the channel k* with the largest bound and spreads it over the block:

    R <- R E_k* G Q_t E_k*     G = I - 2 v v^T / (v^T v),  v = e_0 - 1/sqrt(B)
                               Q_t = diag(1, Q'_t),  Q'_t a seeded random orthogonal (B-1, B-1)

E_k* swaps coordinates 0 and k*. G is the Householder reflection whose first row and column
are the uniform vector 1/sqrt(B), so channel k* is shared by all B coordinates, as in the
paper's rotation with a uniform first row. Q_t is the paper's random orthogonal factor. Without
it, G adds one common vector (a multiple of W's column k*) to every other weight column. The
W4 rounding errors of those columns then share a common part, and that part lies exactly along
the direction that carries the activation outlier. On synthetic pi0.5 down_proj layers this
multiplied the output error by ~4 (docs/quality.md). Q'_t gives each column a different
multiple, which decorrelates the errors.

A step is kept only when it lowers max_k b_k. The search stops at the first step that does not,
or after `steps` steps. Float64, deterministic for (seed, block index, step): argmax takes the
first maximum, and Q'_t comes from `hadamard.random_orthogonal`. Blocks follow the layout of
`rotation.input_rotations`.
"""

from __future__ import annotations

import torch

from .hadamard import random_orthogonal

DEFAULT_STEPS = 64


def uniform_householder(n: int) -> torch.Tensor:
    """(n, n) float64 orthogonal, symmetric, first row and column = 1/sqrt(n)."""
    v = -torch.full((n,), n ** -0.5, dtype=torch.float64)
    v[0] += 1.0
    nv = float(v @ v)
    eye = torch.eye(n, dtype=torch.float64)
    return eye if nv == 0 else eye - 2.0 * torch.outer(v, v) / nv


def greedy_block(m: torch.Tensor, steps: int = DEFAULT_STEPS, seed: int = 0, what: str = "") -> torch.Tensor:
    """Greedy rotation (n, n) float64 for the channel maxima m (n,) of one block; `seed` and
    `what` (e.g. the block index) make the random factors Q'_t."""
    n = m.shape[0]
    m = m.to(torch.float64).clamp_min(0)
    r = torch.eye(n, dtype=torch.float64)
    if n < 2:
        return r
    g = uniform_householder(n)
    best = float((m @ r.abs()).max())
    for t in range(steps):
        k = int(torch.argmax(m @ r.abs()))
        idx = torch.arange(n)
        idx[0], idx[k] = k, 0
        q = torch.eye(n, dtype=torch.float64)
        q[1:, 1:] = random_orthogonal(n - 1, seed, f"greedy/{what}/{t}")
        step = (g @ q)[idx][:, idx]  # E_k G Q_t E_k
        cand = r @ step
        score = float((m @ cand.abs()).max())
        if not score < best:
            break
        r, best = cand, score
    return r


def greedy_rotations(act_max_perm: torch.Tensor, block: int, steps: int = DEFAULT_STEPS,
                     seed: int = 0) -> torch.Tensor:
    """R (nb, B, B) float64 from the permuted per-channel activation maxima (in,)."""
    features = act_max_perm.shape[0]
    nb = -(-features // block)
    rot = torch.empty(nb, block, block, dtype=torch.float64)
    for k in range(nb):
        seg = act_max_perm[k * block:(k + 1) * block]
        r = seg.shape[0]
        if r == block:
            rot[k] = greedy_block(seg, steps, seed, f"block{k}")
        else:
            rot[k] = torch.eye(block, dtype=torch.float64)
            rot[k, :r, :r] = greedy_block(seg, steps, seed, f"block{k}")
    return rot
