"""Input-channel permutations (index vectors `perm` with x P = x[..., perm]).

- `zigzag`: the DuQuant paper's rule. Channels sorted by a magnitude metric (descending) are
  dealt to the blocks round-robin, forward then backward (0,1,..,n-1,n-1,..,0,0,1,..), so the
  largest channels land in different blocks. A smaller last block takes part until it is full.
- `interleave`: the openpi_duquant fork's order, for comparison: channels sorted by energy
  descending, interleaved from both ends [o0, o_last, o1, o_last-1, ...], cut into contiguous blocks.
"""

from __future__ import annotations

import numpy as np
import torch


def channel_metric(w: torch.Tensor, kind: str) -> np.ndarray:
    """Per-input-channel magnitude of W (out, in) as float64 (in,): 'absmax' or 'energy' (mean W^2)."""
    if kind == "absmax":
        return torch.maximum(w.amax(dim=0), -w.amin(dim=0)).to(torch.float64).cpu().numpy()
    if kind == "energy":
        return (w.to(torch.float64) ** 2).mean(dim=0).cpu().numpy()
    raise ValueError(f"unknown channel metric {kind!r}")


def descending_order(metric: np.ndarray) -> np.ndarray:
    """Channel indices by decreasing metric; ties keep the lower index first (deterministic)."""
    return np.argsort(-metric, kind="stable")


def zigzag_permutation(metric: np.ndarray, block: int) -> np.ndarray:
    """The DuQuant zigzag permutation (int64, (in,)) for blocks of `block` channels."""
    n = metric.shape[0]
    nb = -(-n // block)
    if n % block == 0:  # equal blocks: rank r goes to block sweep[r mod 2nb] (vectorised, same result)
        order = descending_order(metric)
        sweep = np.concatenate([np.arange(nb), np.arange(nb - 1, -1, -1)])
        owner = sweep[np.arange(n) % (2 * nb)]
        return order[np.argsort(owner, kind="stable")].astype(np.int64)
    caps = [block] * nb
    caps[-1] = n - (nb - 1) * block
    members: list[list[int]] = [[] for _ in range(nb)]
    sweep = list(range(nb)) + list(range(nb - 1, -1, -1))  # forward then backward
    pos = 0
    for ch in descending_order(metric):
        while len(members[sweep[pos]]) >= caps[sweep[pos]]:
            pos = (pos + 1) % len(sweep)
        members[sweep[pos]].append(int(ch))
        pos = (pos + 1) % len(sweep)
    return np.concatenate([np.asarray(m, dtype=np.int64) for m in members])


def interleave_permutation(energy: np.ndarray) -> np.ndarray:
    """The openpi_duquant order (int64, (in,)): sorted by energy, interleaved from both ends."""
    order = descending_order(energy)
    n = order.shape[0]
    out = np.empty(n, dtype=np.int64)
    out[0::2] = order[: (n + 1) // 2]
    out[1::2] = order[::-1][: n // 2]
    return out


def compute_permutation(w: torch.Tensor, method: str, block: int, metric: str = "absmax") -> np.ndarray | None:
    """Permutation of W's input channels by `method` ('zigzag', 'interleave', 'none' -> None)."""
    if method == "none":
        return None
    if method == "zigzag":
        return zigzag_permutation(channel_metric(w, metric), block)
    if method == "interleave":
        return interleave_permutation(channel_metric(w, "energy"))
    raise ValueError(f"unknown permutation {method!r}")
