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

_CHUNK_ELEMS = 1 << 18  # float64 elements per row chunk (2 MiB: stays in cache)

def column_block_grams(a: torch.Tensor, block: int) -> torch.Tensor:
    """Gram matrices A_b^T A_b (nb, block, block) float64 of column blocks of a (rows, cols).

    Accumulated over chunks of rows, each copied into a cache-sized contiguous float64 buffer
    (nb, rows_chunk, B). A partial last block is zero-padded (its padding rows/cols of the Gram
    matrix are zero). Runs on the device of `a`.
    """
    rows, cols = a.shape
    nb = -(-cols // block)
    pad = nb * block - cols
    g = torch.zeros(nb, block, block, dtype=torch.float64, device=a.device)
    step = max(1, _CHUNK_ELEMS // (nb * block)) if a.device.type == "cpu" else rows
    buf = torch.zeros(nb, min(step, rows), block, dtype=torch.float64, device=a.device)
    for r0 in range(0, rows, step):
        x = a[r0:r0 + step]
        n = x.shape[0]
        xb = buf[:, :n]
        if pad:
            # the buffer's padding columns (last block) stay zero
            xb[:nb - 1].copy_(x[:, :(nb - 1) * block].reshape(n, nb - 1, block).transpose(0, 1))
            xb[nb - 1, :, :block - pad].copy_(x[:, (nb - 1) * block:])
        else:
            xb.copy_(x.reshape(n, nb, block).transpose(0, 1))
        g.baddbmm_(xb.transpose(1, 2), xb)
    return g


def row_block_grams(a: torch.Tensor, block: int) -> torch.Tensor:
    """Gram matrices A_r A_r^T (nb, block, block) float64 of row blocks of a (rows, cols).

    Accumulated over chunks of columns in a contiguous float64 buffer (nb, B, cols_chunk); a
    partial last block's padding rows/cols are zero. Runs on the device of `a`.
    """
    rows, cols = a.shape
    nb = -(-rows // block)
    g = torch.zeros(nb, block, block, dtype=torch.float64, device=a.device)
    step = max(1, _CHUNK_ELEMS // (nb * block)) if a.device.type == "cpu" else cols
    buf = torch.zeros(nb * block, min(step, cols), dtype=torch.float64, device=a.device)
    for c0 in range(0, cols, step):
        x = a[:, c0:c0 + step]
        n = x.shape[1]
        xb = buf[:, :n]
        xb[:rows].copy_(x)  # rows past `rows` (padding) stay zero
        xb = xb.reshape(nb, block, n)
        g.baddbmm_(xb, xb.transpose(1, 2))
    return g


def principal_rotations(grams: torch.Tensor, last_block_size: int) -> torch.Tensor:
    """Canonical eigenvector rotations (nb, B, B) float64 of symmetric Gram matrices (nb, B, B).

    The eigendecomposition always runs on the CPU (LAPACK), whatever the device of `grams` (the
    result is returned there): GPU batched solvers are slow for many 64x64 matrices, and one
    implementation for both keeps CPU and CUDA builds in agreement."""
    if grams.device.type != "cpu":
        return principal_rotations(grams.cpu(), last_block_size).to(grams.device)
    nb, b, _ = grams.shape
    rot = torch.empty_like(grams)
    full = nb if last_block_size == b else nb - 1
    if full:
        rot[:full] = _canonical_eigvecs(grams[:full])
    if full < nb:
        r = last_block_size
        rot[-1] = torch.eye(b, dtype=grams.dtype, device=grams.device)
        rot[-1, :r, :r] = _canonical_eigvecs(grams[-1:, :r, :r])[0]
    return rot


NULL_RTOL = 1e-10  # eigenvalues below NULL_RTOL * largest (or exactly 0) span the null space


def _canonical_eigvecs(g: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (n, B, B) of symmetric g, by decreasing eigenvalue, with canonical signs; the
    null space of a rank-deficient g (fewer rows than B, zero columns) gets a canonical basis."""
    vals, vecs = torch.linalg.eigh(g)  # ascending eigenvalues
    vals, vecs = vals.flip(-1), vecs.flip(-1)  # descending, like singular vectors
    null = vals <= NULL_RTOL * vals[:, :1].clamp_min(0)
    for i in torch.nonzero(null.any(dim=1)).flatten().tolist():
        k = int((~null[i]).sum())  # eigenvalues are sorted: the first k are the range
        vecs[i, :, k:] = _null_space_basis(vecs[i, :, :k])
    idx = vecs.abs().argmax(dim=1, keepdim=True)  # first max per column
    signs = torch.sign(torch.gather(vecs, 1, idx))
    signs[signs == 0] = 1
    return vecs * signs


def _null_space_basis(v: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (B, B - k) of the complement of the orthonormal columns v (B, k), built
    from the unit vectors: repeatedly the e_i with the largest residual (lowest i on a tie),
    orthogonalized. Any solver's choice of null vectors thus becomes the same basis.

    The residual of e_i against the orthonormal basis Q so far has squared norm 1 - |Q[i, :]|^2,
    so the choice needs only Q's row norms, updated as each vector joins: O(B k) per vector
    instead of forming the B x B projector (O(B^2 k)), which took seconds for one 512-wide block."""
    b, k = v.shape
    basis = torch.empty(b, b, dtype=v.dtype)
    basis[:, :k] = v
    captured = (v * v).sum(dim=1)  # |Q[i, :]|^2: how much of e_i the basis already spans
    for j in range(b - k):
        q = basis[:, :k + j]
        i = int(torch.argmax(1.0 - captured))  # the largest residual; argmax takes the first of ties
        u = torch.zeros(b, dtype=v.dtype)
        u[i] = 1.0
        u = u - q @ q[i]  # e_i - Q Q^T e_i
        u = u - q @ (q.t() @ u)  # re-orthogonalize once more (numerical safety)
        u = u / u.norm()
        basis[:, k + j] = u
        captured += u * u
    return basis[:, k:]


def input_rotations(w_perm: torch.Tensor, block: int) -> torch.Tensor:
    """R_in (nb, B, B) float64 for the permuted weight W P (out, in)."""
    cols = w_perm.shape[1]
    return principal_rotations(column_block_grams(w_perm, block), cols - (-(-cols // block) - 1) * block)


def output_rotations(w: torch.Tensor, block: int) -> torch.Tensor:
    """R_out (nb, B, B) float64 from row blocks of W (out, in): eigenvectors of W_r W_r^T.

    W_r W_r^T is unchanged by the orthogonal input transform, so W or W P R_in give the same R_out.
    """
    rows = w.shape[0]
    return principal_rotations(row_block_grams(w, block), rows - (-(-rows // block) - 1) * block)
