"""duquant_runtime.transforms: block-diagonal rotations, permutations, forward/inverse transforms."""

import pytest
import torch

from duquant_runtime.transforms import (apply_blocks, input_transform, inverse_permutation, n_blocks,
                                        output_restore, restore_weight, transform_weight)

from _util import max_rel, random_orthogonal_blocks


def _dense_bd(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The dense (n, n) block-diagonal matrix BD(blocks) cut to n features."""
    nb, b, _ = blocks.shape
    full = torch.block_diag(*blocks)
    return full[:n, :n]


def _case(out_f, in_f, b_in, b_out, seed=0, dtype=torch.float64, permute=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).to(dtype)
    perm = torch.randperm(in_f, generator=g) if permute else None
    nb_in = n_blocks(in_f, b_in)
    r_in = random_orthogonal_blocks(nb_in, b_in, tail=in_f - (nb_in - 1) * b_in, seed=seed + 1, dtype=dtype)
    r_out = None
    if b_out is not None:
        nb_out = n_blocks(out_f, b_out)
        r_out = random_orthogonal_blocks(nb_out, b_out, tail=out_f - (nb_out - 1) * b_out, seed=seed + 2,
                                         dtype=dtype)
    return w, perm, r_in, r_out


SHAPES = [  # (out, in, B_in, B_out)
    (32, 128, 64, None),   # divides
    (48, 130, 64, None),   # in = 2*64 + 2: partial last block
    (16, 20, 64, None),    # in < B: one partial block
    (70, 130, 64, 32),     # partial blocks on both sides
    (13, 7, 3, 5),         # tiny odd sizes
    (64, 64, 64, 64),      # a single full block each side
]


def test_n_blocks():
    assert [n_blocks(f, 64) for f in (1, 63, 64, 65, 128, 130)] == [1, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("n,b", [(128, 64), (130, 64), (20, 64), (7, 3)])
def test_apply_blocks_matches_dense_block_diagonal(n, b):
    nb = n_blocks(n, b)
    blocks = random_orthogonal_blocks(nb, b, tail=n - (nb - 1) * b, seed=n)
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    dense = _dense_bd(blocks, n)
    torch.testing.assert_close(apply_blocks(x, blocks), x @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_blocks(x, blocks, transpose=True), x @ dense.T, rtol=0, atol=1e-12)
    # the inverse of a rotation is its transpose, also with a partial last block
    torch.testing.assert_close(apply_blocks(apply_blocks(x, blocks), blocks, transpose=True), x,
                               rtol=0, atol=1e-12)
    assert apply_blocks(x, blocks).shape == x.shape


def test_apply_blocks_rejects_wrong_feature_count():
    blocks = random_orthogonal_blocks(2, 8)
    with pytest.raises(ValueError):
        apply_blocks(torch.zeros(1, 8), blocks)  # fits 1 block, not 2
    with pytest.raises(ValueError):
        apply_blocks(torch.zeros(1, 17), blocks)


def test_inverse_permutation():
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    inv = inverse_permutation(perm)
    assert torch.equal(inv[perm], torch.arange(50))
    assert torch.equal(perm[inv], torch.arange(50))


@pytest.mark.parametrize("out_f,in_f,b_in,b_out", SHAPES)
def test_transform_matches_documented_formula(out_f, in_f, b_in, b_out):
    w, perm, r_in, r_out = _case(out_f, in_f, b_in, b_out)
    p = torch.eye(in_f, dtype=torch.float64)[:, perm]  # x P = x[..., perm]
    expect = w @ p @ _dense_bd(r_in, in_f)
    if r_out is not None:
        expect = _dense_bd(r_out, out_f).T @ expect
    torch.testing.assert_close(transform_weight(w, perm, r_in, r_out), expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("out_f,in_f,b_in,b_out", SHAPES)
def test_restore_inverts_transform_exactly_float64(out_f, in_f, b_in, b_out):
    w, perm, r_in, r_out = _case(out_f, in_f, b_in, b_out)
    w_t = transform_weight(w, perm, r_in, r_out)
    assert not torch.allclose(w_t, w)  # the transform does something
    torch.testing.assert_close(restore_weight(w_t, perm, r_in, r_out), w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("out_f,in_f,b_in,b_out", SHAPES)
def test_restore_inverts_transform_float32_rounding(out_f, in_f, b_in, b_out):
    w, perm, r_in, r_out = _case(out_f, in_f, b_in, b_out, dtype=torch.float32)
    back = restore_weight(transform_weight(w, perm, r_in, r_out), perm, r_in, r_out)
    assert back.dtype == torch.float32
    assert max_rel(back, w) < 1e-5


@pytest.mark.parametrize("out_f,in_f,b_in,b_out", SHAPES)
@pytest.mark.parametrize("permute", [True, False])
def test_unquantized_layer_equivalence(out_f, in_f, b_in, b_out, permute):
    """y = ((x P R_in) W_t^T) R_out^T + b equals x W^T + b (float32 rounding)."""
    w, perm, r_in, r_out = _case(out_f, in_f, b_in, b_out, seed=7, dtype=torch.float32, permute=permute)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    w_t = transform_weight(w, perm, r_in, r_out)
    y = output_restore(input_transform(x, perm, r_in) @ w_t.T, r_out) + bias
    ref = (x.double() @ w.double().T + bias.double())
    assert y.dtype == torch.float32 and y.shape == (2, 9, out_f)
    assert max_rel(y, ref) < 1e-5
    # float64 path is exact up to float64 rounding
    w64, r_in64 = w.double(), r_in.double()
    r_out64 = r_out.double() if r_out is not None else None
    y64 = output_restore(input_transform(x.double(), perm, r_in64) @ transform_weight(w64, perm, r_in64, r_out64).T,
                         r_out64) + bias.double()
    assert max_rel(y64, ref) < 1e-5  # float32 rotations are orthogonal only to ~1e-7


def test_output_restore_identity_without_rotation():
    y = torch.randn(4, 6)
    assert output_restore(y, None) is y


def test_partial_block_does_not_mix_padding_into_real_features():
    """in=20 < B=64: only the top-left 20x20 corner acts; a rotation that is not identity outside the
    corner would leak padding, the layout with identity there must not."""
    blocks = random_orthogonal_blocks(1, 64, tail=20, seed=5)
    x = torch.randn(4, 20, dtype=torch.float64)
    y = apply_blocks(x, blocks)
    torch.testing.assert_close(y, x @ blocks[0, :20, :20], rtol=0, atol=1e-12)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
