"""Per-block orthogonal rotations from the weight's principal axes (no SVD of the full block).

For a block of columns W_b (out, B) the rotation is the orthonormal eigenvector matrix of the
B x B Gram matrix W_b^T W_b: the right singular vectors of W_b, i.e. the left singular vectors
of W_b^T that the openpi_duquant fork took from a full SVD. Computed in float64 from a batched
Gram matrix and `eigh`; columns ordered by decreasing eigenvalue, signs canonical (the
largest-magnitude entry of each column is positive; on a tie, the first of them).
A partial last block (r < B columns) gets its r x r rotation in the top-left corner of a B x B
identity.
"""

from __future__ import annotations

import torch


def column_block_grams(a: torch.Tensor, block: int) -> torch.Tensor:
    """Gram matrices A_b^T A_b (nb, block, block) float64 of column blocks of a (rows, cols).

    A partial last block is zero-padded (its padding rows/cols of the Gram matrix are zero).
    """
    rows, cols = a.shape
    nb = -(-cols // block)
    a64 = a.to(torch.float64)
    if nb * block != cols:
        a64 = torch.nn.functional.pad(a64, (0, nb * block - cols))
    ab = a64.reshape(rows, nb, block).permute(1, 2, 0)  # (nb, B, rows)
    return torch.bmm(ab, ab.transpose(1, 2))


def principal_rotations(grams: torch.Tensor, last_block_size: int) -> torch.Tensor:
    """Canonical eigenvector rotations (nb, B, B) float64 of symmetric Gram matrices (nb, B, B)."""
    nb, b, _ = grams.shape
    rot = torch.empty_like(grams)
    full = nb if last_block_size == b else nb - 1
    if full:
        rot[:full] = _canonical_eigvecs(grams[:full])
    if full < nb:
        r = last_block_size
        rot[-1] = torch.eye(b, dtype=grams.dtype)
        rot[-1, :r, :r] = _canonical_eigvecs(grams[-1:, :r, :r])[0]
    return rot


def _canonical_eigvecs(g: torch.Tensor) -> torch.Tensor:
    _, vecs = torch.linalg.eigh(g)  # ascending eigenvalues
    vecs = vecs.flip(-1)  # descending, like singular vectors
    idx = vecs.abs().argmax(dim=1, keepdim=True)  # first max per column
    signs = torch.sign(torch.gather(vecs, 1, idx))
    signs[signs == 0] = 1
    return vecs * signs


def input_rotations(w_perm: torch.Tensor, block: int) -> torch.Tensor:
    """R_in (nb, B, B) float64 for the permuted weight W P (out, in)."""
    cols = w_perm.shape[1]
    return principal_rotations(column_block_grams(w_perm, block), cols - (-(-cols // block) - 1) * block)


def output_rotations(w: torch.Tensor, block: int) -> torch.Tensor:
    """R_out (nb, B, B) float64 from row blocks of W (out, in): eigenvectors of W_r W_r^T.

    W_r W_r^T is unchanged by the orthogonal input transform, so W or W P R_in give the same R_out.
    """
    return input_rotations(w.t(), block)
