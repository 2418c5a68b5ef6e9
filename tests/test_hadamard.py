"""duquant_pack.hadamard and greedy: every rotation kind is orthogonal, has the partial-block layout,
and is deterministic for a seed."""

import pytest
import torch

from duquant_pack.greedy import greedy_block, greedy_rotations, uniform_householder
from duquant_pack.hadamard import hadamard_block, hadamard_rotations, random_rotations, sylvester_hadamard

from _util import ortho_err


@pytest.mark.parametrize("make", [hadamard_rotations, random_rotations])
@pytest.mark.parametrize("features,block", [(128, 64), (100, 64), (96, 48), (45, 15), (7, 7)])
def test_rotations_orthogonal_deterministic_and_partial_layout(make, features, block):
    r = make(features, block, seed=3)
    nb = -(-features // block)
    assert r.shape == (nb, block, block) and r.dtype == torch.float64
    assert ortho_err(r) < 1e-12
    assert torch.equal(r, make(features, block, seed=3))  # deterministic
    tail = features - (nb - 1) * block
    if tail != block:
        eye = torch.eye(block, dtype=torch.float64)
        assert torch.equal(r[-1, tail:], eye[tail:]) and torch.equal(r[-1, :, tail:], eye[:, tail:])


def test_seed_changes_random_blocks_and_blocks_differ():
    a, b = random_rotations(128, 64, seed=0), random_rotations(128, 64, seed=1)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a[0], a[1])  # independent per block


def test_hadamard_power_of_two_is_sylvester_and_spreads_evenly():
    h = hadamard_block(64)
    assert torch.equal(h, sylvester_hadamard(64))
    assert torch.allclose(h.abs(), torch.full((64, 64), 1 / 8, dtype=torch.float64))
    # non-power-of-two: kron of a random orthogonal cofactor and H_d mixes every coordinate
    h48 = hadamard_block(48, seed=0)
    assert ortho_err(h48[None]) < 1e-12 and bool((h48 != 0).all())
    with pytest.raises(ValueError):
        sylvester_hadamard(48)


def test_greedy_lowers_the_outlier_bound_and_is_orthogonal():
    m = torch.ones(64, dtype=torch.float64)
    m[5] = 100.0
    r = greedy_block(m)
    assert ortho_err(r[None]) < 1e-12
    assert float((m @ r.abs()).max()) < 100.0 / 2  # the bound fell from 100 ...
    assert float(r[5].abs().max()) < 0.3  # ... because channel 5 is spread over the block
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 64, dtype=torch.float64, generator=g)
    x[:, 5] *= 100.0
    assert float((x @ r).abs().max()) < float(x.abs().max()) / 2.5  # so the activation max falls
    assert torch.equal(r, greedy_block(m))  # deterministic for a seed ...
    assert not torch.equal(r, greedy_block(m, seed=1))  # ... whose random factor Q'_t it changes
    flat = greedy_block(torch.ones(64, dtype=torch.float64))
    assert torch.equal(flat, torch.eye(64, dtype=torch.float64))  # nothing to spread: identity
    h = uniform_householder(16)
    assert torch.allclose(h[0], torch.full((16,), 0.25, dtype=torch.float64))
    rot = greedy_rotations(torch.rand(100, generator=torch.Generator().manual_seed(0)) * 10, 64)
    assert rot.shape == (2, 64, 64) and ortho_err(rot) < 1e-12
