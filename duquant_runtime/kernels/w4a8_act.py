"""Dynamic per-token activation codes for Hopper (Gluon): rotate twice instead of storing float32.

    pass 1: tokmax[t] = max_c |x_rot[t, c]|   (atomic max over the programs of a token tile)
    pass 2: s[t] = tokmax[t] / QMAX;  codes[t, c] = clamp(rint(x_rot[t, c] / s[t]))
    with x_rot = x[:, perm] BD(R_in)   (B = 64 wide blocks)

The Triton launches (`w4a8._prep_kernel` + `_quant_kernel`) store the rotated values in float32
and read them back (LLM down_proj at M = 800: 52 MB each way); their rotation is bound by its
serial load / layout conversion / dot chain, not by memory (benchmarks/notes_runtime_gpu.md).
Here both passes read x^T (K, ld) bf16, whose permuted rows are runs of tokens: cp.async copies
them into a ring of STAGES (B, BM) tiles, and wgmma reads a tile in place as its MN-major A
operand. The rotation is exact to the float32 path's products: R_in (float16) is split into
two bf16 terms hi + lo (hi = bf16(r), lo = r - hi, both exact), and bf16 x bf16 products are
exact in the float32 accumulator, as are the tf32 products of `_prep_kernel`. Only the order of
the float32 sums differs. With ACT_RCACHE (LLM down_proj), pass 1 also writes each block's two
terms to a scratch buffer and pass 2 copies them instead of splitting R_in again.

ACT_F16 (the default, `pick_config`): R_in's float16 block is copied as it is and each tile takes
one float16 wgmma instead of two bf16 ones. x (bf16, 8 significant bits) is exact in float16
only between 2^-17 and 65504, so each row is first multiplied by a power of two 2^e: in pass 1
its maximum over the tile goes to [2^14, 2^15), in pass 2 its token maximum (pass 1's) to
[2^11, 2^12), which bounds every |x 2^e| by 2^15 because max |x| <= 8 max |x R| for orthogonal
64-wide blocks (packs are checked orthogonal). Values then lose bits only where |x 2^e| < 2^-14
(float16 subnormals), by at most 2^-25: 2^-36 of the scaled row maximum or less, far under
float32's own rounding of the sums. Float16 products are exact in float32, and scaling
by 2^e is exact, so pass 1's maxima and pass 2's quotients (the scaled sums over the scaled
scale) are those of the bf16-terms path up to the order of float32 sums (GPU tests: rows past
65504, tiny, zero and mixed).

The B operand's columns are a block's even channels, then its odd ones (one N = 64 wgmma per
R_in term), so the codes leave as two contiguous runs in the GEMM's column order
(`w4a8._deint`) with vector stores. Pass 1's token maxima are relaxed atomics (Triton's default
is acq_rel, a fence per atomic), the quotient is Markstein's (`_quotient`; with div.rn, pass 2
took twice as long) and the code one saturating conversion (`_codes`, SATCVT). Used by `w4a8.prepare_activation` where `pick_config` asks for it
(ACT="wgmma") on sm_90 with Gluon; the GPU tests compare its codes and scales with the Triton
launches (tests/test_w4a8_act.py)."""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .w4a8 import SATCVT_ASM, SCALE_UP, TINY_SCALE


@gluon.jit
def _rint(v):
    """Round half to even of float32 v (torch.round): one cvt.rni."""
    return gl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=r,r", [v], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _codes(q, QMIN: gl.constexpr, QMAX: gl.constexpr, SATCVT: gl.constexpr):
    """int8 codes of float32 quotients q: rint, clamped to [QMIN, QMAX]. SATCVT with the int8
    range (-128, 127): one cvt.rni.sat.s8 (`w4a8.SATCVT_ASM`) per code instead of rint, max, min
    and the conversion; the same codes."""
    if SATCVT and QMIN == -128 and QMAX == 127:
        c = gl.inline_asm_elementwise(SATCVT_ASM, "=r,r", [q], dtype=gl.int32, is_pure=True, pack=1)
        return c.to(gl.int8)
    else:
        return gl.minimum(gl.maximum(_rint(q), QMIN), QMAX).to(gl.int8)


@gluon.jit
def _r_halves(r_ptr, kb, B: gl.constexpr, num_warps: gl.constexpr):
    """R_in block kb (float16 in memory, read in 16-byte vectors) as float32: its even and its odd
    columns, (B, B/2) each."""
    rl: gl.constexpr = gl.BlockedLayout([1, 4, 2], [8, 4, 1], [num_warps, 1, 1], [2, 1, 0])
    i = gl.arange(0, B, layout=gl.SliceLayout(1, gl.SliceLayout(2, rl)))
    j = gl.arange(0, B // 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, rl)))
    t = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, rl)))
    r = gl.load(r_ptr + kb * B * B + i[:, None, None] * B + (2 * j)[None, :, None] + t[None, None, :])
    return gl.split(r.to(gl.float32))


@gluon.jit
def _cache_terms(r_e, r_o, rs_ptr, kb, B: gl.constexpr, num_warps: gl.constexpr):
    """R_in block kb's bf16 terms hi, lo (from `_r_halves`' even and odd columns, float32) to
    rs (K/B, 2, B, B) bf16 in the shared-memory order of `_store_split`: columns 0 .. B/2 - 1 the
    even channels, then the odd ones."""
    rl: gl.constexpr = gl.BlockedLayout([1, 4, 2], [8, 4, 1], [num_warps, 1, 1], [2, 1, 0])
    i = gl.arange(0, B, layout=gl.SliceLayout(1, gl.SliceLayout(2, rl)))
    j = gl.arange(0, B // 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, rl)))
    base = rs_ptr + kb * 2 * B * B + i[:, None] * B + j[None, :]
    _store_terms(r_e, base, B * B, rl)
    _store_terms(r_o, base + B // 2, B * B, rl)


@gluon.jit
def _store_terms(r, ptrs, lo_offset, rl: gl.constexpr):
    """`_terms` of r to ptrs (hi) and ptrs + lo_offset (lo)."""
    hi, lo = _terms(r)
    gl.store(ptrs, gl.convert_layout(hi, gl.SliceLayout(2, rl)))
    gl.store(ptrs + lo_offset, gl.convert_layout(lo, gl.SliceLayout(2, rl)))


@gluon.jit
def _griddepcontrol(t, OP: gl.constexpr):
    """griddepcontrol.wait (OP "wait": the previous launch's results are visible) or
    .launch_dependents (the next launch may start), executed by every thread (t: any tensor,
    a dummy operand that gives the instruction a layout). Both are no-ops without PDL."""
    gl.inline_asm_elementwise("griddepcontrol." + OP + "; mov.b32 $0, $1;", "=r,r", [t], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _recip(s):
    """(f, s f, RN(1 / (s f))) for scales s (R,) > 0: f = 2^64 where s < 2^-60, else 1. A scale
    below 2^-128 (a row whose absmax is under ~4e-37) has no finite reciprocal; s f always does,
    and v / s == (v f) / (s f) exactly (powers of two)."""
    f = gl.where(s < TINY_SCALE, SCALE_UP, 1.0)
    sf = s * f
    return f, sf, gl.div_rn(sf * 0.0 + 1.0, sf)


@gluon.jit
def _quotient(v, s, rcp, FASTDIV: gl.constexpr):
    """v (R, W) / s (R,) float32, correctly rounded: div.rn, or (FASTDIV) Markstein's correction
    of v' r with v' = v f, s' = s f, r = RN(1 / s') (rcp = `_recip(s)`): q0 = v' r, e = v' - q0 s'
    (exact, fma), q = RN(q0 + e r)."""
    if FASTDIV:
        f, sf, rsf = rcp
        return _scaled_quotient(v * f[:, None], sf, rsf)
    else:
        return gl.div_rn(v, s[:, None])


@gluon.jit
def _scaled_quotient(v, s, r):
    """v (R, W) / s (R,) float32 correctly rounded, for normal s with r = RN(1 / s) (R,) normal, as
    `_quotient`'s FASTDIV without its 2^64 factor: ACT_F16's scaled scales are normal (in
    [16, 33) where the token maximum is a normal float, 2^123 / 127 for a zero row)."""
    q0 = v * r[:, None]
    return gl.fma(gl.fma(-q0, s[:, None], v), r[:, None], q0)


@gluon.jit
def _f16_scale(tmax, s):
    """(fs, s fs, RN(1 / (s fs))) for token maxima tmax (R,) and their scales s (R,) float32: the
    factors `_pow2_scale(tmax, 11)` that pass 2 of ACT_F16 scales the rows by, the scaled scales
    (normal, `_scaled_quotient`) and their reciprocals."""
    fs, _ = _pow2_scale(tmax, 11)
    sf = s * fs
    return fs, sf, gl.div_rn(gl.full(sf.shape, 1.0, gl.float32, layout=sf.type.layout), sf)


@gluon.jit
def _terms(r):
    """(hi, lo) bf16 with r == hi + lo exactly, for r float32 holding a float16 value:
    hi = bf16(r), lo = bf16(r - hi)."""
    hi = r.to(gl.bfloat16)
    return hi, (r - hi.to(gl.float32)).to(gl.bfloat16)


@gluon.jit
def _store_split(r, hi_buf, lo_buf):
    """`_terms` of r into two bf16 shared buffers."""
    hi, lo = _terms(r)
    hi_buf.store(hi)
    lo_buf.store(lo)


@gluon.jit
def _pow2_scale(m, TOP: gl.constexpr):
    """(2^e, 2^-e) float32 per row for row magnitudes m (R,) float32: m 2^e in [2^TOP, 2^(TOP+1))
    for normal m > 0; e = TOP + 112 for zero or subnormal m, e = TOP - 127 for inf or NaN (both
    factors stay normal floats, so scaling by them is exact)."""
    ex = (m.to(gl.int32, bitcast=True) >> 23) & 0xFF
    fb = 254 + TOP - gl.minimum(gl.maximum(ex, TOP + 1), 254)  # 127 + e
    return (fb << 23).to(gl.float32, bitcast=True), ((254 - fb) << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _f16_operand(a, f):
    """a bf16 (BM, B) register operand times f (BM,) powers of two, as float16: exact for
    2^-24 <= |a f| <= 65504 with at most 8 significant bits (bf16's), and off by at most 2^-25
    below that."""
    return (a.to(gl.float32) * f[:, None]).to(gl.float16)


@gluon.jit
def _f16_rotation(a, f, r16, BM: gl.constexpr, B: gl.constexpr, mma: gl.constexpr):
    """(a f) R float32 (BM, B), columns in R's order: a bf16 (BM, B) register operand scaled by
    f (BM,) powers of two (`_f16_operand`), one float16 wgmma with R's (B, B) float16 block in
    shared memory. Float16 products are exact in float32, as the bf16 terms' are."""
    acc = warpgroup_mma(_f16_operand(a, f), r16, gl.zeros([BM, B], gl.float32, layout=mma), is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))


@gluon.jit
def _f16_absmax(x_buf, r16, BM: gl.constexpr, B: gl.constexpr, mma: gl.constexpr):
    """max_c |(x R)[t, c]| float32 (BM,) (SliceLayout(1, mma)) of the x^T tile (B, BM) bf16 in
    shared memory: each row scaled into [2^14, 2^15) by its own maximum first, so float16 holds
    it (`_f16_operand`), and the maximum scaled back (exact: powers of two)."""
    a = x_buf.permute((1, 0)).load(gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2))
    f, fi = _pow2_scale(gl.max(gl.abs(a.to(gl.float32)), axis=1), 14)
    mx = gl.max(gl.abs(_f16_rotation(a, f, r16, BM, B, mma)), axis=1)
    return mx * gl.convert_layout(fi, gl.SliceLayout(1, mma))


@gluon.jit
def _f16_scaled(x_buf, r16, fs, BM: gl.constexpr, B: gl.constexpr, mma: gl.constexpr):
    """(x R) fs float32 (BM, B) of the x^T tile (B, BM) bf16 in shared memory, fs (BM,)
    (SliceLayout(1, mma)) the `_pow2_scale(token max, 11)` factors: |x fs| < 2^15, since
    max |x| <= 8 max |x R| for 64-wide orthogonal blocks, so float16 holds the scaled rows."""
    a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    a = x_buf.permute((1, 0)).load(a_reg)
    return _f16_rotation(a, gl.convert_layout(fs, gl.SliceLayout(1, a_reg)), r16, BM, B, mma)


@gluon.jit
def _f16_block(r_ptr, kb, r16, B: gl.constexpr, num_warps: gl.constexpr):
    """cp.async of R_in's float16 block kb (B, B), as it is, into r16 (not committed)."""
    cl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    ri = gl.arange(0, B, layout=gl.SliceLayout(1, cl))
    rc = gl.arange(0, B, layout=gl.SliceLayout(0, cl))
    async_copy.async_copy_global_to_shared(r16, r_ptr + kb * B * B + ri[:, None] * B + rc[None, :])


@triton.constexpr_function
def f16_layout():
    """Shared layout of a float16 R_in block, wgmma's B operand."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


@gluon.jit
def _even_odd(q, BM: gl.constexpr, B: gl.constexpr):
    """(BM, B) with columns reordered: the even ones, then the odd ones (register relabelling)."""
    return gl.reshape(gl.permute(gl.reshape(q, [BM, B // 2, 2]), [0, 2, 1]), [BM, B])


@triton.constexpr_function
def tile_layout(BM, num_warps):
    """Register layout of a (B, BM) x^T tile: 8 tokens (16 bytes) per thread, tokens fastest."""
    return gl.BlockedLayout([1, 8], [32 * 8 // BM, BM // 8], [num_warps, 1], [1, 0])


@triton.constexpr_function
def rotation_layout(B, num_warps):
    """wgmma accumulator layout of a rotated (BM, B) tile: float32, tokens down the warps."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, B, 16])


@gluon.jit
def _tile_buffers(NX: gl.constexpr, NR: gl.constexpr, BM: gl.constexpr, B: gl.constexpr):
    """Shared memory: NX x^T tiles (B, BM) bf16 (wgmma's MN-major A operand) and NR R_in terms
    (B, B) bf16 (its B operand)."""
    r_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    return _x_buffers(NX, BM, B), gl.allocate_shared_memory(gl.bfloat16, [NR, B, B], r_layout)


@gluon.jit
def _x_buffers(NX: gl.constexpr, BM: gl.constexpr, B: gl.constexpr):
    """Shared memory: NX x^T tiles (B, BM) bf16 (wgmma's MN-major A operand)."""
    x_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(128, 2 * BM), element_bitwidth=16, rank=2)
    return gl.allocate_shared_memory(gl.bfloat16, [NX, B, BM], x_layout)


@gluon.jit
def _issue(x_bufs, st, xt_ptr, ld, src, off_m, M, BM: gl.constexpr, xl: gl.constexpr):
    """cp.async of the (B, BM) tile x^T[src, off_m:off_m + BM] (tokens >= M zero) into stage st."""
    toks = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, xl))
    ptrs = xt_ptr + src[:, None] * ld + toks[None, :]
    async_copy.async_copy_global_to_shared(x_bufs.index(st), ptrs, mask=(toks < M)[None, :])


@gluon.jit
def _act_kernel(xt_ptr, ldv, mv, perm_ptr, r_ptr, tokmax_ptr, codes_ptr, tok_scale_ptr, rs_ptr, K: gl.constexpr,
                TT: gl.constexpr, BM: gl.constexpr, B: gl.constexpr, BKD: gl.constexpr, STAGES: gl.constexpr,
                PASS: gl.constexpr, HAS_PERM: gl.constexpr, QMIN: gl.constexpr, QMAX: gl.constexpr,
                FASTDIV: gl.constexpr, AREG: gl.constexpr, PDL: gl.constexpr, RCACHE: gl.constexpr,
                SATCVT: gl.constexpr, num_warps: gl.constexpr, F16: gl.constexpr = False, VEC: gl.constexpr = 8):
    """Program (i, j): rotation block i of the token tiles j*TT .. j*TT+TT-1 (BM tokens each), so
    that its reads are runs along each permuted row of x^T and R_in is split once. PASS 1: atomic
    max of each tile's absmax per token into tokmax (M,) float32 (zeroed before); PASS 2: the codes
    int8 (M, K) (`_deint` order of BKD-wide K tiles) and, program row 0, the scales (M,).
    PDL: launched early; the permutation and R_in (weights) are read before waiting for the
    previous launch's results. RCACHE: pass 1's program row 0 also writes R_in's bf16 terms, as
    they lie in shared memory, to rs (K/B, 2, B, B); pass 2 copies them from there (cp.async with
    its first x^T tile) instead of loading and splitting R_in again. F16: one float16 wgmma per
    tile with R_in's block copied as it is (no split, no cache): the tile's rows scaled by powers
    of two (pass 1: its own row maxima to [2^14, 2^15); pass 2: the token maxima to [2^11, 2^12),
    so |x 2^e| < 2^15 since max |x| <= 8 max |x R| for 64-wide orthogonal blocks) then converted,
    exactly where float16 holds them; the sums are the split path's up to those powers of two and
    float32 order. VEC: the x^T row stride ld = ldv * VEC and the token count M = mv * VEC (given as
    multiples of VEC, so the compiler knows their divisibility): cp.async copies of VEC tokens (2 * VEC
    bytes, `copy_tokens`)."""
    ld = ldv * VEC
    M = mv * VEC
    kb = gl.program_id(0)
    m0 = gl.program_id(1) * TT * BM
    xl: gl.constexpr = tile_layout(BM, num_warps)
    mma: gl.constexpr = rotation_layout(B, num_warps)
    # a ring of x^T tiles; R_in's hi and lo terms, columns in the codes' order: the block's even
    # channels, then its odd ones
    if F16:
        x_bufs = _x_buffers(STAGES, BM, B)
    else:
        x_bufs, r_bufs = _tile_buffers(STAGES, 2, BM, B)
    cb = gl.arange(0, B, layout=gl.SliceLayout(1, xl))
    if HAS_PERM:
        src = gl.load(perm_ptr + kb * B + cb)
    else:
        src = kb * B + cb
    if F16:  # R_in's block as it is, in the first copy group (a weight: before the PDL wait)
        r16 = gl.allocate_shared_memory(gl.float16, [B, B], f16_layout())
        _f16_block(r_ptr, kb, r16, B, num_warps)
    elif not (RCACHE and PASS == 2):
        r_e, r_o = _r_halves(r_ptr, kb, B, num_warps)
    if PDL:
        _griddepcontrol(cb, "wait")
        _griddepcontrol(cb, "launch_dependents")
    if RCACHE and PASS == 2 and not F16:  # pass 1's terms, in the first copy group (written by the previous launch)
        tl_: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        ri = gl.arange(0, B, layout=gl.SliceLayout(1, tl_))
        rc = gl.arange(0, B, layout=gl.SliceLayout(0, tl_))
        for term in gl.static_range(2):
            async_copy.async_copy_global_to_shared(r_bufs.index(term),
                                                   rs_ptr + (kb * 2 + term) * B * B + ri[:, None] * B + rc[None, :])
    for p in gl.static_range(STAGES - 1):
        if p < TT:
            _issue(x_bufs, p, xt_ptr, ld, src, m0 + p * BM, M, BM, xl)
        async_copy.commit_group()
    if not (RCACHE and PASS == 2) and not F16:
        _store_split(r_e, r_bufs.index(0).slice(0, B // 2, dim=1), r_bufs.index(1).slice(0, B // 2, dim=1))
        _store_split(r_o, r_bufs.index(0).slice(B // 2, B // 2, dim=1), r_bufs.index(1).slice(B // 2, B // 2, dim=1))
    if RCACHE and PASS == 1 and not F16:
        if gl.program_id(1) == 0:  # one program per block: the terms for pass 2
            _cache_terms(r_e, r_o, rs_ptr, kb, B, num_warps)
    if PASS == 2:  # codes of column j go to run + j % (B/2) + (j // (B/2)) * BKD/2 (`_deint`)
        ol: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // B, B // 16], [num_warps, 1], [1, 0])
        ocol = gl.arange(0, B, layout=gl.SliceLayout(0, ol))
        c0 = kb * B
        run = gl.multiple_of(c0 - c0 % BKD + (c0 % BKD) // 2, B // 2)
        ocol = run + ocol % (B // 2) + (ocol // (B // 2)) * (BKD // 2)
    if AREG:
        a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    for t in range(TT):
        off_m = m0 + t * BM
        if t > 0:
            gl.thread_barrier()  # every warp is done with iteration t - 1's stage
        j = t + STAGES - 1
        if j < TT:
            _issue(x_bufs, j % STAGES, xt_ptr, ld, src, m0 + j * BM, M, BM, xl)
        async_copy.commit_group()
        toks = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
        row_ok = toks < M
        if PASS == 2:
            s = gl.div_rn(gl.load(tokmax_ptr + toks, mask=row_ok, other=0.0),
                          gl.full([BM], QMAX, gl.float32, layout=gl.SliceLayout(1, mma)))
            s = gl.where(s > 0, s, 1.0)
            if F16:  # the quotient of the scaled sums by the scaled scale: the same, exactly
                fs, sf, rcp = _f16_scale(gl.load(tokmax_ptr + toks, mask=row_ok, other=0.0), s)
            else:
                rcp = _recip(s)
        async_copy.wait_group(STAGES - 1)  # tile t has landed (this thread's copies)
        fence_async_shared()
        gl.thread_barrier()  # ... and every thread's (and, at t = 0, the R_in terms are stored)
        if F16:  # rows scaled by powers of two, one float16 dot (columns in R_in's order)
            if PASS == 1:
                mx = _f16_absmax(x_bufs.index(t % STAGES), r16, BM, B, mma)
            else:
                acc = _f16_scaled(x_bufs.index(t % STAGES), r16, fs, BM, B, mma)
        else:
            if AREG:  # the tile read from shared memory once, as the register operand of both dots
                a = x_bufs.index(t % STAGES).permute((1, 0)).load(a_reg)
            else:  # (BM, B) MN-major, read by each dot
                a = x_bufs.index(t % STAGES).permute((1, 0))
            acc = warpgroup_mma(a, r_bufs.index(0), gl.zeros([BM, B], gl.float32, layout=mma), is_async=True)
            acc = warpgroup_mma(a, r_bufs.index(1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            if PASS == 1:
                mx = gl.max(gl.abs(acc), axis=1)
        if PASS == 1:
            gl.atomic_max(tokmax_ptr + toks, mx, mask=row_ok, sem="relaxed")
        else:
            if kb == 0:
                gl.store(tok_scale_ptr + toks, s, mask=row_ok)
            if F16:
                q = _even_odd(_codes(_scaled_quotient(acc, sf, rcp), QMIN, QMAX, SATCVT), BM, B)
            else:
                q = _codes(_quotient(acc, s, rcp, FASTDIV), QMIN, QMAX, SATCVT)
            orow = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, ol))
            gl.store(codes_ptr + orow[:, None] * K + ocol[None, :], gl.convert_layout(q, ol),
                     mask=(orow < M)[:, None])
    async_copy.wait_group(0)


def copy_tokens(ld: int, m: int) -> int:
    """Tokens per cp.async copy (8, 4 or 2: 16, 8 or 4 bytes) for x^T rows of stride ld holding M
    tokens: the most that divides both (whole copies under the token mask, each aligned); 0 where
    none does (odd M or ld: 2-byte copies, which cp.async does not have)."""
    return next((v for v in (8, 4, 2) if ld % v == 0 and m % v == 0), 0)


def usable(xt: torch.Tensor, m: int, r_in: torch.Tensor, smooth, qmax: int, bkd: int) -> bool:
    """Whether these operands fit the kernel: x^T (K, ld) bf16 with unit token stride, 16-byte aligned,
    ld and M even (`copy_tokens`), float16 R_in in 64-wide blocks, no smoothing, 8-bit codes, GEMM K
    tiles (bkd) made of whole blocks."""
    return (xt.dtype == torch.bfloat16 and xt.stride(1) == 1 and copy_tokens(xt.stride(0), m) > 0
            and r_in.dtype == torch.float16 and r_in.shape[-1] == 64 and smooth is None and qmax <= 127
            and xt.data_ptr() % 16 == 0 and bkd % 64 == 0)


def act_codes(xt: torch.Tensor, m: int, perm: torch.Tensor | None, r_in: torch.Tensor, bkd: int, qmin: int,
              qmax: int, cfg: dict, tokmax: torch.Tensor | None = None,
              pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (M, K) in the `_deint` order of BKD-wide K tiles, per-token scales float32 (M,))
    for x^T (K, ld) bf16 (tokens 0..m-1 of each row), perm (K,) int or None, r_in float16
    (K/64, 64, 64). cfg: ACT_BM (tokens per tile), ACT_TT (tiles per program), ACT_STAGES, ACT_WARPS, ACT_MAXNREG,
    ACT_RCACHE (pass 1 leaves R_in's split terms in a (K/64, 2, 64, 64) bf16 scratch for pass 2).
    tokmax: float32 (M,) zeroed by the previous launch (`w4a8._transposed`), else zeroed here.
    pdl: both launches with programmatic dependent launch (the previous one triggers them)."""
    k = xt.shape[0]
    b = r_in.shape[-1]
    bm = cfg.get("ACT_BM", 128)
    tiles = triton.cdiv(m, bm)
    tt = max(1, min(tiles, cfg.get("ACT_TT", 1)))
    f16 = bool(cfg.get("ACT_F16", False))
    rcache = bool(cfg.get("ACT_RCACHE", False)) and not f16
    rs = torch.empty((k // b, 2, b, b), device=xt.device, dtype=torch.bfloat16) if rcache else r_in
    if tokmax is None:
        tokmax = torch.zeros((m,), device=xt.device, dtype=torch.float32)
    codes = torch.empty((m, k), device=xt.device, dtype=torch.int8)
    tok_scale = torch.empty((m,), device=xt.device, dtype=torch.float32)
    grid = (k // b, triton.cdiv(tiles, tt))
    vec = copy_tokens(xt.stride(0), m)
    args = (xt, xt.stride(0) // vec, m // vec, perm if perm is not None else r_in, r_in, tokmax, codes, tok_scale, rs)
    consts = dict(K=k, TT=tt, BM=bm, B=b, BKD=bkd, STAGES=max(1, min(tt, cfg.get("ACT_STAGES", 3))), VEC=vec,
                  HAS_PERM=perm is not None, QMIN=qmin, QMAX=qmax, AREG=cfg.get("ACT_AREG", False),
                  FASTDIV=cfg.get("ACT_FASTDIV", True), PDL=pdl, RCACHE=rcache, SATCVT=cfg.get("SATCVT", True), F16=f16,
                  num_warps=cfg.get("ACT_WARPS", 4))
    launch = {"launch_pdl": True} if pdl else {}
    if cfg.get("ACT_MAXNREG"):  # register cap per thread (more programs per SM), for tuning
        launch["maxnreg"] = cfg["ACT_MAXNREG"]
    _act_kernel[grid](*args, PASS=1, **consts, **launch)
    _act_kernel[grid](*args, PASS=2, **consts, **launch)
    return codes, tok_scale
