"""Triton kernels of the fast W4 path (v2): two launches per layer, int4 weights read once.

    y = ((Q_a(x/s P BD(R_in))) Q_w(W_t)^T) BD(R_out)^T + b       (s: smoothing, optional)

1. `_prep_kernel`: the activation transform. Each program owns BMP rows and G consecutive
   rotation blocks (G = all blocks: whole rows, whose gathers then hit the L1 cache). The tile
   x[:, perm[block]] (/ smoothing) is rotated by its R_in block (a B x B tf32 dot) and written
   - static scales: as bf16 values q * s_k of the per-channel quantized activation;
   - dynamic, whole rows (`FULL`): as int8 codes, after a first pass over the row for its absmax,
     plus the per-token scale;
   - dynamic, G < all blocks: as float32 rotated values plus the per-(token, block) absmax; the
     GEMM then reduces the absmax and quantizes while it loads (small M);
   - no activation quantization: as bf16 rotated values.
2. `_gemm_kernel`: out^T tile (BN rows of W, BMT tokens) = W_q (int4 unpacked in registers to
   int8 / bf16) @ A^T, so the unpacked weight is the dot's register operand and the activation
   streams through shared memory (`SWAP`; the unswapped order is kept for tuning). int8 x int8
   -> int32 dots (exact) for dynamic activations, bf16 dots with float32 sums otherwise. Epilogue:
   x token scale x row scale, the output restore as one tf32 dot with the tile's block-diagonal
   slice of R_out, the bias, the cast, the store. No split-K: no atomics, no zero-fill, no cast.

Rounding: torch.round's half-to-even (rint) and correctly rounded divisions (div_rn), as the
reference path. Differences to the float32 reference: x P BD(R_in) in tf32, rotations stored in
16 bits, static activations q*s rounded to bf16, R_out restore in tf32, output in x's dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MODE_NONE, MODE_STATIC, MODE_DYNAMIC = 0, 1, 2
A_BF16, A_INT8, A_F32_QUANTIZE = 0, 1, 2  # what the GEMM reads as its activation operand
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's CPU interpreter (tests)


@triton.jit
def _rint(v):
    """Round half to even (torch.round) of float32 v."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _rotated_block(x_ptr, stride_xm, M, perm_ptr, smooth_ptr, r_ptr, offs_m, kb,
                   B: tl.constexpr, HAS_PERM: tl.constexpr, HAS_SMOOTH: tl.constexpr, PREC: tl.constexpr):
    """float32 (BMP, B): rows offs_m of (x / smooth)[:, perm] @ r_in[kb] (block kb)."""
    offs_c = kb * B + tl.arange(0, B)
    if HAS_PERM:
        src = tl.load(perm_ptr + offs_c)
    else:
        src = offs_c
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :], mask=offs_m[:, None] < M,
                other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + src).to(tl.float32)[None, :])
    rb = tl.arange(0, B)
    r = tl.load(r_ptr + kb * B * B + rb[:, None] * B + rb[None, :]).to(tl.float32)
    return tl.dot(x, r, input_precision=PREC)


@triton.jit
def _prep_kernel(x_ptr, stride_xm, M, K, perm_ptr, smooth_ptr, r_ptr, act_scale_ptr, out_ptr,
                 tok_scale_ptr, part_ptr, NB: tl.constexpr,
                 QMIN: tl.constexpr, QMAX: tl.constexpr, MODE: tl.constexpr, FULL: tl.constexpr,
                 G: tl.constexpr, BMP: tl.constexpr, B: tl.constexpr, HAS_PERM: tl.constexpr,
                 HAS_SMOOTH: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BMP + tl.arange(0, BMP)
    row_ok = offs_m < M
    cb = tl.arange(0, B)
    if MODE == 2 and FULL:  # dynamic, whole rows: absmax pass, then quantize to int8 codes
        amax = tl.zeros((BMP,), dtype=tl.float32)
        for kb in range(0, NB):
            xt = _rotated_block(x_ptr, stride_xm, M, perm_ptr, smooth_ptr, r_ptr, offs_m, kb,
                                B, HAS_PERM, HAS_SMOOTH, PREC)
            amax = tl.maximum(amax, tl.max(tl.abs(xt), axis=1))
        s = tl.math.div_rn(amax, tl.full((BMP,), QMAX, tl.float32))
        s = tl.where(s > 0, s, 1.0)
        tl.store(tok_scale_ptr + offs_m, s, mask=row_ok)
        for kb in range(0, NB):
            xt = _rotated_block(x_ptr, stride_xm, M, perm_ptr, smooth_ptr, r_ptr, offs_m, kb,
                                B, HAS_PERM, HAS_SMOOTH, PREC)
            q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(xt, s[:, None])), QMIN), QMAX)
            tl.store(out_ptr + offs_m[:, None] * K + (kb * B + cb)[None, :], q.to(tl.int8), mask=row_ok[:, None])
    else:
        for g in range(0, G):
            kb = pid_g * G + g
            if kb < NB:
                xt = _rotated_block(x_ptr, stride_xm, M, perm_ptr, smooth_ptr, r_ptr, offs_m, kb,
                                    B, HAS_PERM, HAS_SMOOTH, PREC)
                offs_c = kb * B + cb
                dst = out_ptr + offs_m[:, None] * K + offs_c[None, :]
                if MODE == 2:  # rotated values and the block's absmax; the GEMM quantizes
                    tl.store(dst, xt, mask=row_ok[:, None])
                    tl.store(part_ptr + offs_m * NB + kb, tl.max(tl.abs(xt), axis=1), mask=row_ok)
                elif MODE == 1:  # static per channel (of the rotated basis)
                    sk = tl.load(act_scale_ptr + offs_c)
                    q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(xt, sk[None, :])), QMIN), QMAX)
                    tl.store(dst, (q * sk[None, :]).to(tl.bfloat16), mask=row_ok[:, None])
                else:
                    tl.store(dst, xt.to(tl.bfloat16), mask=row_ok[:, None])


@triton.jit
def _gemm_kernel(a_ptr, tok_scale_ptr, part_ptr, NB, w_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr,
                 M, N, K: tl.constexpr, stride_om,
                 QMIN: tl.constexpr, QMAX: tl.constexpr, A_KIND: tl.constexpr, NB_P2: tl.constexpr,
                 BN: tl.constexpr, BMT: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                 SWAP: tl.constexpr, BO: tl.constexpr, HAS_ROUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 F32_DOT: tl.constexpr):
    pid = tl.program_id(0)
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
    INT8: tl.constexpr = A_KIND != 0
    if A_KIND == 2:  # per-token scale from the per-block absmax the prep pass wrote
        nbs = tl.arange(0, NB_P2)
        p = tl.load(part_ptr + rows_m[:, None] * NB + nbs[None, :], mask=nbs[None, :] < NB, other=0.0)
        s_tok = tl.math.div_rn(tl.max(p, axis=1), tl.full((BMT,), QMAX, tl.float32))
        s_tok = tl.where(s_tok > 0, s_tok, 1.0)
    kh = tl.arange(0, BK // 2)
    kf = tl.arange(0, BK)
    w_ptrs = w_ptr + rows_n[:, None] * (K // 2) + kh[None, :]
    a_ptrs = a_ptr + rows_m[:, None] * K + kf[None, :]
    if SWAP:
        acc = tl.zeros((BN, BMT), dtype=tl.int32 if INT8 else tl.float32)
    else:
        acc = tl.zeros((BMT, BN), dtype=tl.int32 if INT8 else tl.float32)
    for kk in range(0, K, BK):
        wb = tl.load(w_ptrs + kk // 2).to(tl.int8, bitcast=True)
        w = tl.join((wb << 4) >> 4, wb >> 4).reshape(BN, BK)  # column 2j: low nibble, 2j+1: high
        a = tl.load(a_ptrs + kk)
        if A_KIND == 2:
            a = tl.minimum(tl.maximum(_rint(tl.math.div_rn(a, s_tok[:, None])), QMIN), QMAX).to(tl.int8)
        if INT8:
            if SWAP:
                acc = tl.dot(w, tl.trans(a), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        elif F32_DOT:  # Triton's CPU interpreter multiplies bf16 bit patterns; tests only
            if SWAP:
                acc = tl.dot(w.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            if SWAP:
                acc = tl.dot(w.to(tl.bfloat16), tl.trans(a), acc)
            else:
                acc = tl.dot(a, tl.trans(w.to(tl.bfloat16)), acc)
    y = acc.to(tl.float32)
    if not SWAP:
        y = tl.trans(y)  # (BN, BMT)
    if A_KIND == 1:
        y = y * tl.load(tok_scale_ptr + rows_m)[None, :]
    elif A_KIND == 2:
        y = y * s_tok[None, :]
    y = y * tl.load(w_scale_ptr + rows_n)[:, None]
    if HAS_ROUT:  # BD(R_out) restore on out^T: T[i, i'] = r_out[block][i % BO, i' % BO] in one block
        i = tl.arange(0, BN)
        gi = pid_n * BN + i
        same = (i[:, None] // BO) == (i[None, :] // BO)
        t = tl.load(rout_ptr + (gi[:, None] // BO) * (BO * BO) + (i[:, None] % BO) * BO + (i[None, :] % BO),
                    mask=same & (gi[:, None] < N), other=0.0).to(tl.float32)
        y = tl.dot(t, y, input_precision="tf32")
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rows_n).to(tl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], y.to(out_ptr.dtype.element_ty), mask=mask)


def supports(in_features: int, out_features: int, block_in: int, block_out: int | None) -> str | None:
    """None when the kernels handle this layer geometry, else the reason they do not."""
    if in_features % 128:
        return f"in_features {in_features} is not a multiple of 128"
    if block_in not in (16, 32, 64, 128) or in_features % block_in:
        return f"input block {block_in} must be 16/32/64/128 and divide in_features"
    if block_out is not None and (block_out not in (16, 32, 64, 128) or out_features % block_out):
        return f"output block {block_out} must be 16/32/64/128 and divide out_features"
    if out_features % 64:
        return f"out_features {out_features} is not a multiple of 64"
    return None


def pick_config(m: int, n: int, k: int, mode: int) -> dict:
    """Launch configuration for (M tokens, N out, K in) (measured on an H100/H200:
    benchmarks/sweep_w4a8.py, docs/benchmarks.md). Keys: prep G (blocks per program, 0 = whole
    rows), BMP, prep_warps; GEMM BN, BMT, BK, GROUP, SWAP, num_warps, num_stages."""
    int8 = mode == MODE_DYNAMIC
    if m <= 16:
        cfg = dict(BN=64, BMT=16, BK=256, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BN=64, BMT=64, BK=256 if int8 else 128, num_warps=4, num_stages=3)
    else:
        cfg = dict(BN=128, BMT=128, BK=128 if int8 else 64, num_warps=8, num_stages=4)
    cfg.update(GROUP=8, SWAP=True)
    nb64 = k // 64
    if m <= 64:  # K-parallel prep: enough programs to spread the R_in reads
        cfg.update(G=max(1, nb64 // 64), BMP=16 if m <= 16 else 64, prep_warps=4)
    else:  # whole rows per program: the permutation's gathers hit L1
        cfg.update(G=0, BMP=16, prep_warps=4)
    return cfg


_PREC = {"tf32": "tf32", "tf32x3": "tf32x3", "ieee": "ieee"}


def w4_linear(x: torch.Tensor, *, qweight: torch.Tensor, w_scale: torch.Tensor, r_in: torch.Tensor,
              perm: torch.Tensor | None, r_out: torch.Tensor | None, bias: torch.Tensor | None,
              smooth: torch.Tensor | None, mode: int, qmin: int = -128, qmax: int = 127,
              act_scale: torch.Tensor | None = None, config: dict | None = None,
              rot_precision: str = "tf32") -> torch.Tensor:
    """y (M, N) in x's dtype for x (M, K) bf16/fp16 (rows contiguous), packed int4 qweight uint8
    (N, K/2), w_scale float32 (N,), r_in (K/B, B, B), r_out (N/Bo, Bo, Bo) or None (16/32-bit),
    perm (K,) int or None, smooth (K,) or None, bias (N,) or None; mode MODE_NONE / MODE_STATIC
    (act_scale float32 (K,)) / MODE_DYNAMIC. qmin/qmax: the activation code range."""
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    b = r_in.shape[-1]
    nb = k // b
    cfg = dict(pick_config(m, n, k, mode))
    if config:
        cfg.update(config)
    dummy = w_scale  # placeholder pointer for absent optional tensors (never read)
    g = max(1, cfg["G"] * 64 // b) if cfg["G"] else 0  # G counts 64-wide blocks; 0: whole rows
    full = g == 0 or g >= nb
    g = nb if full else g
    dynamic = mode == MODE_DYNAMIC
    if dynamic and full:
        a = torch.empty((m, k), device=x.device, dtype=torch.int8)
        a_kind = A_INT8
    elif dynamic:
        a = torch.empty((m, k), device=x.device, dtype=torch.float32)
        a_kind = A_F32_QUANTIZE
    else:
        a = torch.empty((m, k), device=x.device, dtype=torch.bfloat16)
        a_kind = A_BF16
    tok_scale = torch.empty((m,), device=x.device, dtype=torch.float32) if a_kind == A_INT8 else dummy
    part = torch.empty((m, nb), device=x.device, dtype=torch.float32) if a_kind == A_F32_QUANTIZE else dummy
    bmp = cfg["BMP"]
    _prep_kernel[(triton.cdiv(m, bmp), triton.cdiv(nb, g))](
        x, x.stride(0), m, k, perm if perm is not None else dummy, smooth if smooth is not None else dummy,
        r_in, act_scale if act_scale is not None else dummy, a, tok_scale, part,
        NB=nb, QMIN=qmin, QMAX=qmax, MODE=mode, FULL=full and dynamic, G=g, BMP=bmp, B=b,
        HAS_PERM=perm is not None, HAS_SMOOTH=smooth is not None, PREC=_PREC[rot_precision],
        num_warps=cfg["prep_warps"])
    bo = r_out.shape[-1] if r_out is not None else 16
    bn, bmt, bk = cfg["BN"], cfg["BMT"], cfg["BK"]
    while k % bk:
        bk //= 2
    if bn % bo or n % bn:
        raise ValueError(f"GEMM config {cfg} does not fit N={n}, output block {bo}")
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, bn) * triton.cdiv(m, bmt),)
    _gemm_kernel[grid](a, tok_scale, part, nb, qweight, w_scale, r_out if r_out is not None else dummy,
                       bias if bias is not None else dummy, out, m, n, K=k, stride_om=out.stride(0),
                       QMIN=qmin, QMAX=qmax, A_KIND=a_kind, NB_P2=triton.next_power_of_2(nb),
                       BN=bn, BMT=bmt, BK=bk, GROUP=cfg["GROUP"], SWAP=cfg["SWAP"], BO=bo,
                       HAS_ROUT=r_out is not None, HAS_BIAS=bias is not None, F32_DOT=_INTERPRET,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
