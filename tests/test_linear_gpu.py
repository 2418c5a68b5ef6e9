"""The fused GPU path of DuQuantLinear (kernels/w4a8.py) against its float32 reference path, on every
pi0.5 linear shape (needs CUDA and Triton; skipped otherwise: CI tests the reference path)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from duquant_runtime import DuQuantLinear
from duquant_runtime.kernels import fast_path_available
from duquant_runtime.pack import LayerPack
from duquant_runtime.quant import absmax_scales, pack_int4, quantize_rows
from duquant_runtime.transforms import input_transform, n_blocks

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and fast_path_available("cuda")),
                                reason="needs CUDA and Triton")

# (out, in) of the pi0.5 language model and action expert linears
PI05_SHAPES = [(2048, 2048), (256, 2048), (16384, 2048), (2048, 16384),
               (2048, 1024), (256, 1024), (1024, 2048), (4096, 1024), (1024, 4096)]
TOL = 2e-2  # relative Frobenius error: 16-bit/tf32 operands and the quantization ties they move


def _layer(out_f, in_f, seed, block=64, bias=False, smooth=False):
    g = torch.Generator().manual_seed(seed)
    orth = lambda n: torch.linalg.qr(torch.randn(n_blocks(n, block), block, block, generator=g,  # noqa: E731
                                                 dtype=torch.float64))[0].float().contiguous()
    r_in, r_out = orth(in_f), orth(out_f)
    w_t = torch.randn(out_f, in_f, generator=g) * 0.02
    scale = absmax_scales(w_t, 4)
    lp = LayerPack(name="l", in_features=in_f, out_features=out_f, wbits=4, block_in=block, block_out=block,
                   perm=torch.randperm(in_f, generator=g), r_in=r_in, r_out=r_out, weight_scale=scale, meta={},
                   qweight=pack_int4(quantize_rows(w_t, scale, 4)),
                   smooth=(torch.rand(in_f, generator=g) + 0.5) if smooth else None)
    lin = nn.Linear(in_f, out_f, bias=bias, device="meta", dtype=torch.bfloat16)
    if bias:
        lin.bias = nn.Parameter(torch.randn(out_f, generator=g).to(torch.bfloat16), requires_grad=False)
    return lin, lp


def _x(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g)
    x[:, torch.randperm(n, generator=g)[:3]] *= 50.0
    return x.cuda().to(torch.bfloat16)


def _check(q, m, seed):
    x = _x(m, q.in_features, seed)
    assert q.fast_path_reason(x) is None
    with torch.no_grad():
        fast = q(x)
        q.use_fast = False
        ref = q(x)
        q.use_fast = True
    assert fast.dtype == torch.bfloat16 and fast.shape == ref.shape
    assert bool(torch.isfinite(fast).all())
    err = float((fast.float() - ref.float()).norm() / ref.float().norm())
    assert err < TOL, f"{tuple(q.weight.shape)} M={m}: relative error {err:.2e}"
    return err


@pytest.mark.parametrize("out_f,in_f", PI05_SHAPES)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fast_path_matches_reference_on_pi05_shapes(out_f, in_f, mode):
    lin, lp = _layer(out_f, in_f, seed=out_f + in_f)
    q = DuQuantLinear.from_linear(lin, lp, abits=8, act_mode=mode, device="cuda", rot_dtype=torch.float16)
    if mode == "static":
        xt = input_transform(_x(256, in_f, 1).float(), q.perm, q.r_in.float())
        q.set_act_scale(xt.abs().amax(0) / 127 * 0.8)  # some values clip
    for m in (1, 50, 800):
        _check(q, m, seed=m)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fast_path_with_bias_smoothing_and_3d_input(mode):
    lin, lp = _layer(512, 1024, seed=3, bias=True, smooth=True)
    q = DuQuantLinear.from_linear(lin, lp, abits=8, act_mode=mode, device="cuda", rot_dtype=torch.float16)
    if mode == "static":
        xt = input_transform(_x(64, 1024, 1).float() / q.smooth, q.perm, q.r_in.float())
        q.set_act_scale(xt.abs().amax(0) / 127)
    _check(q, 33, seed=5)
    x = _x(6, 1024, 6).reshape(2, 3, 1024)
    with torch.no_grad():
        y = q(x)
        q.use_fast = False
        ref = q(x)
    assert y.shape == (2, 3, 512) and float((y.float() - ref.float()).norm() / ref.float().norm()) < TOL


def test_fast_path_dynamic_int8_gemm_is_exact_on_integer_data():
    """With an identity input rotation, no output rotation and values on the quantization grid,
    every stage is exact: the dynamic path must equal the reference bit for bit."""
    out_f, in_f = 256, 1024
    lin, lp = _layer(out_f, in_f, seed=9)
    eye = torch.eye(64).expand(in_f // 64, 64, 64).contiguous()
    lp = LayerPack(**{**lp.__dict__, "r_in": eye, "r_out": None, "block_out": None, "perm": None,
                      "weight_scale": torch.full((out_f,), 0.5)})
    q = DuQuantLinear.from_linear(lin, lp, abits=8, act_mode="dynamic", device="cuda", rot_dtype=torch.float16)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-127, 128, (40, in_f), generator=g).float()
    x[:, 0] = 127.0  # per-token scale exactly 1
    x = x.cuda().to(torch.bfloat16)
    with torch.no_grad():
        fast = q(x)
        q.use_fast = False
        ref = q(x)
    assert torch.equal(fast, ref)


def test_fallbacks_are_explained():
    lin, lp = _layer(256, 1024, seed=2)
    q = DuQuantLinear.from_linear(lin, lp, abits=8, act_mode="static", device="cuda")
    x = _x(4, 1024, 0)
    assert "calibrating" in q.fast_path_reason(x)
    assert "bf16/fp16" in q.fast_path_reason(x.float())
    q.use_fast = False
    assert q.fast_path_reason(x) == "use_fast is False"


def test_fast_path_on_integers_computed_on_the_gpu():
    """A layer whose integers are computed at load on the GPU (pack without stored integers):
    the packed weight must come out row-major and the fast path must match the reference
    (regression: a GPU-packed weight was column-major and read as row-major)."""
    out_f, in_f = 512, 1024
    _, lp = _layer(out_f, in_f, seed=4)
    lp = LayerPack(**{**lp.__dict__, "qweight": None})
    lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    q = DuQuantLinear.from_linear(lin, lp, abits=8, act_mode="dynamic", device="cuda", rot_dtype=torch.float16)
    assert q.qweight.is_contiguous()
    for m in (1, 50, 800):
        _check(q, m, seed=m)


def _group(shapes, seed, mode, bias=False):
    """DuQuantLinear members of one input group: the first member's perm/r_in/smooth for all."""
    members = []
    for i, (out_f, in_f) in enumerate(shapes):
        lin, lp = _layer(out_f, in_f, seed=seed + i, bias=bias, smooth=True)
        if members:
            first = members[0][1]
            lp = dataclasses.replace(lp, perm=first.perm, r_in=first.r_in, smooth=first.smooth)
        members.append((lin, lp))
    mods = [DuQuantLinear.from_linear(lin, lp, abits=8, act_mode=mode, device="cuda", rot_dtype=torch.float16)
            for lin, lp in members]
    if mode == "static":
        xt = input_transform(_x(256, shapes[0][1], 1).float() / mods[0].smooth, mods[0].perm, mods[0].r_in.float())
        for q in mods:
            q.set_act_scale(xt.abs().amax(0) / 127 * 0.8)
    return mods


# (tower, M, member shapes): the pi0.5 groups of --share-inputs
PI05_GROUPS = [("llm", 800, [(2048, 2048), (256, 2048), (256, 2048)]), ("llm", 800, [(16384, 2048)] * 2),
               ("llm", 1, [(16384, 2048)] * 2), ("expert", 50, [(2048, 1024), (256, 1024), (256, 1024)]),
               ("expert", 50, [(4096, 1024)] * 2)]


@pytest.mark.parametrize("tower,m,shapes", PI05_GROUPS)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_linked_group_matches_each_members_reference(tower, m, shapes, mode):
    from duquant_runtime.input_group import link_input_group
    mods = _group(shapes, seed=m + len(shapes), mode=mode, bias=tower == "expert")
    x = _x(m, shapes[0][1], seed=5)
    with torch.no_grad():
        alone = [q(x) for q in mods]
        link_input_group(mods)
        fused = [q(x) for q in mods]
        for q, y, y0 in zip(mods, fused, alone):
            q.use_fast = False
            ref = q(x)
            q.use_fast = True
            assert y.shape == ref.shape and y.dtype == torch.bfloat16
            assert float((y.float() - ref.float()).norm() / ref.float().norm()) < TOL
            assert float((y.float() - y0.float()).norm() / y0.float().norm()) < 5e-3  # fused vs alone
        assert all(y.untyped_storage().data_ptr() == fused[0].untyped_storage().data_ptr() for y in fused)


def test_linked_group_under_cuda_graphs_and_device_moves():
    from duquant_runtime.input_group import link_input_group
    mods = _group([(2048, 1024), (256, 1024), (256, 1024)], seed=7, mode="dynamic")
    link_input_group(mods)
    x = _x(50, 1024, seed=3)
    with torch.no_grad():
        eager = [q(x).clone() for q in mods]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            [q(x) for q in mods]
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = [q(x) for q in mods]
        x.copy_(_x(50, 1024, seed=4))
        g.replay()
        torch.cuda.synchronize()
        fresh = [q(x) for q in mods]
        for y, y1 in zip(outs, fresh):
            assert torch.equal(y, y1)
        assert not all(torch.equal(a, b) for a, b in zip(eager, fresh))
        for q in mods:  # a round trip copies the views apart; the next call links them again
            q.cpu()
            q.cuda()
        again = [q(x) for q in mods]
        assert all(torch.equal(a, b) for a, b in zip(again, fresh))
        assert len({q.qweight.untyped_storage().data_ptr() for q in mods}) == 1


@pytest.mark.parametrize("m,hidden,inter", [(800, 2048, 16384), (50, 1024, 4096), (1, 2048, 16384), (700, 2048, 16384)])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_token_minor_mlp_hidden_gives_the_same_block_output(m, hidden, inter, mode):
    """A gated MLP (linked gate/up, down) with gate/up writing token-minor (mlp_layout.py): at large
    M the hidden activation reaches down_proj with strides (1, M) (gate/up's rows padded to a multiple of
    16 tokens above 256, `w4a8.token_minor_row`; torch's product is dense) and the block output equals the
    row-major run bit for bit; at M <= 16 the layout stays row-major."""
    from duquant_runtime.input_group import link_input_group
    gate, up = _group([(inter, hidden)] * 2, seed=31, mode=mode)
    down = _group([(hidden, inter)], seed=37, mode=mode)[0]
    link_input_group([gate, up])
    x = _x(m, hidden, seed=9).reshape(1, m, hidden)

    def block():
        h = nn.functional.gelu(gate(x), approximate="tanh") * up(x)
        return h, down(h)

    with torch.no_grad():
        h_rows, y_rows = block()
        gate.token_minor_output = up.token_minor_output = True
        h_tm, y_tm = block()
    assert h_rows.stride(-1) == 1 and torch.equal(h_tm, h_rows)
    # torch's elementwise ops give a dense result: strides (1, M) even from gate/up rows padded past 256 tokens
    assert h_tm[0].stride() == ((1, m) if m > 16 else h_rows[0].stride())
    assert torch.equal(y_tm, y_rows)


@pytest.mark.parametrize("m,hidden,inter", [(800, 2048, 16384), (50, 1024, 4096), (1, 2048, 16384), (200, 1024, 4096),
                                            (128, 2048, 16384), (65, 2048, 16384), (700, 2048, 16384)])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
def test_fused_mlp_activation_gives_the_unfused_block_output(m, hidden, inter, mode, act):
    """down_proj.forward_product(gate, up, act) (mlp_activation.py: the hidden computed in the prep
    launch where the Triton prep runs, else by one elementwise launch before the Gluon activation
    passes: the language model at 128 and 800 tokens) equals down_proj(act(gate) * up) bit for
    bit on the pi0.5 MLP shapes, with gate/up linked and writing token-minor as apply_pack does."""
    from duquant_runtime.input_group import link_input_group
    from duquant_runtime.mlp_activation import ACTIVATIONS
    gate, up = _group([(inter, hidden)] * 2, seed=41, mode=mode)
    down = _group([(hidden, inter)], seed=43, mode=mode)[0]
    link_input_group([gate, up])
    gate.token_minor_output = up.token_minor_output = True
    x = _x(m, hidden, seed=5).reshape(1, m, hidden)
    with torch.no_grad():
        g, u = gate(x), up(x)
        unfused = down(ACTIVATIONS[act](g) * u)
        fused = down.forward_product(g, u, act)
        alone = down.forward_product(g, None, act)
        assert down.fast_path_reason(g) is None
        assert torch.equal(fused, unfused)
        assert torch.equal(alone, down(ACTIVATIONS[act](g)))
