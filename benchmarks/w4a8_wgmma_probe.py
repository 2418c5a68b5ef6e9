"""Probe (not used by the runtime): the W4A8 GEMM in Gluon, kept in flight with wgmma (reverted 55d41cd).

    PYTHONPATH=. python3 benchmarks/w4a8_wgmma_probe.py      # Hopper GPU

Reproduces docs/benchmarks.md "kernels v7", dropped items: on the LLM down_proj and linked
gate/up shapes at M = 800, the GEMM alone on the same int8 codes, against the Triton GEMM with
the same tiles, at BK 128 and 256, with and without a CTA-wide barrier before each stage refill
(BARRIER): relative error and CUDA-graph time. Design of the kernel:
- a TMA ring of STAGES buffers for the packed int4 weight tile (BN, BK/2) and both halves of the
  codes' tile (even k, odd k: the `_deint` order the quantize launch writes), one mbarrier each;
- the weight bytes loaded to registers in the wgmma operand layout, unpacked (int8 16 * q) and fed
  to two async wgmma per K step, `wgmma.wait_group 2` freeing the previous step's buffers;
- epilogue: scales, the R_out restore as a tf32 wgmma from shared memory, bias, strided store.
Findings: right and bit-identical to the Triton GEMM at BK 256, where ptxas serializes the wgmma
(C7515) and it is slower; wrong at BK 128 with or without the barrier (cause not found).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from int8_ceiling import grouped_tile  # noqa: E402


@gluon.jit
def _unpack_int8x16(wb):
    """(16 * low nibble, 16 * high nibble) as int8 of int8 bytes wb, four bytes per register."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
        "=r,=r,r", [wb], dtype=(gl.int8, gl.int8), is_pure=True, pack=4)


@gluon.jit
def _epilogue(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
              BN: gl.constexpr, BMT: gl.constexpr, BO: gl.constexpr, HAS_ROUT: gl.constexpr, HAS_BIAS: gl.constexpr,
              mma: gl.constexpr, num_warps: gl.constexpr):
    """out^T tile (BN, BMT) from the int32 sums: scales, R_out restore (tf32 wgmma), bias, strided store."""
    rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    toks = off_m + gl.arange(0, BMT, layout=gl.SliceLayout(0, mma))
    ts = gl.load(tok_scale_ptr + toks, mask=toks < M, other=0.0)
    y = (acc.to(gl.float32) * 0.0625) * ts[None, :]  # exact: the codes were 16 * q
    y = y * gl.load(w_scale_ptr + rows)[:, None]
    if HAS_ROUT:  # out^T = BD(R_out) @ y: a tf32 wgmma, both operands in shared memory (K-major)
        tl_: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
        i = gl.arange(0, BN, layout=gl.SliceLayout(1, tl_))
        i2 = gl.arange(0, BN, layout=gl.SliceLayout(0, tl_))
        same = (i[:, None] // BO) == (i2[None, :] // BO)
        t = gl.load(rout_ptr + ((off_n + i[:, None]) // BO) * (BO * BO) + (i[:, None] % BO) * BO + (i2[None, :] % BO),
                    mask=same, other=0.0).to(gl.float32)
        t_smem = gl.allocate_shared_memory(gl.float32, [BN, BN],
                                           gl.NVMMASharedLayout.get_default_for([BN, BN], gl.float32))
        t_smem.store(t)
        yt_smem = gl.allocate_shared_memory(gl.float32, [BMT, BN],
                                            gl.NVMMASharedLayout.get_default_for([BMT, BN], gl.float32))
        yt_smem.store(gl.permute(y, (1, 0)))
        fence_async_shared()
        mma_f: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, 128 if BMT % 128 == 0 else 64, 8])
        r = warpgroup_mma(t_smem, yt_smem.permute((1, 0)), gl.zeros((BN, BMT), dtype=gl.float32, layout=mma_f),
                          is_async=True)
        y = gl.convert_layout(warpgroup_mma_wait(num_outstanding=0, deps=(r, )), mma)
    if HAS_BIAS:
        y = y + gl.load(bias_ptr + rows).to(gl.float32)[:, None]
    mask = (rows[:, None] < N) & (toks[None, :] < M)
    gl.store(out_ptr + toks[None, :] * stride_om + rows[:, None] * stride_on, y.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _w4a8_wgmma_kernel(w_desc, alo_desc, ahi_desc, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr,
                       M, N, K, stride_om, stride_on, BO: gl.constexpr, HAS_ROUT: gl.constexpr,
                       HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, BARRIER: gl.constexpr,
                       num_warps: gl.constexpr):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]  # BK / 2: packed bytes per row and K step
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    pid = gl.program_id(0)
    off_m, off_n = grouped_tile(pid, M, N, BMT, BN, GROUP)

    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BKH], w_desc.layout)
    lo_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, BKH], alo_desc.layout)
    hi_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, BKH], ahi_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(bars.index(q), count=1)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 128 if BMT % 128 == 0 else 64, 32])
    w_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    acc = gl.zeros((BN, BMT), dtype=gl.int32, layout=mma)
    nbytes: gl.constexpr = w_desc.block_type.nbytes + alo_desc.block_type.nbytes + ahi_desc.block_type.nbytes
    nk = K // (2 * BKH)
    for p in gl.static_range(STAGES - 1):
        mbarrier.expect(bars.index(p), nbytes)
        tma.async_copy_global_to_shared(w_desc, [off_n, p * BKH], bars.index(p), w_bufs.index(p))
        tma.async_copy_global_to_shared(alo_desc, [off_m, 2 * p * BKH], bars.index(p), lo_bufs.index(p))
        tma.async_copy_global_to_shared(ahi_desc, [off_m, 2 * p * BKH + BKH], bars.index(p), hi_bufs.index(p))
    for i in range(nk):
        st = i % STAGES
        mbarrier.wait(bars.index(st), (i // STAGES) & 1)
        lo, hi = _unpack_int8x16(w_bufs.index(st).load(w_reg))
        acc = warpgroup_mma(lo, lo_bufs.index(st).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(hi, hi_bufs.index(st).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=2, deps=(acc, ))  # step i - 1 is done: its stage is free
        j = i + STAGES - 1
        if BARRIER:  # every warpgroup is past step i - 1 before its stage is refilled
            gl.thread_barrier()
        if j < nk:
            sj = j % STAGES
            mbarrier.expect(bars.index(sj), nbytes)
            tma.async_copy_global_to_shared(w_desc, [off_n, j * BKH], bars.index(sj), w_bufs.index(sj))
            tma.async_copy_global_to_shared(alo_desc, [off_m, 2 * j * BKH], bars.index(sj), lo_bufs.index(sj))
            tma.async_copy_global_to_shared(ahi_desc, [off_m, 2 * j * BKH + BKH], bars.index(sj),
                                            hi_bufs.index(sj))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(q))

    _epilogue(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
              BN, BMT, BO, HAS_ROUT, HAS_BIAS, mma, num_warps)


@gluon.jit
def _w4a8_ss_kernel(w_desc, a_desc, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr,
                    M, N, K, stride_om, stride_on, BO: gl.constexpr, HAS_ROUT: gl.constexpr, HAS_BIAS: gl.constexpr,
                    STAGES: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr):
    """Both wgmma operands in shared memory: each K step's packed weight tile is unpacked by all
    warps into one of two int8 buffers (16 * low nibbles, 16 * high nibbles), then two async wgmma
    read it with the codes' halves; one step stays in flight while the next one is unpacked."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    BMT: gl.constexpr = a_desc.block_type.shape[0]
    pid = gl.program_id(0)
    off_m, off_n = grouped_tile(pid, M, N, BMT, BN, GROUP)

    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BKH], w_desc.layout)
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, 2 * BKH], a_desc.layout)
    u_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, 2 * BKH], gl.int8)
    ubuf = gl.allocate_shared_memory(gl.int8, [2, BN, 2 * BKH], u_layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(bars.index(q), count=1)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 128 if BMT % 128 == 0 else 64, 32])
    blk: gl.constexpr = gl.BlockedLayout([1, 16], [32 // (BKH // 16), BKH // 16], [num_warps, 1], [1, 0])
    acc = gl.zeros((BN, BMT), dtype=gl.int32, layout=mma)
    nbytes: gl.constexpr = w_desc.block_type.nbytes + a_desc.block_type.nbytes
    nk = K // (2 * BKH)
    for p in gl.static_range(STAGES - 1):
        mbarrier.expect(bars.index(p), nbytes)
        tma.async_copy_global_to_shared(w_desc, [off_n, p * BKH], bars.index(p), w_bufs.index(p))
        tma.async_copy_global_to_shared(a_desc, [off_m, 2 * p * BKH], bars.index(p), a_bufs.index(p))
    for i in range(nk):
        st = i % STAGES
        ub = i % 2
        mbarrier.wait(bars.index(st), (i // STAGES) & 1)
        lo, hi = _unpack_int8x16(w_bufs.index(st).load(blk))
        ubuf.index(ub).slice(0, BKH, dim=1).store(lo)  # free: step i - 2 (its last reader) finished
        ubuf.index(ub).slice(BKH, BKH, dim=1).store(hi)  # before the barrier below; [lo | hi] = the codes' order
        fence_async_shared()
        gl.thread_barrier()  # every warp's unpacked rows are in shared memory before any wgmma reads them
        acc = warpgroup_mma(ubuf.index(ub), a_bufs.index(st).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # this warpgroup's step i - 1 is done
        gl.thread_barrier()  # ... and every warpgroup's: step i - 1's ring stage and unpack buffer are free
        j = i + STAGES - 1
        if j < nk:
            sj = j % STAGES
            mbarrier.expect(bars.index(sj), nbytes)
            tma.async_copy_global_to_shared(w_desc, [off_n, j * BKH], bars.index(sj), w_bufs.index(sj))
            tma.async_copy_global_to_shared(a_desc, [off_m, 2 * j * BKH], bars.index(sj), a_bufs.index(sj))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(q))
    _epilogue(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
              BN, BMT, BO, HAS_ROUT, HAS_BIAS, mma, num_warps)


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.int8)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def wgmma_gemm(codes: torch.Tensor, tok_scale: torch.Tensor, *, qweight: torch.Tensor, w_scale: torch.Tensor,
               r_out: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor, cfg: dict) -> torch.Tensor:
    """out (M, N) (any strides) = restore((codes @ W_q^T) x scales) + bias for int8 codes (M, K) in the
    `_deint` order of K tiles cfg["BK"], per-token scales (M,), packed int4 qweight uint8 (N, K/2)."""
    m, k = codes.shape
    n = qweight.shape[0]
    bn, bmt, bk = cfg["BN"], cfg["BMT"], cfg["BK"]
    w8 = qweight.view(torch.int8)
    bo = r_out.shape[-1] if r_out is not None else 16
    if cfg.get("SS"):
        kern, descs, extra = _w4a8_ss_kernel, (_desc(w8, [bn, bk // 2]), _desc(codes, [bmt, bk])), {}
    else:
        kern, extra = _w4a8_wgmma_kernel, {"BARRIER": cfg.get("BARRIER", True)}
        descs = (_desc(w8, [bn, bk // 2]), _desc(codes, [bmt, bk // 2]), _desc(codes, [bmt, bk // 2]))
    kern[(triton.cdiv(n, bn) * triton.cdiv(m, bmt),)](
        *descs, tok_scale, w_scale,
        r_out if r_out is not None else w_scale, bias if bias is not None else w_scale, out, m, n, k,
        out.stride(0), out.stride(1), BO=bo, HAS_ROUT=r_out is not None, HAS_BIAS=bias is not None,
        STAGES=cfg.get("STAGES", 3), GROUP=cfg.get("GROUP", 8), num_warps=cfg["num_warps"], **extra)
    return out


SS_TILES = [(64, 128, 256, 4, 3), (64, 128, 256, 4, 4), (64, 128, 128, 4, 4), (64, 128, 128, 4, 6),
            (128, 128, 256, 8, 3), (128, 128, 128, 8, 4), (64, 256, 128, 8, 3)]


def probe_ss() -> None:
    """The shared-memory-unpack kernel (SS) against the Triton GEMM on the same codes: error, time."""
    from runtime_gpu import graph_time
    from duquant_runtime.kernels import w4a8 as K
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((800, 2048, 16384), (800, 32768, 2048), (800, 2048, 2048), (800, 2560, 2048)):
        x = torch.randn(m, k, generator=g).bfloat16().cuda()
        r_in = torch.linalg.qr(torch.randn(k // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()
        r_out = torch.linalg.qr(torch.randn(n // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()
        qw = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda()
        ws = (torch.rand(n, generator=g) * 0.01 + 0.001).cuda()
        base = K.pick_config(m, n, k, K.MODE_DYNAMIC)
        codes0, ts0 = K.prepare_activation(x, r_in=r_in, perm=None, smooth=None, mode=K.MODE_DYNAMIC, cfg=base)
        t_tri = graph_time([lambda a: K.w4_gemm(a, ts0, qweight=qw, w_scale=ws, r_out=r_out, bias=None,
                                                out_dtype=torch.bfloat16, cfg=base)], codes0, 7)
        print(f"N={n} K={k} M={m}: triton GEMM (picked {base['BN']}/{base['BMT']}/{base['BK']}) {t_tri * 1e6:.1f} us",
              flush=True)
        for bn, bmt, bk, warps, st in SS_TILES:
            cfg = dict(base, BN=bn, BMT=bmt, BK=bk, num_warps=warps, STAGES=st, SPLIT=1, SS=True)
            try:
                codes, ts = K.prepare_activation(x, r_in=r_in, perm=None, smooth=None, mode=K.MODE_DYNAMIC, cfg=cfg)
                ref = K.w4_gemm(codes, ts, qweight=qw, w_scale=ws, r_out=r_out, bias=None, out_dtype=torch.bfloat16,
                                cfg=cfg).float()
                out = torch.empty((m, n), device="cuda", dtype=torch.bfloat16)
                f = lambda a, c=cfg, o=out, ts=ts: wgmma_gemm(a, ts, qweight=qw, w_scale=ws, r_out=r_out, bias=None,
                                                             out=o, cfg=c)
                got = f(codes).float()
                err = float((got - ref).norm() / ref.norm())
                same = bool(torch.equal(got, ref))
                t = graph_time([f], codes, 7)
            except Exception as e:  # noqa: BLE001  (a tile that does not compile is reported)
                print(f"  SS {bn}/{bmt}/{bk} w{warps} s{st}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            print(f"  SS {bn}/{bmt}/{bk} w{warps} s{st}: err {err:.1e} identical={same} {t * 1e6:.1f} us", flush=True)


if __name__ == "__main__" and "--ss" in sys.argv:
    probe_ss()
elif __name__ == "__main__":  # probe: is the BK 128 error the refill race? (run from the repo root)
    from runtime_gpu import graph_time
    from duquant_runtime.kernels import w4a8 as K
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((800, 2048, 16384), (800, 32768, 2048)):
        x = torch.randn(m, k, generator=g).bfloat16().cuda()
        r_in = torch.linalg.qr(torch.randn(k // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()
        r_out = torch.linalg.qr(torch.randn(n // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()
        qw = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda()
        ws = (torch.rand(n, generator=g) * 0.01 + 0.001).cuda()
        for bn, bk, warps, st in ((128, 128, 8, 4), (64, 128, 4, 4), (128, 256, 8, 3)):
            cfg = dict(K.pick_config(m, n, k, K.MODE_DYNAMIC), BN=bn, BMT=128, BK=bk, num_warps=warps, STAGES=st, SPLIT=1)
            codes, ts = K.prepare_activation(x, r_in=r_in, perm=None, smooth=None, mode=K.MODE_DYNAMIC, cfg=cfg)
            ref = K.w4_gemm(codes, ts, qweight=qw, w_scale=ws, r_out=r_out, bias=None, out_dtype=torch.bfloat16, cfg=cfg).float()
            t_tri = graph_time([lambda a: K.w4_gemm(a, ts, qweight=qw, w_scale=ws, r_out=r_out, bias=None,
                                                    out_dtype=torch.bfloat16, cfg=cfg)], codes, 5)
            for barrier in (False, True):
                c = dict(cfg, BARRIER=barrier)
                f = lambda a, c=c: wgmma_gemm(a, ts, qweight=qw, w_scale=ws, r_out=r_out, bias=None,
                                              out=torch.empty((m, n), device="cuda", dtype=torch.bfloat16), cfg=c)
                errs = [float((f(codes).float() - ref).norm() / ref.norm()) for _ in range(3)]
                t = graph_time([f], codes, 5)
                print(f"N={n} K={k} BN={bn} BK={bk} w{warps} s{st} barrier={barrier}: err {max(errs):.1e} "
                      f"gluon {t * 1e6:.1f} us triton {t_tri * 1e6:.1f} us", flush=True)
