"""The whole dynamic W4A8 layer in one launch for 17..64 tokens (Hopper thread-block clusters).

At M = 50 (the action expert's flow-matching step) the Triton path is three dependent launches
(prep, quantize, GEMM) of 2-6 us each, where bf16 `nn.Linear` is one launch of 7-8 us. Here
one cluster launch does all of it. Cluster c owns weight rows c*BN .. c*BN + BN - 1; its CL
programs split K into ranges of KR = K / CL channels (rank r: channels r*KR ..):

    phase 1: x[:, perm] of its range (BMT tokens) rotated by its R_in blocks (tf32 dots),
             per-token absmax of the range                       -> part   | cluster barrier
    phase 2: per-token scales from the cluster's CL maxima, int8 codes of its values (still in
             registers), int32 dot with its weight slice (BN, KR), scaled, restored by BD(R_out)
             (linear, so each partial is restored on its own)    -> ws     | cluster barrier
    phase 3: tokens r*TS .. r*TS + TS - 1: the CL partials summed in rank order (deterministic),
             bias, cast, store.

Every cluster computes the same codes (the activation is tiny at M <= 64; the redundancy costs
L2 reads of x, not HBM bytes), so no cluster waits for another. The weights, R_in blocks and
permutation are loaded before the launch waits for x's producer (programmatic dependent launch).
The barriers are the hardware's (barrier.cluster, release / acquire); partial results go
through L2 (global scratch, read with .cg).

Numerics are those of the Triton launches with split-K and PART_RESTORE: tf32 rotation (exact
products of bf16 x and float16 R_in), the per-token scale max/QMAX and clamp(rint(v/s)) with
correctly rounded divisions, int32 sums of 16*q x codes, each partial restored (RESTORE 1: bf16
operands, float32 sums), partials added in a fixed order.

The CPU interpreter (tests) runs the same kernel as three launches, one per phase (PHASE 1, 2,
3; phase 2 then recomputes the rotation), since interpreted programs run one after another and
cannot meet at a barrier. On the GPU PHASE 0 runs the phases in one cluster launch. Used by
`w4a8.w4_linear` where `pick_config` asks for it (FUSED) on sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4a8 import _INTERPRET, _codes, _restore, _scale_of_max, _unpack, gdc_launch_dependents, gdc_wait


@triton.jit
def _cluster_sync(t):
    """barrier.cluster arrive (release) + wait (acquire) by every thread; returns t (0), which
    later addresses add so that their loads stay after the barrier."""
    return tl.inline_asm_elementwise(
        "barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned; mov.b32 $0, $1;",
        "=r,r", [t], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _rotated(x_ptr, sxm, sxk, toks, row_ok, src, r3, BMT: tl.constexpr, G: tl.constexpr, B: tl.constexpr,
             PREC: tl.constexpr):
    """float32 (BMT, G*B): x[toks, src] (source channels src (G*B,), zero past M) times the G
    R_in blocks r3 (G, B, B) float32, block by block."""
    x = tl.load(x_ptr + toks[:, None] * sxm + src[None, :] * sxk, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if G == 1:
        return tl.dot(x, tl.reshape(r3, (B, B)), input_precision=PREC)
    x3 = tl.permute(tl.reshape(x, (BMT, G, B)), (1, 0, 2))
    return tl.reshape(tl.permute(tl.dot(x3, r3, input_precision=PREC), (1, 0, 2)), (BMT, G * B))


@triton.jit
def _fused_kernel(x_ptr, sxm, sxk, M, perm_ptr, r_ptr, w_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr, stride_om,
                  stride_on, part_ptr, ws_ptr, N, K: tl.constexpr, CL: tl.constexpr, G: tl.constexpr, B: tl.constexpr,
                  BN: tl.constexpr, BMT: tl.constexpr, BO: tl.constexpr, HAS_PERM: tl.constexpr,
                  HAS_ROUT: tl.constexpr, HAS_BIAS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                  RESTORE: tl.constexpr, PREC: tl.constexpr, PHASE: tl.constexpr, PDL: tl.constexpr,
                  F32_DOT: tl.constexpr):
    """Program p: cluster c = p // CL (weight rows c*BN ..), rank r = p % CL (channels r*KR ..,
    KR = G*B). x (M, K) bf16 with strides (sxm, sxk); part (clusters*CL, BMT) and ws
    (clusters*CL, BN, BMT) float32 scratch; out (M, N) with strides (stride_om, stride_on).
    PHASE 0: all three phases with cluster barriers between them; 1/2/3: that phase only."""
    KR: tl.constexpr = G * B
    pid = tl.program_id(0)
    c = pid // CL
    rank = pid % CL
    toks = tl.arange(0, BMT)
    row_ok = toks < M
    rows = c * BN + tl.arange(0, BN)
    offs_c = rank * KR + tl.arange(0, KR)
    if HAS_PERM:
        src = tl.load(perm_ptr + offs_c)
    else:
        src = offs_c
    gi = tl.arange(0, G)
    bi = tl.arange(0, B)
    r3 = tl.load(r_ptr + (rank * G + gi)[:, None, None] * (B * B) + bi[None, :, None] * B + bi[None, None, :]
                 ).to(tl.float32)
    if PHASE != 1:  # this program's weight slice (BN, KR / 2 packed bytes) and row scales
        wb = tl.load(w_ptr + rows[:, None] * (K // 2) + (rank * (KR // 2) + tl.arange(0, KR // 2))[None, :])
        wsc = tl.load(w_scale_ptr + rows)
    if PDL:  # everything above is independent of x: wait for its producer only now
        gdc_wait()
        gdc_launch_dependents()
    sync = pid * 0
    if PHASE == 0 or PHASE == 1:
        xt = _rotated(x_ptr, sxm, sxk, toks, row_ok, src, r3, BMT, G, B, PREC)
        tl.store(part_ptr + pid * BMT + toks, tl.max(tl.abs(xt), axis=1))
    if PHASE == 0:
        sync = _cluster_sync(sync)
    if PHASE == 0 or PHASE == 2:
        if PHASE == 2:  # the interpreter's phase launch: rotate again
            xt = _rotated(x_ptr, sxm, sxk, toks, row_ok, src, r3, BMT, G, B, PREC)
        ci = tl.arange(0, CL)
        pm = tl.load(part_ptr + sync + (c * CL + ci)[:, None] * BMT + toks[None, :], cache_modifier=".cg")
        s = _scale_of_max(tl.max(pm, axis=0), QMAX)
        q = _codes(xt, s, QMIN, QMAX)  # (BMT, KR) int8
        even, odd = tl.split(tl.reshape(q, (BMT, KR // 2, 2)))  # columns 2j (low nibbles), 2j + 1 (high)
        lo, hi = _unpack(wb.to(tl.int8, bitcast=True), True)  # 16 * q, int8 (BN, KR / 2) each
        acc = tl.dot(lo, tl.trans(even), out_dtype=tl.int32)
        acc = tl.dot(hi, tl.trans(odd), acc, out_dtype=tl.int32)
        y = (acc.to(tl.float32) * 0.0625) * s[None, :]  # exact: the codes were 16 * q
        y = y * wsc[:, None]
        if HAS_ROUT:  # the restore is linear: each partial on its own (`w4a8` PART_RESTORE)
            y = _restore(y, c, N, rout_ptr, BN, BO, RESTORE, F32_DOT)
        tl.store(ws_ptr + (pid * BN + tl.arange(0, BN))[:, None] * BMT + toks[None, :], y)
    if PHASE == 0:
        sync = _cluster_sync(sync)
    if PHASE == 0 or PHASE == 3:
        TS: tl.constexpr = BMT // CL if BMT >= CL else 1
        t3 = rank * TS + tl.arange(0, TS)
        ch = tl.arange(0, BN)
        tot = tl.zeros((BN, TS), dtype=tl.float32)
        for sk in tl.static_range(CL):  # fixed order: deterministic sums
            tot += tl.load(ws_ptr + sync + ((c * CL + sk) * BN + ch)[:, None] * BMT + t3[None, :],
                           mask=(t3 < BMT)[None, :], other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            tot = tot + tl.load(bias_ptr + rows).to(tl.float32)[:, None]
        tl.store(out_ptr + t3[None, :] * stride_om + rows[:, None] * stride_on, tot.to(out_ptr.dtype.element_ty),
                 mask=(t3 < M)[None, :])


def plan(m: int, n: int, k: int, cfg: dict) -> tuple[int, int, int] | None:
    """(CL programs per cluster, BN weight rows per cluster, BMT token tile) for this shape, or
    None when the kernel does not cover it: 17 <= M <= 64, K split into CL ranges of whole
    64-wide blocks (at most 4 blocks each), BN dividing N."""
    cl, bn = cfg.get("FCL", 16), cfg.get("FBN", 128)
    if not 16 < m <= 64 or n % bn or k % (cl * 64) or k // (cl * 64) > 4 or cl > 16:
        return None
    return cl, bn, max(32, triton.next_power_of_2(m))


def usable(x: torch.Tensor, r_in: torch.Tensor, r_out: torch.Tensor | None, smooth, qmax: int, cfg: dict,
           n: int) -> bool:
    """Whether these operands fit: x (M, K) bf16/fp16, 64-wide float16/float32 R_in blocks, R_out
    blocks (if any) dividing BN, no smoothing, 8-bit codes, a `plan` for the shape."""
    m, k = x.shape
    p = plan(m, n, k, cfg)
    return (p is not None and x.dtype in (torch.bfloat16, torch.float16) and r_in.shape[-1] == 64
            and r_in.dtype in (torch.float16, torch.float32) and smooth is None and qmax <= 127
            and (r_out is None or p[1] % r_out.shape[-1] == 0))


def fused_linear(x: torch.Tensor, *, qweight: torch.Tensor, w_scale: torch.Tensor, r_in: torch.Tensor,
                 perm: torch.Tensor | None, r_out: torch.Tensor | None, bias: torch.Tensor | None, qmin: int,
                 qmax: int, cfg: dict, pdl: bool = False, token_minor_out: bool = False) -> torch.Tensor | None:
    """y (M, N) in x's dtype (row-major, or token-minor: the transpose of a contiguous (N, M)
    tensor) of the dynamic W4A8 layer, for x (M, K) (any strides), packed int4 qweight uint8
    (N, K/2), w_scale float32 (N,), r_in (K/64, 64, 64), perm (K,) or None, r_out (N/Bo, Bo, Bo)
    or None, bias (N,) or None. One cluster launch on the GPU (None when the GPU refuses it:
    the caller's launches run); three launches under the interpreter. cfg: FCL (programs per
    cluster), FBN (weight rows per cluster), FWARPS, RESTORE."""
    m, k = x.shape
    n = qweight.shape[0]
    cl, bn, bmt = plan(m, n, k, cfg)
    clusters = n // bn
    dev = x.device
    part = torch.empty((clusters * cl, bmt), device=dev, dtype=torch.float32)
    ws = torch.empty((clusters * cl, bn, bmt), device=dev, dtype=torch.float32)
    out = (torch.empty((n, m), device=dev, dtype=x.dtype).t() if token_minor_out
           else torch.empty((m, n), device=dev, dtype=x.dtype))
    args = dict(x_ptr=x, sxm=x.stride(0), sxk=x.stride(1), M=m, perm_ptr=perm if perm is not None else r_in,
                r_ptr=r_in, w_ptr=qweight, w_scale_ptr=w_scale, rout_ptr=r_out if r_out is not None else w_scale,
                bias_ptr=bias if bias is not None else w_scale, out_ptr=out, stride_om=out.stride(0),
                stride_on=out.stride(1), part_ptr=part, ws_ptr=ws, N=n, K=k, CL=cl, G=k // cl // 64, B=64, BN=bn,
                BMT=bmt, BO=r_out.shape[-1] if r_out is not None else 64, HAS_PERM=perm is not None,
                HAS_ROUT=r_out is not None, HAS_BIAS=bias is not None, QMIN=qmin, QMAX=qmax,
                RESTORE=cfg.get("RESTORE", 1), PREC="ieee" if _INTERPRET else "tf32", F32_DOT=_INTERPRET,
                num_warps=cfg.get("FWARPS", 4))
    if _INTERPRET or dev.type != "cuda":
        for phase in (1, 2, 3):
            _fused_kernel[(clusters * cl,)](**args, PHASE=phase, PDL=False)
        return out
    from .w4a8_cluster import _REFUSED, _launch_clusters
    key = (str(dev), "fused", cl)
    if key in _REFUSED:
        return None
    try:
        _launch_clusters(_fused_kernel, clusters, cl, {**args, "PHASE": 0, "PDL": pdl}, pdl)
    except RuntimeError:  # e.g. CUDA_ERROR_CLUSTER_OUT_OF_RESOURCES: the caller's launches run
        _REFUSED.add(key)
        return None
    return out
