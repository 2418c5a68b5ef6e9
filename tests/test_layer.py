"""duquant_pack.layer.compute_layer: one weight -> permutation, rotations, scales, stats."""

import dataclasses

import numpy as np
import pytest
import torch

from duquant_pack.layer import LayerSpec, compute_layer
from duquant_runtime.quant import fake_quantize_rows
from duquant_runtime.transforms import (input_transform, n_blocks, output_restore, restore_weight,
                                        transform_weight)

from _util import max_rel, ortho_err

SPEC = LayerSpec(wbits=4, block=64, block_out=64, permute="zigzag", permute_metric="absmax", scale="mse")


def _w(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, :: max(1, in_f // 5)] *= 30  # outlier input channels
    return w


def _tensors(res):
    perm = torch.from_numpy(res.perm.astype(np.int64)) if res.perm is not None else None
    r_in = torch.from_numpy(res.r_in)
    r_out = torch.from_numpy(res.r_out) if res.r_out is not None else None
    return perm, r_in, r_out


@pytest.mark.parametrize("out_f,in_f,block,block_out", [(48, 128, 64, 64), (70, 130, 64, 32), (16, 20, 64, 64),
                                                       (40, 64, 64, None)])
def test_layer_result_shapes_and_orthogonality(out_f, in_f, block, block_out):
    spec = dataclasses.replace(SPEC, block=block, block_out=block_out)
    res = compute_layer(_w(out_f, in_f), spec)
    b_in = min(block, in_f)
    assert res.block_in == b_in
    assert res.r_in.dtype == np.float32 and res.r_in.shape == (n_blocks(in_f, b_in), b_in, b_in)
    assert ortho_err(torch.from_numpy(res.r_in)) < 1e-5
    assert res.perm.dtype == np.int32 and np.array_equal(np.sort(res.perm), np.arange(in_f))
    if block_out is None:
        assert res.r_out is None and res.block_out is None
    else:
        b_out = min(block_out, out_f)
        assert res.block_out == b_out
        assert res.r_out.shape == (n_blocks(out_f, b_out), b_out, b_out)
        assert ortho_err(torch.from_numpy(res.r_out)) < 1e-5
    assert res.weight_scale.dtype == np.float32 and res.weight_scale.shape == (out_f,)
    assert bool((res.weight_scale > 0).all())


@pytest.mark.parametrize("out_f,in_f,block,block_out", [(48, 128, 64, 64), (70, 130, 64, 32), (16, 20, 64, None)])
def test_unquantized_equivalence_through_computed_transforms(out_f, in_f, block, block_out):
    spec = dataclasses.replace(SPEC, wbits=0, block=block, block_out=block_out)
    w = _w(out_f, in_f, seed=3)
    res = compute_layer(w, spec)
    assert res.weight_scale is None and res.stats == {}
    perm, r_in, r_out = _tensors(res)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(out_f, generator=torch.Generator().manual_seed(5))
    w_t = transform_weight(w, perm, r_in, r_out)
    y = output_restore(input_transform(x, perm, r_in) @ w_t.T, r_out) + bias
    assert max_rel(y, x.double() @ w.double().T + bias.double()) < 1e-5
    assert max_rel(restore_weight(w_t, perm, r_in, r_out), w) < 1e-5


def test_deterministic():
    w = _w(50, 100, seed=8)
    a, b = compute_layer(w, SPEC), compute_layer(w.clone(), SPEC)
    for f in ("perm", "r_in", "r_out", "weight_scale"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert a.stats == b.stats


def test_scales_fit_the_transformed_weight_and_stats_are_consistent():
    w = _w(64, 128, seed=2)
    res = compute_layer(w, SPEC)
    perm, r_in, r_out = _tensors(res)
    w_t = transform_weight(w, perm, r_in, r_out)
    s = torch.from_numpy(res.weight_scale)
    deq = restore_weight(fake_quantize_rows(w_t, s, 4), perm, r_in, r_out)
    rel = float((deq.double() - w.double()).norm() / w.double().norm())
    assert res.stats["w_rel_err"] == pytest.approx(rel, rel=1e-4)
    assert res.stats["w_fro"] == pytest.approx(float(w.double().norm()), rel=1e-6)  # float32 row sums
    # DuQuant transforms beat plain per-row round-to-nearest on a weight with outlier channels
    assert 0 < res.stats["w_rel_err"] < res.stats["rtn_rel_err"]


def test_permute_none_and_interleave():
    w = _w(20, 48, seed=6)
    none = compute_layer(w, dataclasses.replace(SPEC, permute="none"))
    assert none.perm is None
    inter = compute_layer(w, dataclasses.replace(SPEC, permute="interleave"))
    zig = compute_layer(w, SPEC)
    assert np.array_equal(np.sort(inter.perm), np.arange(48))
    assert not np.array_equal(inter.perm, zig.perm)


def test_spec_changes_change_the_result():
    w = _w(32, 96, seed=9)
    base = compute_layer(w, SPEC)
    other_block = compute_layer(w, dataclasses.replace(SPEC, block=32))
    assert other_block.r_in.shape == (3, 32, 32) and base.r_in.shape == (2, 64, 64)
    max_scale = compute_layer(w, dataclasses.replace(SPEC, scale="max"))
    assert max_scale.stats["w_rel_err"] >= base.stats["w_rel_err"]
    eight = compute_layer(w, dataclasses.replace(SPEC, wbits=8))
    assert eight.stats["w_rel_err"] < base.stats["w_rel_err"]
