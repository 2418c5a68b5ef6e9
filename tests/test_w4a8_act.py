"""The Gluon activation codes (kernels/w4a8_act.py).

- On an sm_90 GPU (skipped without, and without Gluon): the codes and scales of the Triton prep +
  quantize launches, up to quantization ties moved by the order of float32 sums; the whole layer
  within bf16 rounding of the Triton path; the Markstein quotient bit for bit div.rn.
- Without a GPU (Triton installed): which operands the kernel takes, and the sm_90 code Triton
  generates offline (16-byte cp.async, bf16 wgmma, relaxed atomics, vector code stores).
"""

from __future__ import annotations

import pytest
import torch

from _util import (assert_codes_within_ties, halfway_row, hard_rows, layer_err_vs_triton_launches, natural_columns,
                   w4a8_operands)
from duquant_runtime.kernels import device_capability, fast_path_available, triton_available


def _act_ready() -> bool:
    if not (torch.cuda.is_available() and fast_path_available("cuda")):
        return False
    from duquant_runtime.kernels import w4a8 as K
    return tuple(device_capability("cuda")) == (9, 0) and K._hopper_module(torch.device("cuda"), "w4a8_act") is not None


needs_act = pytest.mark.skipif(not _act_ready(), reason="needs an sm_90 GPU, Triton and Gluon")
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton not installed")

if _act_ready():  # a Gluon kernel that runs `_quotient` both ways (module level: Triton resolves globals)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from duquant_runtime.kernels import w4a8_act as A

    @gluon.jit
    def _quotients(v_ptr, s_ptr, fast_ptr, ref_ptr, BR: gl.constexpr, W: gl.constexpr):
        lay: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
        rows = gl.program_id(0) * BR + gl.arange(0, BR, layout=gl.SliceLayout(1, lay))
        cols = gl.arange(0, W, layout=gl.SliceLayout(0, lay))
        v = gl.load(v_ptr + rows[:, None] * W + cols[None, :])
        s = gl.load(s_ptr + rows)
        rcp = A._recip(s)
        gl.store(fast_ptr + rows[:, None] * W + cols[None, :], A._quotient(v, s, rcp, True))
        gl.store(ref_ptr + rows[:, None] * W + cols[None, :], A._quotient(v, s, rcp, False))

# M = 136 / 760: not multiples of 16 (16-byte copies under the token mask all the same), 700: 8-byte copies,
# 650: 4-byte copies, 651: odd, the Triton launches run; row-major x: on the transpose made first
SHAPES = [(800, 16384, True), (800, 2048, False), (136, 4096, True), (200, 1024, False), (136, 2048, False),
          (700, 16384, True), (650, 4096, True), (760, 2048, True), (651, 1024, True)]


@needs_act
@pytest.mark.parametrize(("m", "k", "token_minor"), SHAPES)
def test_codes_and_scales_match_the_triton_launches(m, k, token_minor):
    from duquant_runtime.kernels import w4a8 as K
    x, perm, r_in = w4a8_operands(m, k, token_minor, m + k)
    cfg = dict(K.pick_config(m, 2048, k, K.MODE_DYNAMIC), XLOAD="transpose")
    kw = dict(r_in=r_in, perm=perm, smooth=None, mode=K.MODE_DYNAMIC)  # noqa: C408
    codes, s = K.prepare_activation(x, cfg={**cfg, "ACT": "wgmma"}, **kw)
    ref_codes, ref_s = K.prepare_activation(x, cfg={**cfg, "ACT": None}, **kw)
    assert_codes_within_ties(codes, s, ref_codes, ref_s)
    # the codes follow the rotation: a transposed R_in gives other codes almost everywhere
    bad, _ = K.prepare_activation(x, cfg={**cfg, "ACT": "wgmma"}, **{**kw, "r_in": r_in.transpose(1, 2).contiguous()})
    assert float((bad != ref_codes).float().mean()) > 0.5


@needs_act
@pytest.mark.parametrize(("m", "vec"), [(700, 4), (650, 2), (760, 8)])
def test_narrow_copies_give_each_token_its_own_codes(m, vec):
    """x^T rows of M tokens that 16-byte copies do not fit (M % 8 != 0) or whose M is not a multiple
    of 16: copies of `vec` tokens; each token's codes and scale are bit for bit those it gets inside
    a run of 768 tokens (16-byte copies), whose first M tokens are the same."""
    from duquant_runtime.kernels import w4a8 as K
    from duquant_runtime.kernels import w4a8_act as A
    x, perm, r_in = w4a8_operands(768, 4096, False, 11)
    tm = lambda t: t.t().contiguous().t()  # noqa: E731  (a gate/up GEMM's token-minor output)
    cfg = dict(K.pick_config(768, 2048, 4096, K.MODE_DYNAMIC), ACT="wgmma")
    kw = dict(r_in=r_in, perm=perm, smooth=None, mode=K.MODE_DYNAMIC)  # noqa: C408
    assert A.copy_tokens(m, m) == vec and A.copy_tokens(768, 768) == 8
    for f16 in (True, False):
        full, s_full = K.prepare_activation(tm(x), cfg={**cfg, "ACT_F16": f16}, **kw)
        codes, s = K.prepare_activation(tm(x[:m]), cfg={**cfg, "ACT_F16": f16}, **kw)
        assert torch.equal(codes, full[:m]) and torch.equal(s, s_full[:m]), (m, f16)


@needs_act
@pytest.mark.parametrize(("tt", "bm", "stages", "warps", "areg"),
                         [(8, 128, 3, 4, False), (2, 64, 2, 4, True), (1, 128, 4, 8, False), (1, 128, 1, 4, True)])
def test_launch_variants_give_the_same_codes(tt, bm, stages, warps, areg):
    from duquant_runtime.kernels import w4a8 as K
    m, k = 300, 4096
    x, perm, r_in = w4a8_operands(m, k, True, 7)
    cfg = dict(K.pick_config(m, 1024, k, K.MODE_DYNAMIC), ACT="wgmma")
    kw = dict(r_in=r_in, perm=perm, smooth=None, mode=K.MODE_DYNAMIC)  # noqa: C408
    cfg["ACT_F16"] = not areg  # ACT_AREG is the bf16-terms path's option
    base, s0 = K.prepare_activation(x, cfg=cfg, **kw)
    codes, s = K.prepare_activation(x, cfg={**cfg, "ACT_TT": tt, "ACT_BM": bm, "ACT_STAGES": stages,
                                             "ACT_WARPS": warps, "ACT_AREG": areg}, **kw)
    assert torch.equal(s, s0)
    assert float((codes != base).float().mean()) < 1e-4


@needs_act
@pytest.mark.parametrize(("act", "m", "k"), [("wgmma", 800, 16384), ("wgmma", 208, 2048), ("cluster", 800, 2048)])
def test_saturating_conversion_gives_the_same_codes(act, m, k):
    """SATCVT (one cvt.rni.sat.s8 per code) against rint, max, min and the conversion, bit for bit, in
    both Gluon kernels; with identity rotations, a row of quotients exactly halfway between two
    codes rounds half to even."""
    from duquant_runtime.kernels import w4a8 as K
    x, perm, _ = w4a8_operands(m, k, act == "wgmma" and k > 4096, 9)
    row, halves = halfway_row(k)
    x = x.clone()
    x[3] = row.to(x.device, x.dtype)  # scale 1/8: the quotients are the values times 8, exactly
    r_in = torch.eye(64).repeat(k // 64, 1, 1).half().to(x.device)
    cfg = dict(K.pick_config(m, 2048, k, K.MODE_DYNAMIC), XLOAD="transpose", ACT=act)
    kw = dict(r_in=r_in, perm=None, smooth=None, mode=K.MODE_DYNAMIC)  # noqa: C408
    ref, s0 = K.prepare_activation(x, cfg={**cfg, "SATCVT": False}, **kw)
    codes, s = K.prepare_activation(x, cfg={**cfg, "SATCVT": True}, **kw)
    assert torch.equal(s, s0) and torch.equal(codes, ref)
    ties = natural_columns(codes[3], K.gemm_tiling(k, cfg)[0])[2:2 + halves.numel()].float()
    assert torch.equal(ties, torch.round(halves))


@needs_act
@pytest.mark.parametrize(("m", "k", "token_minor", "tt"), [(800, 16384, True, 1), (800, 2048, False, 1),
                                                          (300, 4096, True, 2)])
def test_cached_rotation_terms_give_the_same_codes(m, k, token_minor, tt):
    """ACT_RCACHE (the bf16-terms path, ACT_F16 off): pass 2 copies R_in's bf16 terms that pass 1
    wrote instead of splitting R_in itself; the shared-memory contents, so the codes and scales,
    are the same bit for bit."""
    from duquant_runtime.kernels import w4a8 as K
    x, perm, r_in = w4a8_operands(m, k, token_minor, 5 * m + k)
    cfg = dict(K.pick_config(m, 2048, k, K.MODE_DYNAMIC), XLOAD="transpose", ACT="wgmma", ACT_TT=tt, ACT_F16=False)
    kw = dict(r_in=r_in, perm=perm, smooth=None, mode=K.MODE_DYNAMIC)  # noqa: C408
    base, s0 = K.prepare_activation(x, cfg={**cfg, "ACT_RCACHE": False}, **kw)
    for _ in range(2):
        codes, s = K.prepare_activation(x, cfg={**cfg, "ACT_RCACHE": True}, **kw)
        assert torch.equal(s, s0) and torch.equal(codes, base)


@needs_act
@pytest.mark.parametrize(("m", "k", "token_minor", "tt", "bm"), [(800, 16384, True, 1, 64), (800, 16384, True, 2, 64),
                                                                (800, 2048, False, 1, 128), (304, 4096, True, 3, 64)])
def test_float16_operand_gives_the_codes_of_the_split_terms(m, k, token_minor, tt, bm):
    """ACT_F16 (rows scaled by powers of two, one float16 wgmma) against the bf16 hi + lo terms and
    the Triton launches: the same scales (the same exact products), codes up to ties moved by the
    order of float32 sums, also on rows past float16's range, tiny, zero and mixed; repeated
    calls bit for bit."""
    from duquant_runtime.kernels import w4a8 as K
    x, perm, r_in = w4a8_operands(m, k, token_minor, 13 * m + k)
    x = hard_rows(x)
    if token_minor:
        x = x.t().contiguous().t()
    cfg = dict(K.pick_config(m, 2048, k, K.MODE_DYNAMIC), XLOAD="transpose", ACT="wgmma", ACT_TT=tt, ACT_BM=bm)
    kw = dict(r_in=r_in, perm=perm, smooth=None, mode=K.MODE_DYNAMIC)  # noqa: C408
    split, s0 = K.prepare_activation(x, cfg={**cfg, "ACT_F16": False}, **kw)
    ref, ref_s = K.prepare_activation(x, cfg={**cfg, "ACT": None}, **kw)
    codes, s = K.prepare_activation(x, cfg={**cfg, "ACT_F16": True}, **kw)
    assert float(s[1]) > 65504 / 127 and 0 < float(s[2]) < 1e-8 and float(s[4]) == 1.0  # the rows are there
    assert_codes_within_ties(codes, s, split, s0)
    assert_codes_within_ties(codes, s, ref, ref_s)
    assert int((codes[4] != 0).sum()) == 0 and float((codes[2] != 0).float().mean()) > 0.9
    again, s2 = K.prepare_activation(x, cfg={**cfg, "ACT_F16": True}, **kw)
    assert torch.equal(s2, s) and torch.equal(again, codes)


@needs_act
def test_float16_operand_rounds_halfway_quotients_to_even():
    from duquant_runtime.kernels import w4a8 as K
    m, k = 800, 16384
    x, _, _ = w4a8_operands(m, k, True, 9)
    row, halves = halfway_row(k)
    x = x.t().contiguous()
    x[:, 3] = row.to(x.device, x.dtype)
    x = x.t()
    r_in = torch.eye(64).repeat(k // 64, 1, 1).half().to(x.device)
    cfg = dict(K.pick_config(m, 2048, k, K.MODE_DYNAMIC), ACT="wgmma", ACT_F16=True)
    codes, s = K.prepare_activation(x, cfg=cfg, r_in=r_in, perm=None, smooth=None, mode=K.MODE_DYNAMIC)
    assert float(s[3]) == 1 / 8
    ties = natural_columns(codes[3], K.gemm_tiling(k, cfg)[0])[2:2 + halves.numel()].float()
    assert torch.equal(ties, torch.round(halves))


@needs_act
@pytest.mark.parametrize(("m", "n", "k"), [(800, 2048, 16384), (800, 2048, 2048)])
def test_layer_with_wgmma_codes_matches_the_triton_path(m, n, k):
    x, perm, r_in = w4a8_operands(m, k, k > 4096, 3)
    assert layer_err_vs_triton_launches(x, n, k, r_in, perm, "wgmma") < 2e-3


@needs_act
def test_markstein_quotient_is_the_correctly_rounded_division():
    """`_quotient`'s FASTDIV (reciprocal, product, one fma correction) equals div.rn bit for bit,
    on random values and scales, on scales with all-ones significands (the hard case for a
    reciprocal), on quotients near the code range's halves, and on scales down to the smallest
    subnormal (no finite reciprocal: the quotient of both operands times 2^64)."""
    g = torch.Generator().manual_seed(11)
    rows, w = 1 << 14, 64
    s = torch.rand(rows, generator=g, dtype=torch.float64).mul(30).sub(15).exp2().float()
    ones = (s.view(torch.int32) | 0x007FFFFF).view(torch.float32)  # significand 1.11...1
    s[: rows // 4] = ones[: rows // 4]
    s[rows // 4: rows // 4 + 512] = torch.randint(1, 1 << 23, (512,), generator=g, dtype=torch.int32).view(torch.float32)
    s[rows // 4 + 512: rows // 4 + 1024] = torch.rand(512, generator=g, dtype=torch.float64).mul(30).sub(145).exp2().float()
    assert (s > 0).all() and (s[rows // 4: rows // 4 + 512] < 1.2e-38).all()  # subnormal
    v = torch.randn(rows, w, generator=g) * s[:, None] * 60.0
    v[rows // 2:] = (torch.randint(-255, 256, (rows // 2, w), generator=g).float() * 0.5 * s[rows // 2:, None]
                     * (1 + torch.randn(rows // 2, w, generator=g) * 1e-6))  # near k/2 quotients
    v, s = v.cuda(), s.cuda()
    fast, ref = torch.empty_like(v), torch.empty_like(v)
    _quotients[(rows // 64,)](v, s, fast, ref, BR=64, W=w, num_warps=4)
    assert torch.equal(ref, v / s[:, None])  # div.rn is torch's division
    # bit for bit, but for the sign of a zero quotient (-0 / s: Markstein's fma gives +0; code 0 either way)
    assert torch.equal((fast + 0.0).view(torch.int32), (ref + 0.0).view(torch.int32))
    assert int((v == 0).sum()) > 0  # the subnormal rows include zero values


@needs_triton
def test_usable_takes_only_operands_the_kernel_reads_correctly():
    from duquant_runtime.kernels import w4a8_act as A
    xt = torch.zeros(256, 800, dtype=torch.bfloat16)
    r_in = torch.zeros(4, 64, 64, dtype=torch.float16)
    assert A.usable(xt, 800, r_in, None, 127, 256)
    # copies of 8, 4 or 2 tokens (16, 8, 4 bytes) that divide the row stride and M; none of 1 (cp.async has no 2 bytes)
    assert [A.copy_tokens(ld, m) for ld, m in ((800, 800), (808, 800), (700, 700), (650, 650), (651, 651),
                                               (800, 50), (801, 800))] == [8, 8, 4, 2, 0, 2, 0]
    assert A.usable(xt, 50, r_in, None, 127, 256)  # 4-byte copies
    assert A.usable(torch.zeros(256, 808, dtype=torch.bfloat16)[:, :800], 800, r_in, None, 127, 256)
    assert not A.usable(torch.zeros(256, 801, dtype=torch.bfloat16)[:, :800], 800, r_in, None, 127, 256)  # odd stride
    assert not A.usable(torch.zeros(256, 651, dtype=torch.bfloat16), 651, r_in, None, 127, 256)  # odd M
    assert not A.usable(xt.float(), 800, r_in, None, 127, 256)
    assert not A.usable(xt, 800, r_in.float(), None, 127, 256)  # float32 R_in: hi + lo would not be exact
    assert not A.usable(xt, 800, torch.zeros(8, 32, 32, dtype=torch.float16), None, 127, 256)
    assert not A.usable(xt, 800, r_in, torch.ones(256), 127, 256)  # smoothing is the Triton prep's
    assert not A.usable(xt, 800, r_in, None, 32767, 256)
    assert not A.usable(xt, 800, r_in, None, 127, 32)  # a 64-wide block would span two GEMM K tiles


@needs_triton
def test_offline_sm90_code_of_both_passes():
    """benchmarks/compile_w4a8.py `act_report` compiles both passes for sm_90 without a GPU."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compile_w4a8
    one, two = compile_w4a8.act_report(1), compile_w4a8.act_report(2)
    for r in (one, two):
        assert r["wgmma"] == ["m64n64k16.f32.bf16.bf16"], r  # one N = 64 dot per R_in term
        assert r["cp_async_bytes"] == [16], r  # whole 16-byte copies of x^T
        assert r["registers"] and r["registers"] <= 128 and r["shared_bytes"] > 0, r
    assert one["atomics"] and all(".relaxed." in a for a in one["atomics"]), one  # no fence per atomic
    assert not one["global_stores"] and not two["atomics"]
    assert "st.global.v4.b32" in two["global_stores"], two  # the codes in 16-byte vectors
    assert two["conversions"] == ["cvt.rni.sat.s8.f32"], two  # SATCVT: one saturating conversion per code
    for r in (compile_w4a8.act_report(1, 64, f16=True), compile_w4a8.act_report(2, 64, f16=True)):
        assert r["wgmma"] == ["m64n64k16.f32.f16.f16"], r  # ACT_F16: one float16 dot, no split terms
        assert r["cp_async_bytes"] == [16] and r["registers"] <= 128, r
    for vec, size in ((4, 8), (2, 4)):  # M and the row stride multiples of 4 / 2 tokens only: 8- / 4-byte copies
        assert compile_w4a8.act_report(1, 64, vec=vec)["cp_async_bytes"] == [size]
        assert compile_w4a8.act_report(2, 64, f16=True, vec=vec)["cp_async_bytes"] == [size, 16]  # R_in: 16 bytes
