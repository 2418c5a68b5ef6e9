"""Triton kernels of the fast W4 path: int4 weights read once, transforms fused.

    y = ((Q_a(x/s P BD(R_in))) Q_w(W_t)^T) BD(R_out)^T + b       (s: smoothing, optional)

Two or three launches per layer:

1. `_absmax_kernel` (dynamic mode only), grid (M tiles, K blocks): x tile gathered through the
   permutation (and divided by the smoothing), rotated by its R_in block (a B x B tf32 dot), and
   the per-(token, block) absmax written to a (M, n_blocks) float32 buffer.
2. `_quantize_kernel`, same grid: the same rotated tile, quantized with the activation scale
   (dynamic: absmax over the row's blocks / qmax, per token; static: the calibrated per-channel
   scale), written as int8 codes (dynamic) or bf16 values q*s (static; abits 0: bf16 x_t).
   Columns are written "pair-split": in each group of 64 columns the even ones first, then the
   odd ones, so that the GEMM multiplies the low and high nibbles of the packed int4 weight bytes
   (columns 2j, 2j+1: quant.pack_int4) with two contiguous 32-column halves.
3. `_gemm_kernel`: A (M, K) x int4 W (N, K/2 bytes) unpacked in registers.
   Dynamic: int8 x int8 -> int32 dots (exact), epilogue y = acc * s_token * s_row.
   Static / no activation quantization: bf16 dots with float32 accumulation, epilogue * s_row.
   Then the output restore as one tf32 dot of the output tile with its block-diagonal slice of
   BD(R_out)^T (tiles are aligned to the R_out blocks), the bias, the cast. Small M uses split-K
   with float32 atomics (the epilogue is linear; the bias is added by split 0).

Rounding: torch.round's half-to-even (rint) and correctly rounded divisions (div_rn), as the
reference path. Differences to the float32 reference: x P BD(R_in) in tf32, rotations stored in
16 bits, static activations q*s rounded to bf16, R_out restore in tf32, output in x's dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

PAIR_GROUP = 64  # columns per pair-split group (32 bytes of packed int4 per row)
MODE_NONE, MODE_STATIC, MODE_DYNAMIC = 0, 1, 2
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's CPU interpreter (tests)


@triton.jit
def _rint(v):
    """Round half to even (torch.round) of float32 v."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _rotated_tile(x_ptr, stride_xm, M, perm_ptr, smooth_ptr, r_ptr, pid_m, kb,
                  BMP: tl.constexpr, B: tl.constexpr, HAS_PERM: tl.constexpr,
                  HAS_SMOOTH: tl.constexpr, PREC: tl.constexpr):
    """float32 (BMP, B): rows pid_m*BMP.. of (x / smooth)[:, perm] @ r_in[kb]."""
    offs_m = pid_m * BMP + tl.arange(0, BMP)
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
def _absmax_kernel(x_ptr, stride_xm, M, perm_ptr, smooth_ptr, r_ptr, part_ptr, NB,
                   BMP: tl.constexpr, B: tl.constexpr, HAS_PERM: tl.constexpr,
                   HAS_SMOOTH: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    xt = _rotated_tile(x_ptr, stride_xm, M, perm_ptr, smooth_ptr, r_ptr, pid_m, kb, BMP, B,
                       HAS_PERM, HAS_SMOOTH, PREC)
    offs_m = pid_m * BMP + tl.arange(0, BMP)
    tl.store(part_ptr + offs_m * NB + kb, tl.max(tl.abs(xt), axis=1), mask=offs_m < M)


@triton.jit
def _quantize_kernel(x_ptr, stride_xm, M, K, perm_ptr, smooth_ptr, r_ptr, part_ptr, NB,
                     act_scale_ptr, out_ptr, tok_scale_ptr,
                     QMIN: tl.constexpr, QMAX: tl.constexpr, MODE: tl.constexpr, NB_P2: tl.constexpr,
                     BMP: tl.constexpr, B: tl.constexpr, HAS_PERM: tl.constexpr,
                     HAS_SMOOTH: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    xt = _rotated_tile(x_ptr, stride_xm, M, perm_ptr, smooth_ptr, r_ptr, pid_m, kb, BMP, B,
                       HAS_PERM, HAS_SMOOTH, PREC)
    offs_m = pid_m * BMP + tl.arange(0, BMP)
    offs_c = kb * B + tl.arange(0, B)
    row_ok = offs_m < M
    if MODE == 2:  # dynamic per token: s = max_j |x_t[m, j]| / qmax over all blocks
        nbs = tl.arange(0, NB_P2)
        p = tl.load(part_ptr + offs_m[:, None] * NB + nbs[None, :],
                    mask=row_ok[:, None] & (nbs[None, :] < NB), other=0.0)
        s = tl.math.div_rn(tl.max(p, axis=1), tl.full((BMP,), QMAX, tl.float32))
        s = tl.where(s > 0, s, 1.0)
        q = _rint(tl.math.div_rn(xt, s[:, None]))
        val = tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.int8)
        tl.store(tok_scale_ptr + offs_m, s, mask=row_ok & (kb == 0))
    elif MODE == 1:  # static per channel (of the rotated basis)
        sk = tl.load(act_scale_ptr + offs_c)
        q = _rint(tl.math.div_rn(xt, sk[None, :]))
        val = (tl.minimum(tl.maximum(q, QMIN), QMAX) * sk[None, :]).to(tl.bfloat16)
    else:
        val = xt.to(tl.bfloat16)
    cc = offs_c % 64
    dst = (offs_c - cc) + (cc % 2) * 32 + cc // 2  # pair-split position
    tl.store(out_ptr + offs_m[:, None] * K + dst[None, :], val, mask=row_ok[:, None])


@triton.jit
def _gemm_kernel(a_ptr, tok_scale_ptr, w_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr,
                 M, N, K, stride_om, K_SPLIT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                 GROUP_M: tl.constexpr, INT8: tl.constexpr, BO: tl.constexpr, HAS_ROUT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, F32_DOT: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % group_rows)
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = offs_m % M  # rows past M re-read valid ones; their results are masked at the store
    cols = offs_n % N
    j = tl.arange(0, BK // 2)
    col_lo = (j // 32) * 64 + (j % 32)
    a_rows = a_ptr + rows[:, None] * K + col_lo[None, :]
    w_cols = w_ptr + cols[None, :] * (K // 2) + j[:, None]
    a_rows += pid_k * K_SPLIT
    w_cols += pid_k * (K_SPLIT // 2)
    if INT8:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, K_SPLIT, BK):
        a_lo = tl.load(a_rows + kk)
        a_hi = tl.load(a_rows + (kk + 32))
        wb = tl.load(w_cols + kk // 2).to(tl.int8, bitcast=True)
        w_lo = (wb << 4) >> 4
        w_hi = wb >> 4
        if INT8:
            acc = tl.dot(a_lo, w_lo, acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, w_hi, acc, out_dtype=tl.int32)
        else:
            if F32_DOT:  # Triton's CPU interpreter multiplies bf16 bit patterns; tests only
                acc = tl.dot(a_lo.to(tl.float32), w_lo.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(a_hi.to(tl.float32), w_hi.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a_lo, w_lo.to(tl.bfloat16), acc)
                acc = tl.dot(a_hi, w_hi.to(tl.bfloat16), acc)
    y = acc.to(tl.float32)
    if INT8:
        y = y * tl.load(tok_scale_ptr + rows)[:, None]
    y = y * tl.load(w_scale_ptr + cols)[None, :]
    if HAS_ROUT:  # y @ (block-diagonal slice of BD(R_out)^T): T[i, j] = r_out[b, j % BO, i % BO]
        i = tl.arange(0, BN)
        gi = pid_n * BN + i
        same = (i[:, None] // BO) == (i[None, :] // BO)
        t = tl.load(rout_ptr + (gi[:, None] // BO) * (BO * BO) + (i[None, :] % BO) * BO + (i[:, None] % BO),
                    mask=same & (gi[:, None] < N), other=0.0).to(tl.float32)
        y = tl.dot(y, t, input_precision="tf32")
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols).to(tl.float32)
        y = y + b[None, :] * (pid_k == 0).to(tl.float32)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, y, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def supports(in_features: int, out_features: int, block_in: int, block_out: int | None) -> str | None:
    """None when the kernels handle this layer geometry, else the reason they do not."""
    if in_features % 128:
        return f"in_features {in_features} is not a multiple of 128"
    if block_in not in (16, 32, 64, 128) or in_features % block_in:
        return f"input block {block_in} must be 16/32/64/128 and divide in_features"
    if block_out is not None and (block_out not in (16, 32, 64, 128) or out_features % block_out):
        return f"output block {block_out} must be 16/32/64/128 and divide out_features"
    if out_features % 16:
        return f"out_features {out_features} is not a multiple of 16"
    return None


def pick_config(m: int, n: int, k: int, block_out: int | None, int8: bool) -> dict:
    """GEMM tile configuration for (M, N, K) (a heuristic; see benchmarks/notes_runtime_gpu.md)."""
    bo = block_out or 16
    if m > 128:
        cfg = dict(BM=128, BN=128, BK=128, SPLIT_K=1, num_warps=8, num_stages=3 if int8 else 3)
    elif m > 16:
        cfg = dict(BM=64, BN=64, BK=256, SPLIT_K=1, num_warps=4, num_stages=3)
    else:
        cfg = dict(BM=16, BN=64, BK=256, SPLIT_K=1, num_warps=4, num_stages=4)
    cfg["BN"] = max(cfg["BN"], bo)
    while n % cfg["BN"] and cfg["BN"] > bo:
        cfg["BN"] //= 2
    while k % cfg["BK"]:
        cfg["BK"] //= 2
    if m <= 128:  # memory bound: enough programs to keep every SM streaming weights
        tiles = -(-m // cfg["BM"]) * -(-n // cfg["BN"])
        split = 1
        while tiles * split < 264 and k % (cfg["BK"] * split * 2) == 0 and k // (split * 2) >= 512:
            split *= 2
        cfg["SPLIT_K"] = split
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
    bmp = 16 if m <= 16 else (32 if m <= 64 else 64)
    grid_pre = (triton.cdiv(m, bmp), k // b)
    nb = k // b
    prec = _PREC[rot_precision]
    common = dict(BMP=bmp, B=b, HAS_PERM=perm is not None, HAS_SMOOTH=smooth is not None, PREC=prec)
    dummy = w_scale  # placeholder pointer for absent optional tensors (never read)
    int8 = mode == MODE_DYNAMIC
    a = torch.empty((m, k), device=x.device, dtype=torch.int8 if int8 else torch.bfloat16)
    tok_scale = torch.empty((m,), device=x.device, dtype=torch.float32) if int8 else dummy
    part = torch.empty((m, nb), device=x.device, dtype=torch.float32) if int8 else dummy
    perm_t = perm if perm is not None else dummy
    smooth_t = smooth if smooth is not None else dummy
    if int8:
        _absmax_kernel[grid_pre](x, x.stride(0), m, perm_t, smooth_t, r_in, part, nb, **common, num_warps=4)
    _quantize_kernel[grid_pre](x, x.stride(0), m, k, perm_t, smooth_t, r_in, part, nb,
                               act_scale if act_scale is not None else dummy, a, tok_scale,
                               QMIN=qmin, QMAX=qmax, MODE=mode, NB_P2=triton.next_power_of_2(nb),
                               **common, num_warps=4)
    bo = r_out.shape[-1] if r_out is not None else 16
    cfg = dict(config) if config else pick_config(m, n, k, bo if r_out is not None else None, int8)
    split = cfg.pop("SPLIT_K")
    if k % (cfg["BK"] * split) or cfg["BK"] % 64 or cfg["BN"] % bo:
        raise ValueError(f"GEMM config {cfg} (split {split}) does not fit K={k}, output block {bo}")
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    group_m = cfg.pop("GROUP_M", 8)
    atomic = split > 1
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32) if atomic else \
        torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), split)
    _gemm_kernel[grid](a, tok_scale, qweight, w_scale, r_out if r_out is not None else dummy,
                       bias if bias is not None else dummy, out, m, n, k, out.stride(0), K_SPLIT=k // split,
                       BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], SPLIT_K=split, GROUP_M=group_m,
                       INT8=int8, BO=bo, HAS_ROUT=r_out is not None, HAS_BIAS=bias is not None,
                       ATOMIC=atomic, F32_DOT=_INTERPRET, num_warps=warps, num_stages=stages)
    return out.to(x.dtype) if atomic else out
