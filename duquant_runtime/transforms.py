"""DuQuant transforms as pure functions over compact block-diagonal rotations.

Notation (docs/algorithm.md has the math): W is (out, in); ``perm`` an index vector of length
``in`` with x P = x[..., perm]; ``r_in`` a (n_blocks, B, B) stack whose block-diagonal
BD(r_in) is (n_blocks*B, n_blocks*B). When ``in`` is not a multiple of B, the last block holds
its r x r rotation in the top-left corner and the identity elsewhere; inputs are zero-padded to
n_blocks*B, rotated and cut back, which is exact.

    W_t = BD(r_out)^T  W P  BD(r_in)                    (transform_weight)
    y   = ((x P BD(r_in)) W_t^T) BD(r_out)^T + b        (input_transform, output_restore)

With nothing quantized, y equals x W^T + b up to floating-point rounding.
All functions compute in the dtype of their inputs; callers pass float32 (or wider).
"""

from __future__ import annotations

import torch


def apply_blocks(x: torch.Tensor, blocks: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """x (..., n) @ BD(blocks) (or @ BD(blocks)^T with transpose=True); blocks (nb, B, B)."""
    nb, b, _ = blocks.shape
    n = x.shape[-1]
    padded = nb * b
    if not (padded - b < n <= padded):
        raise ValueError(f"{n} features do not fit {nb} blocks of {b}")
    lead = x.shape[:-1]
    if n != padded:
        x = torch.nn.functional.pad(x, (0, padded - n))
    xb = x.reshape(-1, nb, b).transpose(0, 1)  # (nb, M, B)
    r = blocks.transpose(1, 2) if transpose else blocks
    yb = torch.bmm(xb, r)  # (nb, M, B)
    y = yb.transpose(0, 1).reshape(*lead, padded)
    return y[..., :n] if n != padded else y


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Index vector inv with inv[perm[i]] = i."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


def _mul_column_blocks(w: torch.Tensor, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
    """W (rows, n) @ BD(blocks) (or BD(blocks)^T): on the CPU one matmul per column block (no
    transposed copies); on a GPU one batched matmul (one launch instead of one per block)."""
    if w.device.type != "cpu":
        return apply_blocks(w, blocks, transpose=transpose)
    out = torch.empty_like(w)
    b = blocks.shape[1]
    for i in range(blocks.shape[0]):
        sl = slice(i * b, min((i + 1) * b, w.shape[1]))
        n = sl.stop - sl.start
        r = blocks[i, :n, :n]
        out[:, sl] = w[:, sl] @ (r.t() if transpose else r)
    return out


def _mul_row_blocks(w: torch.Tensor, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
    """BD(blocks)^T W (or BD(blocks) W with transpose=True) for W (n, cols), one matmul per row block
    (on a GPU: one batched matmul)."""
    if w.device.type != "cpu":
        return apply_blocks(w.t(), blocks, transpose=transpose).t()  # (W^T BD)^T = BD^T W
    out = torch.empty_like(w)
    b = blocks.shape[1]
    for i in range(blocks.shape[0]):
        sl = slice(i * b, min((i + 1) * b, w.shape[0]))
        n = sl.stop - sl.start
        r = blocks[i, :n, :n]
        out[sl] = (r if transpose else r.t()) @ w[sl]
    return out


def transform_weight(w: torch.Tensor, perm: torch.Tensor | None, r_in: torch.Tensor,
                     r_out: torch.Tensor | None) -> torch.Tensor:
    """W_t = BD(r_out)^T W P BD(r_in) for W (out, in); perm/r_out None mean identity."""
    _check_blocks(w.shape[1], r_in, "r_in")
    a = _mul_column_blocks(w.index_select(1, perm) if perm is not None else w, r_in, transpose=False)
    if r_out is not None:
        _check_blocks(w.shape[0], r_out, "r_out")
        a = _mul_row_blocks(a, r_out, transpose=False)
    return a


def restore_weight(w_t: torch.Tensor, perm: torch.Tensor | None, r_in: torch.Tensor,
                   r_out: torch.Tensor | None) -> torch.Tensor:
    """Inverse of `transform_weight`: W = BD(r_out) W_t BD(r_in)^T P^T."""
    a = w_t
    if r_out is not None:
        _check_blocks(w_t.shape[0], r_out, "r_out")
        a = _mul_row_blocks(a, r_out, transpose=True)
    _check_blocks(w_t.shape[1], r_in, "r_in")
    a = _mul_column_blocks(a, r_in, transpose=True)
    if perm is not None:
        a = a[:, inverse_permutation(perm)]
    return a


def _check_blocks(n: int, blocks: torch.Tensor, what: str) -> None:
    nb, b, _ = blocks.shape
    if not (nb * b - b < n <= nb * b):
        raise ValueError(f"{what}: {n} features do not fit {nb} blocks of {b}")


def input_transform(x: torch.Tensor, perm: torch.Tensor | None, r_in: torch.Tensor) -> torch.Tensor:
    """x (..., in) -> x P BD(r_in)."""
    if perm is not None:
        x = x.index_select(-1, perm)
    return apply_blocks(x, r_in)


def output_restore(y: torch.Tensor, r_out: torch.Tensor | None) -> torch.Tensor:
    """y (..., out) in the rotated output basis -> y BD(r_out)^T (identity when r_out is None)."""
    return y if r_out is None else apply_blocks(y, r_out, transpose=True)


def n_blocks(features: int, block: int) -> int:
    """Number of blocks of size `block` covering `features` (the last may be partial)."""
    return -(-features // block)
