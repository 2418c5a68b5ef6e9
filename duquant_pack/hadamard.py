"""Data-free block rotations: block Hadamard and seeded random orthogonal blocks.

Both return R_in stacks (nb, B, B) float64 in the layout of `rotation.input_rotations`: a partial
last block (r < B channels) holds its r x r rotation in the top-left corner of a B x B identity.

- `hadamard`: the normalised Sylvester Hadamard matrix H_n / sqrt(n) for n a power of two. For a
  block size n that is not a power of two, the block is kron(Q, H_d / sqrt(d)) with d the largest
  power-of-two divisor of n and Q a seeded random orthogonal (n/d x n/d) matrix, so every
  coordinate is still mixed with every other (for odd n, d = 1 and the block is random).
- `random`: a seeded random orthogonal matrix per block (QR of a Gaussian matrix, signs fixed so
  that diag(R) > 0: Haar distributed, and deterministic for a seed).
"""

from __future__ import annotations

import hashlib

import torch


def sylvester_hadamard(n: int) -> torch.Tensor:
    """H_n / sqrt(n) (n, n) float64 for n a power of two (orthogonal, symmetric)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _generator(seed: int, what: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{what}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_orthogonal(n: int, seed: int, what: str = "") -> torch.Tensor:
    """A Haar-random orthogonal (n, n) float64 matrix, deterministic for (seed, what, n)."""
    g = _generator(seed, f"{what}/{n}")
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return (q * d).contiguous()


def hadamard_block(n: int, seed: int = 0) -> torch.Tensor:
    """One (n, n) float64 Hadamard-type rotation: H_n/sqrt(n) for powers of two, else kron(Q, H_d/sqrt(d))."""
    d = n & -n  # largest power-of-two divisor
    if d == n:
        return sylvester_hadamard(n)
    return torch.kron(random_orthogonal(n // d, seed, "hadamard-cofactor"), sylvester_hadamard(d))


def _stack(features: int, block: int, make) -> torch.Tensor:
    nb = -(-features // block)
    tail = features - (nb - 1) * block
    rot = torch.empty(nb, block, block, dtype=torch.float64)
    for k in range(nb):
        if k == nb - 1 and tail != block:
            rot[k] = torch.eye(block, dtype=torch.float64)
            rot[k, :tail, :tail] = make(tail, k)
        else:
            rot[k] = make(block, k)
    return rot


def hadamard_rotations(features: int, block: int, seed: int = 0) -> torch.Tensor:
    """R (nb, B, B) float64: a block Hadamard rotation for every block of `features` channels."""
    return _stack(features, block, lambda n, k: hadamard_block(n, seed))


def random_rotations(features: int, block: int, seed: int = 0) -> torch.Tensor:
    """R (nb, B, B) float64: an independent seeded random orthogonal matrix per block."""
    return _stack(features, block, lambda n, k: random_orthogonal(n, seed, f"block{k}"))
