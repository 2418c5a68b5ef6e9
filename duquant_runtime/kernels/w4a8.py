"""Triton kernels of the fast W4 path (v3): int4 weights read once, two to four launches.

    y = ((Q_a(x/s P BD(R_in))) Q_w(W_t)^T) BD(R_out)^T + b       (s: smoothing, optional)

0. `_transpose_kernel` (large M, `XLOAD="transpose"`): x^T (K, M), so that the prep reads each
   permuted channel as a contiguous run of tokens instead of one 32-byte sector per element.
   Skipped when x comes token-minor (strides (1, M), e.g. a gate/up GEMM's `token_minor` output
   through the elementwise activation): the prep reads that x^T directly.
1. `_prep_kernel`: the activation transform. A program owns G rotation blocks (their perm slice,
   R_in block and scales loaded once) and streams TILES row tiles of BMP rows through a
   software-pipelined loop. The tile x[:, perm[block]] (/ smoothing) is rotated by its R_in block
   (a B x B tf32 dot) and written
   - static scales: as bf16 values q * s_k of the per-channel quantized activation;
   - dynamic: as float32 rotated values plus the per-(token, block) absmax;
   - no activation quantization: as bf16 rotated values.
2. `_quant_kernel` (dynamic only): per-token scales from the block maxima, int8 codes, stored
   in the GEMM's column order: within each BK-wide K tile the even columns, then the odd ones
   (`_deint`), written as two contiguous runs per chunk (vector stores; per-element addresses
   would give one byte store per element). The quotients v / s by one reciprocal per row and
   Markstein's fma correction (`QFASTDIV`), bit-identical to div.rn.
3. `_gemm_kernel`: out^T tile (BN rows of W, BMT tokens) = W_q @ A^T, the weight unpacked in
   registers by inline PTX (int8 16 * q with two masks; bf16 q by the exact magic-number
   conversion) as the dot's register operand, the activation streaming through shared memory
   (`SWAP`; the unswapped order is kept for tuning). int8 x int8 -> int32 dots (exact; the 16 is
   divided out exactly) for dynamic activations: two dots per K tile, the low nibbles (even k)
   against the tile's first half of codes and the high nibbles (odd k) against the second, so
   the unpacked weight never goes through shared memory to be interleaved. bf16 dots with
   float32 sums otherwise (one dot on the interleaved tile: the two-dot form measured slower
   there). Epilogue
   (`_finish`): x token scale x row scale, the output restore as one dot with the tile's
   block-diagonal slice of R_out (tf32, or bf16 operands where `pick_config` measured it
   faster), the bias, the cast, the transposed store. Split-K (small M): partial tiles go to a
   float32 workspace (restored by each program first where measured faster: the restore is
   linear), a per-tile counter finds the last program, which adds the partials in split order
   (deterministic), finishes the tile and resets the counter.
On sm_90 with Gluon, where `pick_config` measured them faster: launches 1-2 are replaced by the
two rotation passes of `w4a8_act` (ACT="wgmma": no float32 round trip; the transpose launch
then also zeroes its token maxima) or by one thread-block-cluster launch (`w4a8_cluster`,
ACT="cluster"), and launch 3 by `w4a8_rs`'s GEMM with the restore in its epilogue (GEMM="rs",
RS_RESTORE; its own tiles in RS_CONFIG, merged by `resolve_config`; its split-K adds int32 partial
sums, so its values do not depend on SPLIT). Any other GPU, Triton without Gluon, or the interpreter runs the Triton launches.
Programmatic dependent launch (`PDL`, Hopper+): the quantize launch and the GEMM start while the
previous launch runs; the GEMM pulls its weight slice into L2 (and, with `EPI_EARLY`, loads its
epilogue's row scales, R_out tile and bias), then both wait (griddepcontrol.wait) before they
read the previous launch's results or write anything. The
first launch (transpose or prep) is launched the same way and waits for x's producer.

Launch configurations: `pick_config` (measured: benchmarks/stages_w4a8.py, sweep_w4a8.py,
docs/benchmarks.md; the causes of the remaining cost: benchmarks/notes_runtime_gpu.md).
Rounding: torch.round's half-to-even (rint) and correctly rounded divisions (div_rn, or the
reciprocal with Markstein's correction, which gives the same quotients), as the reference path;
8-bit codes by one saturating conversion that rounds half to even (`SATCVT`, `_code8`).
Differences to the float32 reference: x P BD(R_in) in tf32, rotations stored in 16 bits, static
activations q*s rounded to bf16, R_out restore in tf32 (bf16 on the dynamic path without
split-K), output in x's dtype.
The CPU interpreter (tests) runs the same kernels with plain-arithmetic rounding and unpacking
(and fma through float64).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .config_keys import check_config
from .hidden import ACT_CODES, hidden, hidden_launch, launchable

MODE_NONE, MODE_STATIC, MODE_DYNAMIC = 0, 1, 2
# per-row scales below TINY_SCALE (2^-60) are multiplied by SCALE_UP (2^64), with their row's values,
# before a reciprocal is taken (`_codes`, `w4a8_act._recip`): exact, and the reciprocal stays finite
TINY_SCALE = tl.constexpr(8.673617379884035e-19)
SCALE_UP = tl.constexpr(1.8446744073709552e19)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's CPU interpreter (tests)


@triton.jit
def _rint_sw(v):
    """Round half to even (torch.round) of float32 v, in plain arithmetic (the CPU interpreter)."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _rint_hw(v):
    """Round half to even (torch.round) of float32 v: one cvt.rni instruction."""
    return libdevice.rint(v)


_rint = _rint_sw if _INTERPRET else _rint_hw


@triton.jit
def _fma_sw(a, b, c):
    """a * b + c of float32 operands through float64 (the CPU interpreter, whose fma rounds the
    product first): exact product, the sum rounded to float64, then to float32 (a double rounding,
    which can differ from one fused rounding in rare halfway cases; the GPU runs fma.rn)."""
    return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)


@triton.jit
def _fma_hw(a, b, c):
    """a * b + c of float32 operands, rounded once (fma.rn.f32)."""
    return tl.fma(a, b, c)


_fma = _fma_sw if _INTERPRET else _fma_hw


@triton.jit
def _code8_sw(q):
    """int8 code of float32 quotient q: rint, clamped to [-128, 127] (the CPU interpreter)."""
    return tl.minimum(tl.maximum(_rint(q), -128.0), 127.0).to(tl.int8)


SATCVT_ASM = tl.constexpr("cvt.rni.sat.s8.f32 $0, $1;")  # round half to even, saturated to [-128, 127] (NaN: 0)


@triton.jit
def _code8_hw(q):
    """int8 code of float32 quotient q: one cvt.rni.sat.s8 (`SATCVT_ASM`) instead of rint, max, min
    and the conversion; the same codes."""
    c = tl.inline_asm_elementwise(SATCVT_ASM, "=r,r", [q], dtype=tl.int32, is_pure=True, pack=1)
    return c.to(tl.int8)


_code8 = _code8_sw if _INTERPRET else _code8_hw


@triton.jit
def _unpack_sw(wb, INT8: tl.constexpr):
    """(low, high) int4 codes of int8 bytes wb (BN, BK/2), in plain arithmetic (the CPU
    interpreter): int8 16 * q for the int8 dot (INT8), else int8 q."""
    if INT8:
        return wb << 4, (wb >> 4) << 4
    else:
        return (wb << 4) >> 4, wb >> 4


@triton.jit
def _unpack_asm(wb, INT8: tl.constexpr):
    """(low, high) int4 codes of int8 bytes wb (BN, BK/2), four bytes per 32-bit register:
    int8 16 * q by two masks (INT8), else bf16 q exactly: each code n goes into the mantissa of
    bf16 128 + (n ^ 8) = 136 + q (prmt + lop3), then one bf16x2 fma subtracts 136."""
    if INT8:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
            "=r,=r,r", [wb], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 z, m, e, one, off, t0, t1, u0, u1;\n"
            "mov.b32 z, 0; mov.b32 m, 0x000F000F; mov.b32 e, 0x43084308;\n"
            "mov.b32 one, 0x3F803F80; mov.b32 off, 0xC308C308;\n"
            "prmt.b32 t0, $4, z, 0x4140; prmt.b32 t1, $4, z, 0x4342;\n"
            "lop3.b32 u0, t0, m, e, 0x6A; lop3.b32 u1, t1, m, e, 0x6A;\n"
            "fma.rn.bf16x2 $0, u0, one, off; fma.rn.bf16x2 $1, u1, one, off;\n"
            "shr.b32 t0, t0, 4; shr.b32 t1, t1, 4;\n"
            "lop3.b32 u0, t0, m, e, 0x6A; lop3.b32 u1, t1, m, e, 0x6A;\n"
            "fma.rn.bf16x2 $2, u0, one, off; fma.rn.bf16x2 $3, u1, one, off; }",
            "=r,=r,=r,=r,r", [wb], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


_unpack = _unpack_sw if _INTERPRET else _unpack_asm


@triton.jit
def _deint(c, BKD: tl.constexpr):
    """Stored column of activation column c: within each BKD-wide K tile the even columns come
    first, then the odd ones, so the GEMM multiplies the low nibbles (even k) and the high
    nibbles (odd k) of a packed weight tile with two contiguous halves (no interleaving shuffle)."""
    r = c % BKD
    return c - r + (r % 2) * (BKD // 2) + r // 2


@triton.jit
def _rotation_block(kb, perm_ptr, r_ptr, smooth_ptr, B: tl.constexpr, HAS_PERM: tl.constexpr,
                    HAS_SMOOTH: tl.constexpr):
    """Operands of rotation block kb: its columns offs_c (B,), their source channels src (through
    the permutation), the R_in block float32 (B, B) and the smoothing divisors of src (B,) (unused
    placeholder without smoothing)."""
    cb = tl.arange(0, B)
    offs_c = kb * B + cb
    if HAS_PERM:
        src = tl.load(perm_ptr + offs_c)
    else:
        src = offs_c
    r = tl.load(r_ptr + kb * B * B + cb[:, None] * B + cb[None, :]).to(tl.float32)
    if HAS_SMOOTH:
        smooth = tl.load(smooth_ptr + src).to(tl.float32)
    else:
        smooth = offs_c.to(tl.float32)
    return offs_c, src, r, smooth


@triton.jit
def _prep_kernel(x_ptr, stride_xm, M, K, perm_ptr, smooth_ptr, r_ptr, act_scale_ptr, out_ptr,
                 part_ptr, up_ptr, NB: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, MODE: tl.constexpr,
                 G: tl.constexpr, BMP: tl.constexpr, TILES: tl.constexpr, STAGES: tl.constexpr, B: tl.constexpr,
                 HAS_PERM: tl.constexpr, HAS_SMOOTH: tl.constexpr, PREC: tl.constexpr, XLOAD: tl.constexpr,
                 PDL: tl.constexpr, PDL_WAIT: tl.constexpr, ACT: tl.constexpr = 0, HAS_UP: tl.constexpr = False):
    """Program (i, j): rotation blocks i*G .. i*G+G-1, row tiles j*TILES .. j*TILES+TILES-1 of BMP
    rows. Per block, the permutation slice, the R_in block and the scales are loaded once; the row
    tiles stream through a software-pipelined loop (STAGES). XLOAD 0: x (M, K) read through perm;
    1: x already gathered (x[:, perm]); 2: x transposed (K, M), read through perm along tokens.
    ACT (`hidden.ACT_CODES`, XLOAD 0 or 2): the input is act(x) * up (HAS_UP; up laid out as x) or
    act(x), computed from the loaded tiles (`hidden.hidden`).
    PDL: let the next launch start (it waits for this one's results itself); PDL_WAIT: launched
    early after the transpose launch, wait for its results first."""
    if PDL_WAIT:
        gdc_wait()
    if PDL:
        gdc_launch_dependents()
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    for g in range(0, G):
        kb = pid_g * G + g
        offs_c, src, r, smooth = _rotation_block(kb, perm_ptr, r_ptr, smooth_ptr, B, HAS_PERM, HAS_SMOOTH)
        if MODE == 1:
            sk = tl.load(act_scale_ptr + offs_c)
        for t in tl.range(0, TILES, num_stages=STAGES):
            offs_m = (pid_m * TILES + t) * BMP + tl.arange(0, BMP)
            row_ok = offs_m < M
            if XLOAD == 2:  # (B, BMP) tile of x^T: each permuted row is BMP contiguous tokens
                offs = src[:, None] * stride_xm + offs_m[None, :]
                ok = row_ok[None, :]
            else:  # (BMP, B) tile of x, through the permutation unless gathered beforehand
                offs = offs_m[:, None] * stride_xm + (offs_c[None, :] if XLOAD == 1 else src[None, :])
                ok = row_ok[:, None]
            x = tl.load(x_ptr + offs, mask=ok, other=0.0)
            if ACT != 0:
                u = x
                if HAS_UP:
                    u = tl.load(up_ptr + offs, mask=ok, other=0.0)
                x = hidden(x, u, ACT, HAS_UP)
            if XLOAD == 2:
                x = tl.trans(x)
            x = x.to(tl.float32)
            if HAS_SMOOTH:
                x = tl.math.div_rn(x, smooth[None, :])
            xt = tl.dot(x, r, input_precision=PREC)
            if MODE == 2:  # rotated values and the block's absmax; `_quant_kernel` makes the codes
                tl.store(out_ptr + offs_m[:, None] * K + offs_c[None, :], xt, mask=row_ok[:, None])
                tl.store(part_ptr + offs_m * NB + kb, tl.max(tl.abs(xt), axis=1), mask=row_ok)
            elif MODE == 1:  # static per channel (of the rotated basis)
                q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(xt, sk[None, :])), QMIN), QMAX)
                tl.store(out_ptr + offs_m[:, None] * K + offs_c[None, :], (q * sk[None, :]).to(tl.bfloat16),
                         mask=row_ok[:, None])
            else:
                tl.store(out_ptr + offs_m[:, None] * K + offs_c[None, :], xt.to(tl.bfloat16), mask=row_ok[:, None])


@triton.jit
def _transpose_kernel(x_ptr, stride_xm, out_ptr, M, zero_ptr, BT: tl.constexpr, PDL: tl.constexpr,
                      PDL_WAIT: tl.constexpr, ZERO: tl.constexpr):
    """out (K, M) = x (M, K)^T, BT x BT tiles (K a multiple of BT): the prep's XLOAD 2 operand,
    whose permuted rows it then reads as contiguous runs of tokens. PDL_WAIT: launched early,
    wait for the previous launch's results first. ZERO: also zero zero_ptr (M,) float32 (the
    token maxima `w4a8_act` accumulates next)."""
    if PDL_WAIT:
        gdc_wait()
    if PDL:
        gdc_launch_dependents()
    offs_m = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_k = tl.program_id(1) * BT + tl.arange(0, BT)
    mask = offs_m[:, None] < M
    if ZERO:
        tl.store(zero_ptr + offs_m, tl.zeros((BT,), tl.float32), mask=(offs_m < M) & (tl.program_id(1) == 0))
    t = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask)
    tl.store(out_ptr + offs_k[None, :] * M + offs_m[:, None], t, mask=mask)


@triton.jit
def _token_scales(part_ptr, offs_m, row_ok, NB: tl.constexpr, NB_P2: tl.constexpr, QMAX: tl.constexpr):
    """Per-token scales float32 (len(offs_m),) from the per-(token, block) absmax (M, NB): the row
    maximum / QMAX (correctly rounded), 1 for an all-zero row."""
    nbs = tl.arange(0, NB_P2)
    p = tl.load(part_ptr + offs_m[:, None] * NB + nbs[None, :], mask=row_ok[:, None] & (nbs[None, :] < NB), other=0.0)
    return _scale_of_max(tl.max(p, axis=1), QMAX)


@triton.jit
def _scale_of_max(mx, QMAX: tl.constexpr):
    """Per-token scales float32 from the rows' absmax mx: mx / QMAX (correctly rounded), 1 where 0."""
    s = tl.math.div_rn(mx, tl.full(mx.shape, QMAX, tl.float32))
    return tl.where(s > 0, s, 1.0)


@triton.jit
def _codes(v, s, QMIN: tl.constexpr, QMAX: tl.constexpr, FASTDIV: tl.constexpr = False, SATCVT: tl.constexpr = False):
    """int8 codes of float32 values v (R, W) with per-row scales s (R,) > 0: clamp(rint(v / s)),
    v / s correctly rounded: div.rn, or (FASTDIV) Markstein's correction of v' r with one
    reciprocal per row, as `w4a8_act._quotient`: v' = v f, s' = s f (f = 2^64 where s < 2^-60,
    else 1: exact, and s' has a finite reciprocal), r = RN(1 / s'), q0 = v' r, e = v' - q0 s'
    (exact, fma), v / s = RN(q0 + e r). SATCVT with the int8 range: rint and clamp as one saturating
    conversion (`_code8`)."""
    if FASTDIV:
        f = tl.where(s < TINY_SCALE, SCALE_UP, 1.0)
        sf = s * f
        r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), sf)
        vf = v * f[:, None]
        q0 = vf * r[:, None]
        q = _fma(_fma(-q0, sf[:, None], vf), r[:, None], q0)
    else:
        q = tl.math.div_rn(v, s[:, None])
    if SATCVT and QMIN == -128 and QMAX == 127:
        return _code8(q)
    return tl.minimum(tl.maximum(_rint(q), QMIN), QMAX).to(tl.int8)


@triton.jit
def _store_code_runs(out_ptr, offs_m, row_ok, q, c0, K: tl.constexpr, BKD: tl.constexpr):
    """Store codes q (R, W) of columns c0 .. c0 + W - 1 (W <= BKD, c0 even, inside one BKD tile) of
    the (M, K) operand in the GEMM's column order (`_deint`): the even columns, then the odd ones,
    as two contiguous runs (vector stores; per-element addresses would give byte stores)."""
    W: tl.constexpr = q.shape[1]
    even, odd = tl.split(tl.reshape(q, (q.shape[0], W // 2, 2)))
    run = c0 - c0 % BKD + (c0 % BKD) // 2 + tl.arange(0, W // 2)
    rows = out_ptr + offs_m[:, None] * K
    tl.store(rows + run[None, :], even, mask=row_ok[:, None])
    tl.store(rows + (run + BKD // 2)[None, :], odd, mask=row_ok[:, None])


@triton.jit
def _quant_kernel(v_ptr, part_ptr, out_ptr, tok_scale_ptr, M, K: tl.constexpr, NB: tl.constexpr,
                  NB_P2: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, BMQ: tl.constexpr,
                  BKQ: tl.constexpr, QCH: tl.constexpr, PDL: tl.constexpr, BKD: tl.constexpr, RUNS: tl.constexpr,
                  FASTDIV: tl.constexpr, SATCVT: tl.constexpr):
    """Dynamic per-token codes: int8 (M, K) of float32 rotated values with the row scale from the
    per-(token, block) absmax (M, NB), stored in the GEMM's column order (`_deint`). Program
    (i, j): BMQ rows, QCH chunks of BKQ columns; program column 0 also writes the scales (M,).
    PDL: launched early, waits for the prep. FASTDIV: the quotients by one reciprocal per row
    (`_codes`; the same codes)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BMQ + tl.arange(0, BMQ)
    row_ok = offs_m < M
    s = _token_scales(part_ptr, offs_m, row_ok, NB, NB_P2, QMAX)
    tl.store(tok_scale_ptr + offs_m, s, mask=row_ok & (pid_k == 0))
    for c in tl.range(0, QCH):
        offs_k = (pid_k * QCH + c) * BKQ + tl.arange(0, BKQ)
        v = tl.load(v_ptr + offs_m[:, None] * K + offs_k[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q = _codes(v, s, QMIN, QMAX, FASTDIV, SATCVT)
        if RUNS:  # the chunk's even and odd columns as two contiguous runs (BKQ <= BKD)
            _store_code_runs(out_ptr, offs_m, row_ok, q, (pid_k * QCH + c) * BKQ, K, BKD)
        else:
            tl.store(out_ptr + offs_m[:, None] * K + _deint(offs_k, BKD)[None, :], q, mask=row_ok[:, None])


@triton.jit
def _rout_tile(pid_n, N, rout_ptr, BN: tl.constexpr, BO: tl.constexpr):
    """The tile's block-diagonal slice of R_out (BN x BN, R_out's dtype, zeros off the blocks):
    T[i, i'] = r_out[block][i % BO, i' % BO] within one BO block, 0 across blocks."""
    i = tl.arange(0, BN)
    gi = pid_n * BN + i
    same = (i[:, None] // BO) == (i[None, :] // BO)
    return tl.load(rout_ptr + (gi[:, None] // BO) * (BO * BO) + (i[:, None] % BO) * BO + (i[None, :] % BO),
                   mask=same & (gi[:, None] < N), other=0.0)


@triton.jit
def _restore(y, t, RESTORE: tl.constexpr, F32_DOT: tl.constexpr):
    """BD(R_out) restore of a tile of out^T (BN, BMT) float32: one dot with the tile's
    block-diagonal slice t of R_out (`_rout_tile`): RESTORE 0 tf32, 1 bf16 operands (y rounded to
    bf16 first: a norm-wise error <= 2^-9 of y, R_out being orthogonal). One batched dot per
    BO-row block instead (no zero blocks) measured no faster: on BN 128 it compiles to mma.sync at
    255 registers (down_proj 136.4 vs 134.5 us)."""
    if RESTORE == 1:  # bf16 operands, float32 sums (exact products)
        if F32_DOT:  # the interpreter: the same bf16 roundings, float32 products and sums
            return tl.dot(t.to(tl.bfloat16).to(tl.float32), y.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
        return tl.dot(t.to(tl.bfloat16), y.to(tl.bfloat16), out_dtype=tl.float32)
    return tl.dot(t.to(tl.float32), y, input_precision="tf32")


@triton.jit
def _finish(y, t, bias, offs_n, offs_m, M_OUT, N, out_ptr, stride_om, stride_on, HAS_ROUT: tl.constexpr,
            HAS_BIAS: tl.constexpr, RESTORE: tl.constexpr, F32_DOT: tl.constexpr):
    """Epilogue on out^T (BN, BMT) float32: R_out restore with the tile t (`_rout_tile`), bias
    (BN,) float32, cast, store of tokens < M_OUT to out with strides (stride_om, stride_on): (N, 1)
    row-major, or (1, s) token-minor (M_OUT: M, or M rounded up into the padding of s, `_store_tokens`)."""
    if HAS_ROUT:
        y = _restore(y, t, RESTORE, F32_DOT)
    if HAS_BIAS:
        y = y + bias[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M_OUT)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on, y.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _epilogue_operands(pid_n, rows_n, N, w_scale_ptr, rout_ptr, bias_ptr, BN: tl.constexpr, BO: tl.constexpr,
                       LOAD_T: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The epilogue's weight-side operands of weight tile pid_n: row scales float32 (BN,), the
    R_out tile (`_rout_tile`; 0 unless LOAD_T), the bias float32 (BN,) (0 without)."""
    wsc = tl.load(w_scale_ptr + rows_n)
    t = 0.0
    if LOAD_T:
        t = _rout_tile(pid_n, N, rout_ptr, BN, BO)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows_n).to(tl.float32)
    return wsc, t, bias


@triton.jit
def _restore_kernel(yt_ptr, rout_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on, BO: tl.constexpr,
                    BM: tl.constexpr, HAS_ROUT: tl.constexpr, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,
                    PDL: tl.constexpr):
    """out (M, N) = y' BD(R_out)^T + b from y'^T (N, M) bf16 (token-minor, the register-operand
    GEMM's output, `w4a8_rs`): program (j, t) restores output block j (BO channels) of BM tokens,
    as `_restore` with RESTORE 1 (bf16 operands, float32 sums)."""
    j = tl.program_id(0)
    i = tl.arange(0, BO)
    toks = tl.program_id(1) * BM + tl.arange(0, BM)
    ch = j * BO + i
    if PDL:  # launched while the GEMM still runs: wait for its y' before reading it
        gdc_wait()
    yt = tl.load(yt_ptr + ch[:, None] * M + toks[None, :], mask=toks[None, :] < M, other=0.0)
    if HAS_ROUT:  # out^T block = r_out[j] @ y'^T block
        t = tl.load(rout_ptr + j * (BO * BO) + i[:, None] * BO + i[None, :])
        if F32_DOT:  # the interpreter: the same bf16 roundings, float32 products and sums
            y = tl.dot(t.to(tl.bfloat16).to(tl.float32), yt.to(tl.float32), input_precision="ieee")
        else:
            y = tl.dot(t.to(tl.bfloat16), yt, out_dtype=tl.float32)
    else:
        y = yt.to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + ch).to(tl.float32)[:, None]
    tl.store(out_ptr + toks[None, :] * stride_om + ch[:, None] * stride_on, y.to(out_ptr.dtype.element_ty),
             mask=toks[None, :] < M)


@triton.jit
def _gemm_kernel(a_ptr, tok_scale_ptr, w_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr,
                 M, N, K: tl.constexpr, stride_om, stride_on, M_OUT, ws_ptr, cnt_ptr, INT8: tl.constexpr, BN: tl.constexpr, BMT: tl.constexpr, BK: tl.constexpr,
                 GROUP: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr, BO: tl.constexpr,
                 HAS_ROUT: tl.constexpr, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr,
                 PF_N: tl.constexpr, PF: tl.constexpr, RESTORE: tl.constexpr, PART_RESTORE: tl.constexpr,
                 EPI_EARLY: tl.constexpr):
    """M_OUT: the tokens the output store covers (`_finish`). EPI_EARLY: the epilogue's weight-side
    operands (row scales, R_out tile, bias) are loaded first, before the PDL wait, and the token scales right after it, before the main loop, so
    that no load latency is on the path after the last dot."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    num_m = tl.cdiv(M, BMT)
    per_group = GROUP * num_m  # GROUP weight tiles x all token tiles: a weight tile stays in L2
    first_n = (pid // per_group) * GROUP
    group_n = min(num_n - first_n, GROUP)
    pid_n = first_n + ((pid % per_group) % group_n)
    pid_m = (pid % per_group) // group_n

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BMT + tl.arange(0, BMT)
    rows_m = offs_m % M  # tokens past M re-read valid ones; their results are masked at the store
    rows_n = offs_n % N
    K_CHUNK: tl.constexpr = K // SPLIT
    kh = tl.arange(0, BK // 2)
    w_ptrs = w_ptr + rows_n[:, None] * (K // 2) + kh[None, :]
    if INT8:
        a_ptrs = a_ptr + rows_m[:, None] * K + kh[None, :]  # the even-k half of a stored tile (`_deint`)
    else:
        a_ptrs = a_ptr + rows_m[:, None] * K + tl.arange(0, BK)[None, :]
    # the programs that restore load the R_out tile with the other epilogue operands; with split-K
    # and no PART_RESTORE only the tile's last program restores, and loads it there
    LOAD_T: tl.constexpr = HAS_ROUT and (SPLIT == 1 or PART_RESTORE)
    if EPI_EARLY:  # independent of the previous launch: in flight while it finishes
        wsc, t_out, bias = _epilogue_operands(pid_n, rows_n, N, w_scale_ptr, rout_ptr, bias_ptr, BN, BO, LOAD_T,
                                              HAS_BIAS)
    if PDL:  # launched while the activation launch still runs: fetch this program's weights into
        # L2 (PF_N lines of 128 bytes per row), then wait for the activations; no write before the wait
        line = tl.minimum(tl.arange(0, PF), PF_N - 1)
        pf = w_ptr + rows_n[:, None] * (K // 2) + (pid_k * K_CHUNK) // 2 + line[None, :] * 128
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pf], dtype=tl.int32,
                                  is_pure=False, pack=1)
        gdc_wait()
    if EPI_EARLY and INT8:  # the token scales (the previous launch's): also in flight during the main loop
        tok_s = tl.load(tok_scale_ptr + rows_m)
    if SWAP:
        acc = tl.zeros((BN, BMT), dtype=tl.int32 if INT8 else tl.float32)
    else:
        acc = tl.zeros((BMT, BN), dtype=tl.int32 if INT8 else tl.float32)
    for k0 in range(0, K_CHUNK, BK):
        kk = pid_k * K_CHUNK + k0
        lo, hi = _unpack(tl.load(w_ptrs + kk // 2).to(tl.int8, bitcast=True), INT8)
        if INT8:  # int8 16 * q: exact int32 sums (|sum| <= K * 2^14 < 2^31: `supports` caps K), 1/16 below
            # packed byte j: low nibble = column kk + 2j, high = kk + 2j + 1; the codes' tile holds
            # those columns as two contiguous halves (`_deint`): two dots, no shuffle of W
            a_lo = tl.load(a_ptrs + kk)
            a_hi = tl.load(a_ptrs + kk + BK // 2)
            if SWAP:
                acc = tl.dot(lo, tl.trans(a_lo), acc, out_dtype=tl.int32)
                acc = tl.dot(hi, tl.trans(a_hi), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a_lo, tl.trans(lo), acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, tl.trans(hi), acc, out_dtype=tl.int32)
        else:  # bf16 operand in natural column order (two dots measured slower here)
            w = tl.join(lo, hi).reshape(BN, BK)  # column 2j: low nibble, 2j+1: high
            a = tl.load(a_ptrs + kk)
            if F32_DOT:  # Triton's CPU interpreter multiplies bf16 bit patterns; tests only
                if SWAP:
                    acc = tl.dot(w.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                if SWAP:
                    acc = tl.dot(w.to(tl.bfloat16), tl.trans(a), acc)
                else:
                    acc = tl.dot(a, tl.trans(w.to(tl.bfloat16)), acc)
    if not EPI_EARLY:
        wsc, t_out, bias = _epilogue_operands(pid_n, rows_n, N, w_scale_ptr, rout_ptr, bias_ptr, BN, BO, LOAD_T,
                                              HAS_BIAS)
    y = acc.to(tl.float32)
    if not SWAP:
        y = tl.trans(y)  # (BN, BMT)
    if INT8:
        if not EPI_EARLY:
            tok_s = tl.load(tok_scale_ptr + rows_m)
        y = (y * 0.0625) * tok_s[None, :]  # exact: the codes were 16 * q
    y = y * wsc[:, None]
    if SPLIT == 1:
        _finish(y, t_out, bias, offs_n, offs_m, M_OUT, N, out_ptr, stride_om, stride_on, HAS_ROUT, HAS_BIAS, RESTORE,
                F32_DOT)
    else:  # split-K: partial sums to the workspace; the last program of the tile adds them in order
        if HAS_ROUT and PART_RESTORE:  # the restore is linear: each program restores its own partial
            y = _restore(y, t_out, RESTORE, F32_DOT)
        wsp = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.store(wsp + pid_k * (M * N), y, mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))
        if not F32_DOT:  # make this thread's stores visible GPU-wide before the counter moves
            tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [pid_k], dtype=tl.int32,
                                      is_pure=False, pack=1)
        tl.debug_barrier()
        # relaxed counter between the two fences (the threadfence-reduction pattern): expert down_proj
        # 12.0 -> 11.5 us, LLM down_proj at M = 1 19.3 -> 18.8 us against an acq_rel counter
        done = tl.atomic_add(cnt_ptr + pid, 1, sem="relaxed" if not F32_DOT else "acq_rel")
        if done == SPLIT - 1:
            if not F32_DOT:  # acquire side: the other programs' partials, after their fences
                tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [pid_k], dtype=tl.int32,
                                          is_pure=False, pack=1)
            tot = tl.zeros((BN, BMT), dtype=tl.float32)
            for sk in range(0, SPLIT):  # fixed order: deterministic sums
                tot += tl.load(wsp + sk * (M * N), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N),
                               other=0.0, cache_modifier=".cg")
            if LOAD_T or not HAS_ROUT:  # PART_RESTORE: the partials are restored already
                _finish(tot, t_out, bias, offs_n, offs_m, M_OUT, N, out_ptr, stride_om, stride_on,
                        HAS_ROUT and not PART_RESTORE, HAS_BIAS, RESTORE, F32_DOT)
            else:
                _finish(tot, _rout_tile(pid_n, N, rout_ptr, BN, BO), bias, offs_n, offs_m, M_OUT, N, out_ptr, stride_om,
                        stride_on, True, HAS_BIAS, RESTORE, F32_DOT)
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")  # ready for the next call (kernel boundary orders it)


def is_token_minor(x: torch.Tensor) -> bool:
    """x (M, K) is the transpose of a tensor with contiguous rows (strides (1, s), s >= M), M > 1."""
    return x.dim() == 2 and x.shape[0] > 1 and x.stride(0) == 1 and x.stride(1) >= x.shape[0]


def supports(in_features: int, out_features: int, block_in: int, block_out: int | None) -> str | None:
    """None when the kernels handle this layer geometry, else the reason they do not."""
    if in_features % 128:
        return f"in_features {in_features} is not a multiple of 128"
    if in_features > 1 << 16:  # int8 path: K products of up to 2^14 (16 * q times a code) in int32
        return f"in_features {in_features} exceeds 65536"
    if block_in not in (16, 32, 64, 128) or in_features % block_in:
        return f"input block {block_in} must be 16/32/64/128 and divide in_features"
    if block_out is not None and (block_out not in (16, 32, 64, 128) or out_features % block_out):
        return f"output block {block_out} must be 16/32/64/128 and divide out_features"
    if out_features % 64:
        return f"out_features {out_features} is not a multiple of 64"
    return None


def token_minor_pays(m: int) -> bool:
    """Whether a producer should write its output token-minor for a consumer's kernels at M = m
    tokens (mlp_layout.py). Measured (sweep_w4a8.py --token-minor, H200, dynamic): LLM down_proj
    at M = 800 120.0 vs 136.0 us (no transpose launch), expert down_proj at M = 50 12.4 vs 13.5 us
    (the prep reads runs of tokens instead of gathering 2-byte elements)."""
    return m > 16


# the register-operand GEMM of LLM down_proj at M <= 64 (its BN 64 and BK 256 are the M <= 16 Triton tiles')
SMALL_M_DOWN_RS = dict(BMT=32, SPLIT=4, RS_STAGES=5, PDL=True, RS_PDL=True)


def pick_config(m: int, n: int, k: int, mode: int) -> dict:
    """Launch configuration for (M tokens, N out, K in): the fastest measured on an H200 for the
    pi0.5 shapes (benchmarks/stages_w4a8.py, sweep_w4a8.py; docs/benchmarks.md). Keys: prep G
    (64-wide blocks per program), BMP (rows per tile), TILES (row tiles per program), XLOAD (how x
    is read through the permutation), prep_warps, prep_warps_hidden (where the prep computes an MLP
    hidden, `prepare_activation(act=)`; default prep_warps), prep_stages; quantize BMQ (rows), QCH (column
    chunks), QRUNS (codes stored as vector runs; False: per element, the same codes); GEMM BN
    (weight rows), BMT (tokens), BK, GROUP, SWAP (weight as the dot's register operand), SPLIT
    (split-K), num_warps, num_stages, RESTORE (the R_out restore dot, `_restore`), PART_RESTORE
    (split-K programs restore their partial sums), TAIL_BMT (the last M % BMT tokens in a second
    launch of that many tokens per tile, `tail_tokens`), EPI_EARLY (the epilogue's weight-side
    operands loaded before the main loop and the PDL wait); SATCVT (the codes by one saturating
    conversion, `_code8`); QFASTDIV (the quantize launch's quotients by one reciprocal per row,
    `_codes`); GEMM "rs" (`w4a8_rs`; RS_TRIGGER: its restore launch may start during the GEMM; RS_RESTORE:
    the restore in its epilogue instead; RS_PDL: launched with PDL; RS_TAIL_OVERLAP: with RS_PDL, its
    TAIL_BMT launch starts once every program of the first launch has its codes, beside that launch's
    last wave, `w4a8_rs._rs_gemm_kernel` RELEASE / END_WAIT; RS_CONFIG: keys that apply only
    where it runs, e.g. its tiles, merged by `resolve_config`),
    ACT "wgmma" (`w4a8_act`, ACT_BM / ACT_TT / ACT_STAGES / ACT_WARPS; ACT_RCACHE on the bf16-terms path)
    or "cluster" (`w4a8_cluster`, CL / CL_BM / CL_WARPS) on sm_90, both with ACT_F16 (one float16 dot per
    block on rows scaled by powers of two instead of R_in's bf16 hi + lo terms); PDL (programmatic
    dependent launch), PREP_PDL (the first activation launch launched with PDL too)."""
    dynamic = mode == MODE_DYNAMIC
    # PREP_PDL: with PDL, the first activation launch starts early too and waits for x's producer
    # (measured against it off, sweep_w4a8.py --ab: expert layers at M = 50 0.3-0.4 us each, M = 1 0.7 us)
    # QFASTDIV: the quantize launch's quotients by one reciprocal per row (the same codes). Same-run A/B at
    # M = 50 (sweep_w4a8.py --ab, us; neither / EPI_EARLY off / both): expert o 9.6 / 9.2 / 9.0, q/k/v group
    # 8.5 / 7.9 / 7.6, gate/up group 10.2 / 9.8 / 9.6, down 11.7 / 11.9 / 11.7
    # SATCVT (the kernels' default): the codes by one cvt.rni.sat.s8 instead of rint, max, min, cvt. Same-run A/B
    # (us, on / off): LLM down_proj 91.7 / 94.6, q/o 20.2 / 20.6, q/k/v group 23.2 / 23.7; expert layers unchanged
    # ACT_F16 (the Gluon activation kernels, `w4a8_act` and `w4a8_cluster`): one float16 wgmma per 64-wide block on
    # rows scaled by powers of two, R_in's float16 block copied as it is, instead of its bf16 hi + lo split and two
    # wgmma; the same exact products. Same-run A/Bs (us, on / off / on / off): LLM down_proj (token-minor) 87.1 /
    # 89.1 / 87.2 / -, q/o 19.8 / 20.1 / 19.7 / 20.1, k/v 16.3 / 16.9 / 16.3 / 16.9, q/k/v group 22.4 / 23.2 / 22.5 /
    # 23.2, gate/up group 144.9 / 146.1 / 144.9 / 146.1
    cfg = dict(G=1, BMP=16, prep_warps=4, GROUP=8, SWAP=True, BMQ=4, QCH=4 if k > 4096 else 1, PDL=True,
               PREP_PDL=True, QFASTDIV=True, ACT_F16=True)
    if m <= 16:  # memory bound: split-K spreads the weight stream over every SM
        if dynamic:
            cfg.update(BN=64, BMT=16, BK=256, SPLIT=4, SWAP=False, num_warps=4, num_stages=3)
            if n >= 8192:
                cfg.update(SPLIT=2, SWAP=True)
            elif k > 4096:  # sm_90: the register-operand GEMM, split-K over 32-token tiles (int32 partial sums),
                # restore in the epilogue, 5 stages, PDL: LLM down_proj 16.2 / 16.0 us vs 19.4 / 18.9 for the Triton
                # GEMM (two same-run A/Bs, sweep_w4a8.py --ab; split 8 15.6 / 16.3, 3 stages 16.6, no RS_PDL 17.2);
                # not for the gate/up projections (18.2-20.4 vs 16.8 us) nor q/o (8.7-10.5 vs 8.6)
                cfg.update(GEMM="rs", RS_RESTORE=True, RS_CONFIG=dict(SMALL_M_DOWN_RS))
        else:
            cfg.update(BN=64, BMT=16, BK=128, SPLIT=4, num_warps=4, num_stages=3)
            if n >= 8192:
                cfg.update(BN=128, SPLIT=2, num_warps=8)
            elif k > 4096:
                cfg.update(BN=128, SPLIT=8)
        return _epilogue(cfg, dynamic)
    mid_expert = dynamic and 64 < m <= small_m_tokens(n, k)  # the action expert's shapes on a batch of chunks
    if m <= 64 or mid_expert:
        # EPI_EARLY (dynamic): no load left after the GEMM's main loop (the A/B above)
        cfg.update(BN=64, BMT=64, BK=128, SPLIT=4, num_warps=4, num_stages=3, EPI_EARLY=dynamic)
        if dynamic and k >= 4096:  # down_proj's prep computing the MLP hidden: 2 warps. mlp_gpu.py --down-ab
            # prep_warps=2 (H200, fused MLP block, us): expert M = 50 / 100 / 256 23.0 / 27.6 / 31.2 vs 23.2 / 29.1 /
            # 33.9, language model M = 64 44.2 vs 47.5 (BMP 32 or G 2 instead: slower at 50 and 100)
            cfg.update(prep_warps_hidden=2)
        if k <= 1024 and (dynamic or n >= 2048):
            cfg.update(SPLIT=1)
            if dynamic and n >= 2560:  # measured on the linked q/k/v and gate/up groups (9.8 vs 10.4 us,
                cfg.update(BK=256)  # 11.0 vs 11.7 us); the single layers were not re-swept
            if mid_expert and n >= 8192:  # the linked gate/up group above 64 tokens: 128-token tiles (above)
                cfg.update(BMT=128)
        elif dynamic and k == 2048 and n <= 1024:  # expert o_proj: 11.6 vs 12.4 us (split-K 4, BK 128)
            cfg.update(SPLIT=1, BK=256)
        elif dynamic and n <= 1024:  # expert down_proj, split-K 4 over 32-token tiles: 14.2 vs 15.0 us
            cfg.update(BMT=32)
            if m > 128:  # sm_90, a batch of chunks: the register-operand GEMM split 2 (int32 partial sums), 256-wide
                # K steps, 5 stages; sweep_w4a8.py --token-minor --ab (H200, us): M = 200 15.0 vs 17.8 (split 4 19.4,
                # split 8 25.0, 64-token tiles 19.0); M = 100 13.4 vs 13.8, M = 50 / 64 slower (12.1-15.7 vs 11.7 / 11.3)
                cfg.update(GEMM="rs", RS_RESTORE=True, RS_CONFIG=dict(BN=64, BMT=32, BK=256, SPLIT=2, num_warps=4,
                                                                      RS_STAGES=5, PDL=True, RS_PDL=True))
        elif dynamic and n >= 8192 and k <= 4096:  # LLM gate/up, linked gate/up group (msweep_gpu.py; sweep_w4a8.py
            # --ab at M = 32 / 64, us, H200; the M <= 16 tiles 20.6-52.8, the picks before 26.4-45.6):
            # gate/up 15.0 / 15.7, linked 20.0 / 22.0 against bf16 18.9 / 19.6 and 35.0 / 36.2
            cfg.update(SPLIT=1, BK=256, BMT=32 if m <= 32 else 64)
            if m > 32 and n >= 32768:  # the linked group at 64 tokens: 128-row rs tiles 22.0 vs 24.9 us (gate/up
                cfg.update(GEMM="rs", RS_RESTORE=True,  # alone 17.0 vs 15.7 us, its 256 tiles of 64 rows)
                           RS_CONFIG=dict(BN=128, BMT=64, BK=128, num_warps=8, RS_STAGES=4, PDL=True, RS_PDL=True))
        elif dynamic and k > 4096:  # LLM down_proj (token-minor hidden): the M <= 16 register-operand GEMM, split-K
            # 4, 32- or 64-token tiles: 18.8 / 20.3 us at M = 32 / 64 against 26.3 / 28.1 (Triton split-K) and
            # bf16 22.3 / 24.6 (sweep_w4a8.py --token-minor --ab)
            cfg.update(GEMM="rs", RS_RESTORE=True,
                       RS_CONFIG=dict(SMALL_M_DOWN_RS, BN=64, BK=256, BMT=32 if m <= 32 else 64))
        if dynamic and cfg["SPLIT"] == 1 and 1024 <= n <= 2560 and k <= 2048:  # 32-token tiles: twice the
            cfg.update(BMT=32)  # programs, no split-K sums (expert o 10.0 vs 11.2 us, linked q/k/v 8.8 vs 9.8 us)
        if not dynamic and (k >= 2048 or n >= 8192):  # measured: PDL slower here (expert o/down static,
            cfg.update(PDL=False)  # 13.0 -> 16.2 us; linked gate/up static 12.1 us without vs 13.3 us with)
        return _epilogue(cfg, dynamic)
    # x^T first: the prep then reads whole runs of tokens per permuted channel (no 16x sector gather)
    cfg.update(XLOAD="transpose", BMP=128 if k <= 4096 else 64, prep_warps=8 if k <= 4096 else 4,
               TILES=4 if dynamic and k > 4096 else 1, prep_stages=3)
    if k > 4096 or n < 1024 or n >= 16384:  # measured: PDL slower for the k/v and gate/up projections (gate/up
        cfg.update(PDL=False)  # 108.1 -> 106.6 us, linked gate/up 201.5 -> 196.9 us); LLM down_proj: below
    # GEMM tiles (sweep_w4a8.py, H200). The int8 loop waits for each wgmma (Triton 3.6 keeps none in
    # flight with a register operand), so programs per SM hide the latency: fewer pipeline stages
    # where the grid is large (offline ptxas: BN64/BMT128/BK128 at 3 stages is 127 registers and
    # 56 KB, 4 programs per SM instead of 2 at 4 stages; benchmarks/compile_w4a8.py)
    if dynamic and k > 4096:  # int8 tensor cores; LLM down_proj: 136.9 vs 140.1 us (BN 64, BMT 128, BK 128)
        cfg.update(BN=128, BMT=128, BK=256, SPLIT=1, num_warps=8, num_stages=3)
        # sm_90: the register-operand Gluon GEMM + restore launch (`w4a8_rs`); the GEMM alone without
        # the restore took 49.9 us against 61.6 us for the Triton GEMM without it (kernels v8 probes)
        cfg.update(GEMM="rs", RS_STAGES=4)
        # sm_90: the activation codes by two wgmma rotation passes (`w4a8_act`); down_proj with
        # token-minor input 99.4 vs 108.9 us; pass 2 copying the R_in terms pass 1 wrote (ACT_RCACHE):
        # 96.2-96.8 vs 97.0-99.0 us in three same-run A/Bs
        cfg.update(ACT="wgmma", ACT_RCACHE=True)
        # 64-token tiles, two per program through a 2-stage ring (R_in's terms split or copied once per 128
        # tokens, half the accumulator registers): down_proj (token-minor) 95.1 / 95.3 / 95.2 vs 97.0 / 97.3 / 97.9 us
        # in three same-run A/Bs; 128-token tiles two per program 100.3-100.4, 64-token tiles 3-13 per program 96.0-102.9
        cfg.update(ACT_BM=64, ACT_TT=2, ACT_STAGES=2)
        # the restore launch starts on the SMs the GEMM's 112 tiles leave free (RS_TRIGGER), and PDL between the
        # activation passes: 90.2 / 89.9 vs 92.7 / 91.4 us (two same-run A/Bs; RS_TRIGGER alone 90.6 / 90.5,
        # PDL alone 91.3 / 91.1)
        cfg.update(PDL=True, RS_TRIGGER=True)
        # the R_out restore in the register-operand GEMM's epilogue instead of its own launch (RS_RESTORE; ptxas keeps
        # the wgmma in flight since the main loop's first steps are peeled, `w4a8_rs.rs_mainloop`), without letting
        # the next launch start early: down_proj (token-minor) 86.3 / 85.9 vs 89.8 / 89.0 us (two same-run A/Bs;
        # with RS_TRIGGER 87.1)
        cfg.update(RS_RESTORE=True, RS_TRIGGER=False)
        # the GEMM launched with PDL too (RS_PDL), its weight tiles requested before it waits for pass 2's codes:
        # 82.4 / 82.1 vs 87.0 / 86.8 us (same-run A/B)
        cfg.update(RS_PDL=True)
        # up to 512 tokens the 128 x 128 tiles leave most SMs idle (16 programs at M = 128). sweep_w4a8.py
        # --token-minor --ab, us (H200; bf16 in brackets), against 58.5 / 62.5 / 65.9 / 71.4 at M = 128 / 256 / 384 /
        # 512 with those tiles: up to M = 128 64-token tiles and split-K 4 (29.0-29.2 [25.0]); up to 512 64-row tiles,
        # 64- or 128-token ones by padding (`_token_tile`), split-K 2 up to M = 256: M = 192 34.2 [29.5], 256 34.4
        # [31.4], 384 42.0 [41.0], 512 47.2 [51.0]; at 640 these tiles 74.0, the 128 x 128 ones 74.6 [62.2]
        if m <= 128:
            cfg.update(BMT=64, SPLIT=4)
        elif m <= 512:
            cfg.update(BN=64, num_warps=4, BMT=_token_tile(m, 64, 128, 0), SPLIT=2 if m <= 256 else 1)
    elif dynamic and n >= 2560:  # linked gate/up 156.5 vs 176.4 us, linked q/k/v 29.1 vs 34.6 us (4 stages)
        cfg.update(BN=64, BMT=128, BK=256, SPLIT=1, num_warps=4, num_stages=2)
        if n < 8192:  # linked q/k/v after the cluster activation launch: 64-token tiles 23.6 vs 25.5-25.9 us
            cfg.update(BMT=64)  # (two runs); linked gate/up 165.2 vs 149.8 us with them
        else:  # the last M % 128 <= 32 tokens in a second launch of 32-token tiles (`tail_tokens`): linked
            cfg.update(TAIL_BMT=32)  # gate/up GEMM alone 132.7 vs 135.8 us, layer (token-minor) 146.8 vs 150.9
            # sm_90: the register-operand Gluon GEMM with its restore in the epilogue, 256-token tiles (each unpacked
            # weight operand feeds two N = 128 wgmma), 128-wide K steps through 4 stages, the last 32 tokens in a
            # second launch (`w4_gemm`): linked gate/up 137.8 / 138.2 / 139.1 us vs 145.4 / 150.0 (three runs, 3-4
            # stages), gate/up 79.1 vs 82.2; 128-token tiles 151.0, BK 256 163-164, BK 64 169-172, 64-row tiles
            # 152.8-163.1. With PDL for the activation launch and the GEMM (RS_PDL): linked gate/up 134.0 vs 138.2
            # (RS_PDL alone 136.9), gate/up 74.5 vs 77.0. RS_CONFIG applies only where that GEMM runs (`resolve_config`).
            # RS_TAIL_OVERLAP: the 32-token launch runs beside the last wave of 256-token tiles (two same-run A/Bs, us):
            # linked gate/up 132.2 / 131.3 vs 135.9 / 136.1, gate/up 73.9 / 73.8 vs 75.7 / 75.7
            # 128-token tiles where they pad M less than 256-token ones (`_token_tile`): at M = 128 / 384 / 640
            # gate/up 18.9 / 38.8 / 60.6 us vs 30.3 / 48.4 / 64.6, linked 31.7 / 70.8 / 110.9 vs 53.7 / 86.0 / 119.1;
            # at M = 256 and 800 (equal padding) the 256-token tiles stay (gate/up 27.1 vs 29.1 us at M = 256)
            cfg.update(GEMM="rs", RS_RESTORE=True,
                       RS_CONFIG=dict(BN=128, BMT=_token_tile(m, 128, 256, 32), BK=128, num_warps=8, RS_STAGES=4, TAIL_BMT=32,
                                      PDL=True, RS_PDL=True, RS_TAIL_OVERLAP=True))
        # sm_90: the activation codes in one cluster launch (`w4a8_cluster`), no transpose launch:
        # linked gate/up 148.3 vs 151.4 us, linked q/k/v 25.6 vs 26.6 us
        cfg.update(ACT="cluster", CL=16)
    elif dynamic and n < 1024:  # k/v_proj: 20.4 vs 23.5 us
        cfg.update(BN=64, BMT=64, BK=128, SPLIT=1, num_warps=4, num_stages=4)
        # sm_90: the cluster launch (`w4a8_cluster`, no PDL) 17.3 us, `w4a8_act` 18.6 us (v10: 18.9 vs 20.6 us
        # for the Triton launches), with PDL 20.6 us
        cfg.update(ACT="cluster", CL=16)
        # sm_90: the register-operand GEMM with the restore in its epilogue, 256-wide K steps: 14.4 / 14.1 vs
        # 16.4 / 16.2 us (two runs; 128-token or 128-row tiles 15.6-19.7); with PDL for both launches 13.5
        cfg.update(GEMM="rs", RS_RESTORE=True,
                   RS_CONFIG=dict(BN=64, BMT=64, BK=256, num_warps=4, RS_STAGES=3, PDL=True, RS_PDL=True))
    elif dynamic:  # q/o_proj after the cluster activation launch: BK 256 with 3 stages 20.9 vs 21.9 us (BK 128,
        cfg.update(BN=64, BMT=128, BK=256, SPLIT=1, num_warps=4, num_stages=3)  # 4 stages)
        cfg.update(EPI_EARLY=True)  # no load after the main loop: 20.6 vs 21.0 us (two same-run A/Bs)
        # q/o_proj on sm_90: the cluster launch (`w4a8_cluster`) with PDL 21.5 us, without 22.7 us;
        # `w4a8_act` (no PDL) 24.4 us (v10: 24.9 vs 25.9 us for the Triton launches, 25.8 us without PDL)
        cfg.update(ACT="cluster", CL=16)
    elif n * k >= 1 << 25 and k <= 4096:
        cfg.update(BN=128, BMT=256, BK=64, SPLIT=1, num_warps=8, num_stages=4)
    elif n < 1024:
        cfg.update(BN=128, BMT=64, BK=64, SPLIT=4, num_warps=4, num_stages=4)
    elif n > 2048 and k <= 4096:  # linked q/k/v static: 41.4 vs 55.6 us (BN128/BK128/8 warps)
        cfg.update(BN=64, BMT=128, BK=64, SPLIT=1, num_warps=4, num_stages=3)
    else:  # q/o_proj static 30.8 vs 34.5 us, down_proj static 174.6 vs 193.0 us (BN128/8 warps)
        cfg.update(BN=64, BMT=128, BK=128, SPLIT=1, num_warps=4, num_stages=3)
    if dynamic and _mid_expert_tiles(m, n, k):
        cfg.update(BN=64, BMT=32, BK=256, SPLIT=1, num_warps=4, num_stages=3, EPI_EARLY=True)
    return _epilogue(cfg, dynamic)


MID_M_TOKENS = 256  # up to this many tokens the action expert's shapes get their own picks (a batch of chunks)


def small_m_tokens(n: int, k: int) -> int:
    """Up to how many tokens the dynamic (N out, K in) layer takes `pick_config`'s small-M launches
    (the Triton activation launches, 32- to 128-token GEMM tiles): 64, and more for the action
    expert's shapes (a batch of 50-token chunks). msweep_gpu.py at M = 65 / 100 / 128 / 200 / 256
    against the large-M picks, consecutive runs on one machine, us (H200; bf16 in brackets):
    - down_proj 1024 x 4096 (token-minor): 12.7 / 13.8 / 13.6 / 17.9 / 19.0 vs 22.5 / 23.3 / 22.4 /
      23.4 / 22.3 (8.8 / 8.4 / 8.6 / 9.7 / 9.6); above 128 tokens with the register-operand GEMM split 2
      (`pick_config`): 13.8 / 15.0 / 15.6 at 160 / 200 / 256 (sweep_w4a8.py, against 15.2 / 17.8 / 19.0);
    - linked gate/up 8192 x 1024 (128-token tiles): 11.9 / 12.1 / 11.9 / 13.8 / 13.7 vs 14.0 / 16.3 /
      12.8 / 25.8 / 18.1 (10.9 / 10.8 / 10.6 / 12.7 / 12.4);
    - up to 100 tokens: gate/up 4096 x 1024 9.6 / 10.6 vs 11.8 / 11.8, q 2048 x 1024 8.6 / 8.8 vs
      9.8 / 10.1, linked q/k/v 2560 x 1024 8.2 / 9.9 vs 10.8 / 10.9. Above, these take the large-M
      activation launch with 32-token GEMM tiles instead (`_mid_expert_tiles`).
    - not o_proj 1024 x 2048 (13.7 / 13.7 vs 13.5 / 13.3 at 100 / 128, 15.7 vs 13.8 at 200; it takes
      `_mid_expert_tiles`), nor k/v 256 x 1024 (equal), nor the language model's shapes
      (sweep_w4a8.py --ab: slower)."""
    if (n >= 8192 and k <= 1024) or (n <= 1024 and k >= 4096):
        return MID_M_TOKENS
    if k <= 1024 and n >= 1024:
        return 100
    return 64


def _mid_expert_tiles(m: int, n: int, k: int) -> bool:
    """Whether a dynamic (N out, K in) layer past `small_m_tokens` takes 32-token Triton GEMM tiles (BN 64,
    BK 256, no split-K, 3 stages) after its large-M activation launch: the action expert's q, o, gate/up
    and linked q/k/v at up to MID_M_TOKENS. sweep_w4a8.py --ab (H200, us, the large-M tiles in brackets)
    at M = 128 / 200 / 256: o 10.4 / 12.0 / 11.8 (13.4 / 13.8 / 13.6), q 8.4 / 9.9 / 9.6 (9.8 / 10.2 /
    9.9), gate/up 9.7 / 11.3 / 11.3 (11.1 / 12.3 / 11.9), linked q/k/v 8.5 / 10.2 / 9.8 (10.4 / 11.2 /
    10.8); o at M = 100 10.7 (13.7). 64-token tiles were within 0.8 us of these, 128-token ones slower."""
    return m <= MID_M_TOKENS and 1024 <= n <= 4096 and min(n, k) <= 1024 and k <= 2048


def _padded_tokens(m: int, bmt: int, tail: int) -> int:
    """Tokens the GEMM's tiles cover for M = m: whole bmt-token tiles, and the last `tail_tokens` in
    tail-token tiles where the TAIL_BMT launch takes them."""
    t = tail_tokens(m, {"BMT": bmt, "TAIL_BMT": tail})
    return -(-(m - t) // bmt) * bmt + (-(-t // tail) * tail if t else 0)


def _token_tile(m: int, small: int, large: int, tail: int) -> int:
    """Tokens per GEMM tile for M = m: `small` where it covers fewer padded tokens than `large`, else `large`."""
    return small if _padded_tokens(m, small, tail) < _padded_tokens(m, large, tail) else large


def _epilogue(cfg: dict, dynamic: bool) -> dict:
    """How the GEMM restores R_out on the int8 (dynamic) path, measured on an H200
    (sweep_w4a8.py --ab, docs/benchmarks.md "kernels v9"):
    - RESTORE 1 (bf16 operands for the restore dot) without split-K: the linked gate/up group at
      M = 800 150.0 vs 155.6 us, gate/up 85.7 vs 88.6 us, no such shape slower by more than 0.1 us.
      It adds about one bf16 rounding of the sums (relative error against the float32 reference
      2.9e-3 instead of 1.7e-3 in that sweep). Not with split-K (expert down_proj 21.2 vs 13.2 us).
    - PART_RESTORE (each split-K program restores its partial sums; the last one only adds) with
      4-way split-K: q/o at M = 1 8.3 vs 8.7 us, q/k/v group 8.9 vs 9.3, down 19.0 vs 19.5, expert
      down_proj (token-minor input) 11.8 vs 12.2 us. Not with 2-way split-K (gate/up group at
      M = 1 28.4 vs 27.9 us)."""
    if dynamic and cfg["SPLIT"] == 1:
        cfg["RESTORE"] = 1
    if dynamic and cfg["SPLIT"] >= 4:
        cfg["PART_RESTORE"] = True
    return cfg


_PREC = {"tf32": "tf32", "tf32x3": "tf32x3", "ieee": "ieee"}


def _use_pdl(cfg: dict, device: torch.device, key: str = "PDL") -> bool:
    """PDL requested by the configuration (cfg[key]), on a GPU that supports it (sm_90+), not interpreted."""
    if not cfg.get(key) or _INTERPRET:
        return False
    from . import device_capability, pdl_ok
    return pdl_ok(device_capability(device))


def _pdl(on: bool) -> dict:
    """Launch option for programmatic dependent launch (Hopper+): the kernel may start while the
    previous launch of the stream runs, and waits (griddepcontrol.wait) before it reads that
    launch's results or writes anything."""
    return {"launch_pdl": True} if on else {}


def prepare_activation(x: torch.Tensor, *, r_in: torch.Tensor, perm: torch.Tensor | None,
                       smooth: torch.Tensor | None, mode: int, qmin: int = -128, qmax: int = 127,
                       act_scale: torch.Tensor | None = None, cfg: dict,
                       rot_precision: str = "tf32", up: torch.Tensor | None = None,
                       act: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The activation launches: x (M, K) -> (a, tok_scale), the GEMM's operand (M, K): int8 codes
    with per-token scales float32 (M,) for dynamic activations (prep + quantize launch), else
    bf16 values (static q*s, or rotated values without activation quantization) and None.
    x: rows contiguous (stride (s, 1)), or token-minor (strides (1, s), s >= M: the transpose of
    a (K, s) tensor, e.g. `w4_gemm(token_minor=True)`'s output), which the prep reads as x^T
    directly (no transpose launch). act (`hidden.ACT_CODES`: "gelu_tanh", "silu"): the layer's input is
    act(x) * up (up None: act(x); up with x's shape and strides), computed by the Triton prep from
    its loaded tiles where it reads x itself (`hidden`), else first by one elementwise launch
    (`hidden_launch`; by torch where it does not take x, `hidden.launchable`)."""
    m, k = x.shape
    b = r_in.shape[-1]
    nb = k // b
    dummy = r_in  # placeholder pointer for absent optional tensors (never read)
    g = max(1, min(nb, cfg["G"] * 64 // b))  # G counts 64-wide blocks; programs own whole groups
    while nb % g:
        g -= 1
    bmp = cfg["BMP"]
    tiles = max(1, min(cfg.get("TILES", 1), triton.cdiv(m, bmp)))
    dynamic = mode == MODE_DYNAMIC
    xload = {"gather": 0, "index_select": 1, "transpose": 2}[cfg.get("XLOAD", "gather")] if perm is not None else 0
    pdl = _use_pdl(cfg, x.device)
    bkd = gemm_tiling(k, cfg)[0]  # the int8 codes' column order follows the GEMM's K tiles (`_deint`)
    early = pdl and cfg.get("PREP_PDL", False)  # the first launch starts early, waits for x's producer
    tokmax = None  # the Gluon passes' token maxima, zeroed by the launch before them
    gluon, mod = _gluon_activation(x, xload, cfg, dynamic, r_in, smooth, qmax, bkd)
    checked = True  # x is what `_gluon_activation` checked, or a hidden laid out like it (`hidden_launch`)
    if act is not None and not _prep_reads_hidden(x, up, xload, gluon):
        if launchable(x, up):  # one elementwise launch (torch: two), which also zeroes the token maxima
            if gluon == "wgmma" and is_token_minor(x):
                tokmax = torch.empty((m,), device=x.device, dtype=torch.float32)
            x = hidden_launch(x, up, act, early=early, pdl=pdl, zero=tokmax)
            early = pdl  # the next launch waits for it
        else:  # torch's result may be laid out otherwise
            from ..mlp_activation import hidden as torch_hidden
            x, checked = torch_hidden(x, up, act), False
        up, act = None, None
    if gluon == "cluster" and (checked or mod.usable(x, r_in, smooth, qmax, bkd, cfg)):  # sm_90: one launch,
        res = mod.act_codes(x, perm, r_in, bkd, qmin, qmax, cfg, pdl=pdl, early=early)  # a cluster per token tile
        if res is not None:  # None: the GPU refused the cluster launch; the other launches below
            return res
    if gluon == "wgmma":  # sm_90: rotate twice, no float32 round trip
        transpose = not is_token_minor(x)
        if transpose:  # zeroed by the transpose launch
            tokmax = torch.empty((m,), device=x.device, dtype=torch.float32)
        xt = _transposed(x, pdl, early, zero=tokmax) if transpose else x.t()
        if (checked and not transpose) or mod.usable(xt, m, r_in, smooth, qmax, bkd):
            return mod.act_codes(xt, m, perm, r_in, bkd, qmin, qmax, cfg, tokmax=tokmax, pdl=pdl)
        if transpose:  # the Triton prep reads the transpose made here (launched after it)
            x, early = xt.t(), pdl
    a = torch.empty((m, k), device=x.device, dtype=torch.float32 if dynamic else torch.bfloat16)
    part = torch.empty((m, nb), device=x.device, dtype=torch.float32) if dynamic else None
    if is_token_minor(x):  # x^T is there already: the prep reads its rows (whole runs of tokens)
        x, xload = x.t(), 2
        up = up.t() if up is not None else None
    elif xload == 1:
        x = x.index_select(1, perm)
        early = False
    elif xload == 2:
        x = _transposed(x, pdl, early)
        early = pdl
    _prep_kernel[(nb // g, triton.cdiv(m, bmp * tiles))](
        x, x.stride(0), m, k, perm if perm is not None else dummy, smooth if smooth is not None else dummy,
        r_in, act_scale if act_scale is not None else dummy, a, part if part is not None else dummy,
        NB=nb, QMIN=qmin, QMAX=qmax, MODE=mode, G=g, BMP=bmp, TILES=tiles, STAGES=cfg.get("prep_stages", 2), B=b,
        HAS_PERM=perm is not None, HAS_SMOOTH=smooth is not None, PREC=_PREC[rot_precision],
        XLOAD=xload, PDL=pdl, PDL_WAIT=early, up_ptr=up if up is not None else x,
        ACT=ACT_CODES[act] if act is not None else 0, HAS_UP=up is not None,
        num_warps=cfg.get("prep_warps_hidden", cfg["prep_warps"]) if act is not None else cfg["prep_warps"],
        **_pdl(early))
    if not dynamic:
        return a, None
    codes = torch.empty((m, k), device=x.device, dtype=torch.int8)
    tok_scale = torch.empty((m,), device=x.device, dtype=torch.float32)
    bmq, bkq = min(cfg.get("BMQ", 16), triton.next_power_of_2(m)), min(cfg.get("BKQ", 256), bkd)
    while k % bkq:
        bkq //= 2
    qch = max(1, min(cfg.get("QCH", 1), k // bkq))
    while (k // bkq) % qch:
        qch -= 1
    _quant_kernel[(triton.cdiv(m, bmq), k // (bkq * qch))](
        a, part, codes, tok_scale, m, K=k, NB=nb, NB_P2=triton.next_power_of_2(nb), QMIN=qmin, QMAX=qmax,
        BMQ=bmq, BKQ=bkq, QCH=qch, PDL=pdl, BKD=bkd, RUNS=cfg.get("QRUNS", True),
        FASTDIV=bool(cfg.get("QFASTDIV", False)), SATCVT=bool(cfg.get("SATCVT", True)), num_warps=4, **_pdl(pdl))
    return codes, tok_scale


def _prep_reads_hidden(x: torch.Tensor, up: torch.Tensor | None, xload: int, gluon: str | None) -> bool:
    """Whether `prepare_activation` can compute an MLP hidden act(x) * up in the Triton prep's loads:
    that launch reads x itself (rows through the permutation, or token-minor x as x^T), up has x's
    strides (the kernel reads it with x's; `w4_linear` checked shape and dtype), and no Gluon
    activation launch takes the hidden (`_gluon_activation`)."""
    if up is not None and up.stride() != x.stride():
        return False
    return gluon is None and (is_token_minor(x) or xload == 0)


def _gluon_activation(x: torch.Tensor, xload: int, cfg: dict, dynamic: bool, r_in: torch.Tensor,
                      smooth: torch.Tensor | None, qmax: int, bkd: int) -> tuple[str | None, object]:
    """(name, module) of the sm_90 Gluon activation launch `prepare_activation` runs for x, or for
    an MLP hidden laid out as x (`hidden.hidden_launch`): "cluster" (`w4a8_cluster`), "wgmma"
    (`w4a8_act`: token-minor x, or x^T from the transpose launch, which is checked once made); or
    (None, None): the Triton launches (not configured, not on this GPU, or the operands do not fit,
    e.g. an odd token count for the wgmma passes)."""
    act = cfg.get("ACT") if dynamic else None
    mod = _hopper_module(x.device, {"cluster": "w4a8_cluster", "wgmma": "w4a8_act"}[act]) \
        if act in ("cluster", "wgmma") else None
    if mod is None:
        return None, None
    if act == "cluster":
        fits = mod.usable(x, r_in, smooth, qmax, bkd, cfg)
    elif is_token_minor(x):
        fits = mod.usable(x.t(), x.shape[0], r_in, smooth, qmax, bkd)
    else:
        fits = xload == 2
    return (act, mod) if fits else (None, None)


def _transposed(x: torch.Tensor, pdl: bool, early: bool, zero: torch.Tensor | None = None) -> torch.Tensor:
    """x^T (K, M) contiguous of x (M, K) (rows contiguous): one launch (`_transpose_kernel`); early:
    launched with PDL, it waits for x's producer. zero: a float32 (M,) buffer it zeroes too."""
    m, k = x.shape
    xt = torch.empty((k, m), device=x.device, dtype=x.dtype)
    _transpose_kernel[(triton.cdiv(m, 64), k // 64)](x, x.stride(0), xt, m, zero if zero is not None else xt, BT=64,
                                                     PDL=pdl, PDL_WAIT=early, ZERO=zero is not None, num_warps=4,
                                                     **_pdl(early))
    return xt


_COUNTERS: dict = {}


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 split-K tile counters for `device` and its current stream (each tile's last
    program resets its own; kernels of one stream run in order, so they can share the buffer,
    while GEMMs running at the same time on two streams get two buffers)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    c = _COUNTERS.get((device, stream))
    if c is None or c.numel() < tiles:
        c = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[(device, stream)] = c
    return c


def gemm_tiling(k: int, cfg: dict) -> tuple[int, int]:
    """(BK, SPLIT) the GEMM runs with for K = k: cfg's, halved until BK * SPLIT divides k. The
    activation launches store their operand in tiles of this BK (`_deint`)."""
    bk, split = cfg["BK"], cfg.get("SPLIT", 1)
    while k % (bk * split):
        if bk > 32:
            bk //= 2
        else:
            split //= 2
    return bk, split


def w4_gemm(a: torch.Tensor, tok_scale: torch.Tensor | None, *, qweight: torch.Tensor, w_scale: torch.Tensor,
            r_out: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype,
            cfg: dict, token_minor: bool = False) -> torch.Tensor:
    """The GEMM launch: out (M, N) = restore((a @ W_q^T) x scales) + bias, from `prepare_activation`'s
    operand (int8 codes with per-token scales, or bf16) and packed int4 qweight uint8 (N, K/2) with
    row scales w_scale float32 (N,). token_minor: out is the transpose of a contiguous (N, s)
    tensor, s = `token_minor_row(M)` (strides (1, s)), which a following layer's prep reads without
    a transpose launch."""
    m, k = a.shape
    n = qweight.shape[0]
    bo = r_out.shape[-1] if r_out is not None else 16
    bn = cfg["BN"]
    bk, split = gemm_tiling(k, cfg)
    if bn % bo or n % bn:
        raise ValueError(f"GEMM config {cfg} does not fit N={n}, output block {bo}")
    out = (torch.empty((n, token_minor_row(m)), device=a.device, dtype=out_dtype).t()[:m] if token_minor
           else torch.empty((m, n), device=a.device, dtype=out_dtype))
    rs = _rs_module(a.device) if cfg.get("GEMM") == "rs" and tok_scale is not None and rs_k_fits(k, bk, split) \
        else None
    if rs is not None and not cfg.get("RS_RESTORE"):  # the register-operand Gluon GEMM, then the restore launch
        yt = rs.rs_gemm(a, tok_scale, qweight, w_scale, {**cfg, "BK": bk, "SPLIT": split})
        return restore(yt, r_out, bias, out, pdl=True)  # sm_90 (`_rs_module`): PDL is there
    rs_pdl = _use_pdl(cfg, a.device, key="RS_PDL")
    launches = row_launches(m, cfg, split)
    # the tail launch may overlap the first only if that one lets it start after its codes wait (not RS_TRIGGER)
    overlap = rs_pdl and len(launches) == 2 and bool(cfg.get("RS_TAIL_OVERLAP")) and not cfg.get("RS_TRIGGER")
    for i, (rows, c) in enumerate(launches):
        store_m = _store_tokens(out, rows.start, rows.stop)
        if rs is not None:  # the register-operand Gluon GEMM, its restore in the epilogue
            rs.rs_gemm(a[rows], tok_scale[rows], qweight, w_scale, {**c, "BK": bk, "SPLIT": split}, r_out=r_out,
                       bias=bias, out=out[rows], pdl=rs_pdl, release=overlap and i == 0, overlap=overlap and i == 1,
                       store_m=store_m)
        else:
            _gemm_launch(a[rows], tok_scale[rows] if tok_scale is not None else None, qweight, w_scale, r_out, bias,
                         out[rows], bk, split, c, store_m)
    return out


def _padded16(m: int) -> int:
    return -(-m // 16) * 16


PAD_TOKEN_MINOR_ABOVE = 256


def token_minor_row(m: int) -> int:
    """Row length (token stride) of `w4_gemm`'s token-minor output for M = m tokens: m, padded to a
    multiple of 16 above PAD_TOKEN_MINOR_ABOVE tokens, so that the GEMM's stores along the tokens are
    whole vectors (`_store_tokens`). Measured (H200, msweep_gpu.py / mlp_gpu.py): language model
    gate_proj at M = 700 / 760 63.9 / 64.5 us padded vs 90.0 / 91.9 (bf16 66.5 / 71.7), its MLP
    block at 700 225.3 vs 258.7 us; not below: the action expert's MLP block at M = 50 was slower
    padded (fused 23.8 vs 23.2 us; torch's hidden on the padded layout 27.5 vs 25.0)."""
    return _padded16(m) if m > PAD_TOKEN_MINOR_ABOVE else m


def _store_tokens(out: torch.Tensor, start: int, stop: int) -> int:
    """Tokens a GEMM launch for rows start..stop-1 of `w4_gemm`'s out stores: stop - start, or for a
    token-minor out whose rows are padded (strides (1, s), s > M), that rounded up to a multiple of 16
    where the padding holds it (the extra tokens' values land in the padding): the store bound is then
    divisible by 16, which lets the compiler use vector stores along the tokens (`token_minor_row`)."""
    n_tok = stop - start
    if out.stride(0) != 1 or out.shape[0] <= 1 or start % 16:
        return n_tok
    return min(_padded16(n_tok), out.stride(1) - start)


def rs_k_fits(k: int, bk: int, split: int) -> bool:
    """Whether the register-operand GEMM (`w4a8_rs`) can run K = k in bk-wide steps split `split`
    ways: each program's K chunk holds an even number of K steps (two per loop iteration)."""
    return k % (2 * bk * split) == 0


def rs_tiles_fit(cfg: dict) -> bool:
    """Whether the register-operand GEMM (`w4a8_rs`) compiles for cfg's tiles: weight rows BN a
    multiple of 64 (wgmma's M per warpgroup) and at least 32 tokens per tile, TAIL_BMT included
    (Triton 3.6, offline sm_90 compile, benchmarks/compile_w4a8.py `rs_report`: BMT 16 fails in
    ConvertTritonGPUToLLVM, BMT 8 and BN 32 in wgmma's shape checks; BMT 32-256, BN 64-256 compile)."""
    tokens = [cfg["BMT"]] + ([cfg["TAIL_BMT"]] if cfg.get("TAIL_BMT") else [])
    return cfg["BN"] % 64 == 0 and min(tokens) >= 32


def row_launches(m: int, cfg: dict, split: int = 1) -> list[tuple[slice, dict]]:
    """The GEMM's launches over M tokens: (token rows, configuration) pairs, one for all rows, or
    two when the last `tail_tokens` go to a launch of cfg["TAIL_BMT"]-token tiles."""
    tail = tail_tokens(m, cfg, split)
    if not tail:
        return [(slice(0, m), cfg)]
    return [(slice(0, m - tail), cfg), (slice(m - tail, m), {**cfg, "BMT": cfg["TAIL_BMT"]})]


def tail_tokens(m: int, cfg: dict, split: int = 1) -> int:
    """Tokens past the last whole BMT-token tile that `w4_gemm` leaves to a second launch with
    cfg["TAIL_BMT"]-token tiles (0: none; never with split-K, whose launches would share the tile
    counters and workspace, `_counters`). At M = 800 with 128-token tiles: 32 tokens, which would
    otherwise take a whole row of 128-token tiles. Measured on the linked gate/up GEMM alone
    (H200, benchmarks/probe_tail.py): 115.5 us at M = 768, 135.8 at M = 800, 132.7-133.4 with the
    tail launch; a 32-token tile costs nearly as much as a 128-token one, each program's time
    being mostly its weight tile's."""
    bmt, tb = cfg["BMT"], cfg.get("TAIL_BMT", 0)
    rem = m % bmt
    return rem if tb and split == 1 and m > bmt and 0 < rem <= tb else 0


def _gemm_launch(a, tok_scale, qweight, w_scale, r_out, bias, out, bk: int, split: int, cfg: dict,
                 store_m: int | None = None) -> None:
    """One `_gemm_kernel` launch for a's M rows into out (M, N), any strides (see `w4_gemm`); store_m:
    the tokens its store covers (`_store_tokens`; default M)."""
    m, k = a.shape
    n = qweight.shape[0]
    bo = r_out.shape[-1] if r_out is not None else 16
    bn, bmt = cfg["BN"], cfg["BMT"]
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bmt)
    ws = torch.empty((split, m, n), device=a.device, dtype=torch.float32) if split > 1 else w_scale
    cnt = _counters(a.device, tiles) if split > 1 else w_scale
    pdl = _use_pdl(cfg, a.device)
    pf_n = max(1, k // split // 256)  # 128-byte lines of packed weights per row and program
    _gemm_kernel[(tiles, split)](
        a, tok_scale if tok_scale is not None else w_scale, qweight, w_scale,
        r_out if r_out is not None else w_scale, bias if bias is not None else w_scale, out, m, n, K=k,
        stride_om=out.stride(0), stride_on=out.stride(1), M_OUT=store_m if store_m is not None else m, ws_ptr=ws, cnt_ptr=cnt, INT8=tok_scale is not None, BN=bn, BMT=bmt, BK=bk, GROUP=cfg["GROUP"], SWAP=cfg["SWAP"], SPLIT=split, BO=bo,
        HAS_ROUT=r_out is not None, HAS_BIAS=bias is not None, F32_DOT=_INTERPRET, PDL=pdl, PF_N=pf_n,
        PF=triton.next_power_of_2(pf_n), RESTORE=cfg.get("RESTORE", 0) if split == 1 or cfg.get("PART_RESTORE") else 0,
        PART_RESTORE=bool(cfg.get("PART_RESTORE", False)), EPI_EARLY=bool(cfg.get("EPI_EARLY", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_pdl(pdl))


def _hopper_module(device: torch.device, name: str):
    """The Gluon kernel module `name` ("w4a8_rs": the register-operand GEMM, "w4a8_act": the
    activation codes in two passes, "w4a8_cluster": in one cluster launch) where it runs: an sm_90 GPU (wgmma), not interpreted, a Triton with Gluon's
    Hopper API; else None (the Triton kernels run)."""
    if _INTERPRET or device.type != "cuda":
        return None
    from . import device_capability
    if tuple(device_capability(device)) != (9, 0):
        return None
    return _import_hopper(name)


def _rs_module(device: torch.device):
    """`w4a8_rs` where it runs (`_hopper_module`), else None."""
    return _hopper_module(device, "w4a8_rs")


@functools.lru_cache(maxsize=None)
def _import_hopper(name: str):
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except Exception:  # ImportError / AttributeError: a Triton without this Gluon API
        return None


def restore(yt: torch.Tensor, r_out: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor,
            pdl: bool = False) -> torch.Tensor:
    """out (M, N) (any strides) = y' BD(R_out)^T + bias from y'^T (N, M) bfloat16 contiguous;
    r_out (N/Bo, Bo, Bo) 16/32-bit or None, bias (N,) or None. One launch (`_restore_kernel`)."""
    n, m = yt.shape
    bo = r_out.shape[-1] if r_out is not None else 64
    if n % bo:
        raise ValueError(f"restore: N={n} is not a multiple of the output block {bo}")
    if not yt.is_contiguous() or (r_out is not None and not r_out.is_contiguous()):
        raise ValueError("restore: y'^T and r_out must be contiguous")
    bm = 128 if m > 64 else max(16, triton.next_power_of_2(m))
    _restore_kernel[(n // bo, triton.cdiv(m, bm))](
        yt, r_out if r_out is not None else yt, bias if bias is not None else yt, out, m, n, out.stride(0),
        out.stride(1), BO=bo, BM=bm, HAS_ROUT=r_out is not None, HAS_BIAS=bias is not None, F32_DOT=_INTERPRET,
        PDL=pdl, num_warps=4, **_pdl(pdl))
    return out


def resolve_config(m: int, n: int, k: int, mode: int, device: torch.device, config: dict | None = None,
                   block_out: int | None = None) -> dict:
    """The launch configuration `w4_linear` runs for (M, N, K) and R_out blocks of block_out (None:
    no R_out): `pick_config`'s; its RS_CONFIG (keys for where the register-operand GEMM runs: its BN,
    BMT, BK, num_warps, RS_STAGES, TAIL_BMT, PDL, ...) over it where that GEMM runs (GEMM "rs",
    dynamic activations, sm_90 with Gluon: `_rs_module`), elsewhere the Triton launches keep their
    own keys; then `config`'s keys over all (an RS_CONFIG there replaces the picked one). A PICK_M
    key in `config` (a token count) starts from the picks for that many tokens instead of M's (a
    tuning aid: the launches measured at one M tried at another). The picks were measured on the
    pi0.5 shapes; for other shapes the rs GEMM gives way to the Triton GEMM where its tiles do not
    fit (and the weight-row tile BN shrinks to one that divides N and is a multiple of the output
    block), or to tiles it does not compile for (`rs_tiles_fit`, e.g. a `config` of 16-token tiles)."""
    over = dict(config or {})
    check_config(over)
    pick_m = over.pop("PICK_M", m)
    cfg = dict(pick_config(pick_m, n, k, mode))
    picked = cfg.pop("RS_CONFIG", None)
    extra = over.pop("RS_CONFIG", picked)
    if extra and over.get("GEMM", cfg.get("GEMM")) == "rs" and mode == MODE_DYNAMIC and _rs_module(device) is not None:
        cfg.update(extra)
    cfg.update(over)
    bo = block_out or 16
    bk, split = gemm_tiling(k, cfg)
    if cfg.get("GEMM") == "rs" and (n % cfg["BN"] or cfg["BN"] % bo or not rs_k_fits(k, bk, split)
                                    or not rs_tiles_fit(cfg)):
        return resolve_config(m, n, k, mode, device, {**over, "PICK_M": pick_m, "GEMM": None}, block_out)
    if n % cfg["BN"] or cfg["BN"] % bo:  # supports(): N is a multiple of 64 and of the output block (<= 128)
        cfg["BN"] = 128 if bo == 128 else 64
    return cfg


def w4_linear(x: torch.Tensor, *, qweight: torch.Tensor, w_scale: torch.Tensor, r_in: torch.Tensor,
              perm: torch.Tensor | None, r_out: torch.Tensor | None, bias: torch.Tensor | None,
              smooth: torch.Tensor | None, mode: int, qmin: int = -128, qmax: int = 127,
              act_scale: torch.Tensor | None = None, config: dict | None = None,
              rot_precision: str = "tf32", token_minor_out: bool = False, up: torch.Tensor | None = None,
              act: str | None = None) -> torch.Tensor:
    """y (M, N) in x's dtype for x (M, K) bf16/fp16 (rows contiguous, or token-minor: strides (1, s)),
    y token-minor when token_minor_out (`w4_gemm`), else row-major; packed int4 qweight uint8
    (N, K/2), w_scale float32 (N,), r_in (K/B, B, B), r_out (N/Bo, Bo, Bo) or None (16/32-bit),
    perm (K,) int or None, smooth (K,) or None, bias (N,) or None; mode MODE_NONE / MODE_STATIC
    (act_scale float32 (K,)) / MODE_DYNAMIC. qmin/qmax: the activation code range.
    `config` overrides keys of `pick_config`. act (`hidden.ACT_CODES`): the layer's input is
    act(x) * up (up (M, K) like x, or None: act(x)), an MLP's hidden computed by the kernels."""
    m, k = x.shape
    if act is not None and act not in ACT_CODES:
        raise ValueError(f"w4_linear: act must be one of {sorted(ACT_CODES)}, got {act!r}")
    if up is not None and (act is None or up.shape != x.shape or up.dtype != x.dtype):
        raise ValueError(f"w4_linear: up {tuple(up.shape)} {up.dtype} needs act and x's shape and dtype")
    if x.stride(1) != 1 and not is_token_minor(x):
        x = x.contiguous()
    if up is not None and up.stride() != x.stride():
        x, up = x.contiguous(), up.contiguous()
    for name, t in (("qweight", qweight), ("w_scale", w_scale), ("r_in", r_in), ("perm", perm), ("r_out", r_out),
                    ("bias", bias), ("smooth", smooth), ("act_scale", act_scale)):
        if t is not None and not t.is_contiguous():  # the kernels index row-major buffers
            raise ValueError(f"w4_linear: {name} must be contiguous (strides {t.stride()})")
    if qweight.shape[1] * 2 != k:
        raise ValueError(f"w4_linear: qweight {tuple(qweight.shape)} does not pack K={k} int4 columns")
    cfg = resolve_config(m, qweight.shape[0], k, mode, x.device, config,
                         r_out.shape[-1] if r_out is not None else None)
    a, tok_scale = prepare_activation(x, r_in=r_in, perm=perm, smooth=smooth, mode=mode, qmin=qmin, qmax=qmax,
                                      act_scale=act_scale, cfg=cfg, rot_precision=rot_precision, up=up, act=act)
    return w4_gemm(a, tok_scale, qweight=qweight, w_scale=w_scale, r_out=r_out, bias=bias, out_dtype=x.dtype,
                   cfg=cfg, token_minor=token_minor_out)
