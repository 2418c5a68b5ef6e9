"""duquant_pack.permutation: zigzag (DuQuant) and interleave (openpi_duquant) channel orders."""

import numpy as np
import pytest
import torch

from duquant_pack.permutation import (channel_metric, compute_permutation, descending_order,
                                      interleave_permutation, zigzag_permutation)


def _is_perm(p, n):
    return p.shape == (n,) and np.array_equal(np.sort(p), np.arange(n))


@pytest.mark.parametrize("n,block", [(8, 2), (12, 4), (130, 64), (20, 64), (64, 64), (7, 3), (1, 4), (257, 16)])
def test_zigzag_is_a_permutation(n, block):
    metric = np.random.default_rng(n).standard_normal(n) ** 2
    p = zigzag_permutation(metric, block)
    assert p.dtype == np.int64
    assert _is_perm(p, n)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 31])
def test_interleave_is_a_permutation(n):
    p = interleave_permutation(np.random.default_rng(n).random(n))
    assert _is_perm(p, n)


@pytest.mark.parametrize("n,block", [(8, 2), (12, 4), (130, 64), (256, 64), (100, 7), (65, 64)])
def test_zigzag_spreads_largest_channels_over_distinct_blocks(n, block):
    metric = np.random.default_rng(100 + n).standard_normal(n) ** 2
    p = zigzag_permutation(metric, block)
    nb = -(-n // block)
    block_of = np.empty(n, dtype=np.int64)
    block_of[p] = np.arange(n) // block  # channel -> block it lands in
    top = np.argsort(-metric, kind="stable")[:nb]
    assert len(set(block_of[top].tolist())) == nb
    # each block's members are listed in descending metric order
    for b in range(nb):
        members = p[b * block:(b + 1) * block]
        assert np.all(np.diff(metric[members]) <= 0)


def test_zigzag_deals_forward_then_backward():
    metric = np.arange(8, dtype=np.float64)[::-1].copy()  # channel i has rank i
    # blocks of 2: sweep 0,1,2,3,3,2,1,0 -> b0={0,7} b1={1,6} b2={2,5} b3={3,4}
    assert zigzag_permutation(metric, 2).tolist() == [0, 7, 1, 6, 2, 5, 3, 4]
    metric = np.arange(12, dtype=np.float64)[::-1].copy()
    # blocks of 4: sweep 0,1,2,2,1,0,0,1,2,2,1,0
    assert zigzag_permutation(metric, 4).tolist() == [0, 5, 6, 11, 1, 4, 7, 10, 2, 3, 8, 9]


def test_zigzag_partial_last_block_takes_part_until_full():
    metric = np.arange(5, dtype=np.float64)[::-1].copy()
    # blocks of 2 (caps 2,2,1): ranks 0,1,2 -> b0,b1,b2; rank 3 -> b2 full, so b1; rank 4 -> b0
    assert zigzag_permutation(metric, 2).tolist() == [0, 4, 1, 3, 2]


def test_zigzag_ties_are_deterministic():
    metric = np.ones(6)
    assert descending_order(metric).tolist() == list(range(6))
    assert zigzag_permutation(metric, 3).tolist() == zigzag_permutation(metric.copy(), 3).tolist() == [0, 3, 4, 1, 2, 5]


def test_interleave_matches_old_rule():
    energy = np.array([5.0, 1.0, 9.0, 3.0, 7.0])  # order by energy: o = [2, 4, 0, 3, 1]
    o = [2, 4, 0, 3, 1]
    assert interleave_permutation(energy).tolist() == [o[0], o[4], o[1], o[3], o[2]]
    energy = np.array([4.0, 3.0, 2.0, 1.0, 8.0, 7.0])  # o = [4, 5, 0, 1, 2, 3]
    o = [4, 5, 0, 1, 2, 3]
    assert interleave_permutation(energy).tolist() == [o[0], o[5], o[1], o[4], o[2], o[3]]


def test_channel_metrics():
    w = torch.tensor([[1.0, -4.0, 0.0], [-3.0, 2.0, 0.5]])
    np.testing.assert_allclose(channel_metric(w, "absmax"), [3.0, 4.0, 0.5])
    np.testing.assert_allclose(channel_metric(w, "energy"), [5.0, 10.0, 0.125])
    with pytest.raises(ValueError):
        channel_metric(w, "median")


def test_compute_permutation_methods():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 40, generator=g)
    w[:, 5] *= 50  # a huge-absmax channel
    assert compute_permutation(w, "none", 8) is None
    z = compute_permutation(w, "zigzag", 8, "absmax")
    assert z[0] == 5  # the largest channel leads the first block
    assert np.array_equal(z, zigzag_permutation(channel_metric(w, "absmax"), 8))
    assert np.array_equal(compute_permutation(w, "zigzag", 8, "energy"),
                          zigzag_permutation(channel_metric(w, "energy"), 8))
    # interleave always sorts by energy, whatever the metric argument
    assert np.array_equal(compute_permutation(w, "interleave", 8, "absmax"),
                          interleave_permutation(channel_metric(w, "energy")))
    with pytest.raises(ValueError):
        compute_permutation(w, "random", 8)
