"""Probe (not used by the runtime): W4A8 GEMMs in Gluon that keep wgmma in flight, against the Triton GEMM.

    PYTHONPATH=. python3 benchmarks/w4a8_wgmma_probe.py {rs,ss,ws,restore-cost} [--out FILE]   # Hopper GPU

Each kernel multiplies the same int8 codes (dynamic activations, `_deint` K order) by the packed
int4 weights of the pi0.5 LLM shapes at M = 800 (down_proj, linked gate/up, o, linked q/k/v) and
is compared with the picked Triton GEMM (`w4_gemm`): relative error, bit identity, CUDA-graph time.
- `rs`: the weight tile unpacked in registers as the wgmma A operand (TMA ring for the packed
  weight and both halves of the codes' tile). Two K steps per loop iteration: PTX reuses a loop
  body's registers every iteration and wgmma reads its register operand asynchronously, so with
  one step per iteration and a wgmma in flight the next unpack overwrote it (the wrong results
  of the v7 probe at BK 128). Restore: tf32 mma.sync, its operand via shared memory (RESTORE 1)
  or via global scratch (2); ptxas serializes every wgmma of the kernel (C7515) as soon as the
  sums make a shared-memory round trip in the epilogue. Tiles with and without R_out.
- `ss`: both operands in shared memory, all warps unpack each step into a buffer.
- `ws`: warp-specialized: a TMA warp, NPART unpack partitions, a wgmma warpgroup; SKIP-UNPACK
  times the pipeline without the unpack (wrong results).
- `restore-cost`: the Triton GEMM with and without the R_out restore, pi0.5 shapes at M = 800/50.
Measured results: docs/benchmarks.md, "kernels v8 probes".
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
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duquant_runtime.kernels.w4a8_rs import descriptor, grouped_tile, rs_mainloop, unpack_int8x16  # noqa: E402


@gluon.jit
def _fill(w_desc, a_desc, bar, w_buf, a_buf, off_n, off_m, j):
    """TMA of K step j into one ring stage, completing on bar: the packed weight tile (BN, BK/2)
    and the whole codes' tile (BMT, BK)."""
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    mbarrier.expect(bar, w_desc.block_type.nbytes + a_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(w_desc, [off_n, j * BKH], bar, w_buf)
    tma.async_copy_global_to_shared(a_desc, [off_m, 2 * j * BKH], bar, a_buf)


@gluon.jit
def _epilogue(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
              BN: gl.constexpr, BMT: gl.constexpr, BO: gl.constexpr, HAS_ROUT: gl.constexpr, HAS_BIAS: gl.constexpr,
              mma: gl.constexpr, num_warps: gl.constexpr, scratch_ptr, RESTORE: gl.constexpr):
    """out^T tile (BN, BMT) from the int32 sums: scales, R_out restore, bias, strided store.
    RESTORE 0: tf32 wgmma, both operands through shared memory; 1: tf32 mma.sync on the sums moved
    into its operand layout (through shared memory); 2: the same through this program's tile of a
    global scratch buffer (L2). Any shared-memory round trip of the sums here makes ptxas serialize
    the register-operand wgmma of the main loop (C7515); 2 does not."""
    rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    toks = off_m + gl.arange(0, BMT, layout=gl.SliceLayout(0, mma))
    ts = gl.load(tok_scale_ptr + toks, mask=toks < M, other=0.0)
    y = (acc.to(gl.float32) * 0.0625) * ts[None, :]  # exact: the codes were 16 * q
    y = y * gl.load(w_scale_ptr + rows)[:, None]
    if HAS_ROUT and RESTORE == 0:  # out^T = BD(R_out) @ y: a tf32 wgmma, both operands in shared memory
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
    if HAS_ROUT and RESTORE != 0:  # tf32 mma.sync
        mma2: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
        ta: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma2, k_width=1)
        i = gl.arange(0, BN, layout=gl.SliceLayout(1, ta))
        i2 = gl.arange(0, BN, layout=gl.SliceLayout(0, ta))
        same = (i[:, None] // BO) == (i2[None, :] // BO)
        t = gl.load(rout_ptr + ((off_n + i[:, None]) // BO) * (BO * BO) + (i[:, None] % BO) * BO + (i2[None, :] % BO),
                    mask=same, other=0.0).to(gl.float32)
        yl: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma2, k_width=1)
        if RESTORE == 2:
            base = scratch_ptr + gl.program_id(0) * (BN * BMT)
            ri = gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
            ci = gl.arange(0, BMT, layout=gl.SliceLayout(0, mma))
            gl.store(base + ri[:, None] * BMT + ci[None, :], y)
            gl.thread_barrier()
            rj = gl.arange(0, BN, layout=gl.SliceLayout(1, yl))
            cj = gl.arange(0, BMT, layout=gl.SliceLayout(0, yl))
            y = mma_v2(t, gl.load(base + rj[:, None] * BMT + cj[None, :]),
                       gl.zeros((BN, BMT), dtype=gl.float32, layout=mma2), input_precision="tf32")
            rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, mma2))
            toks = off_m + gl.arange(0, BMT, layout=gl.SliceLayout(0, mma2))
        else:
            y = gl.convert_layout(mma_v2(t, gl.convert_layout(y, yl), gl.zeros((BN, BMT), dtype=gl.float32, layout=mma2),
                                         input_precision="tf32"), mma)
    if HAS_BIAS:
        y = y + gl.load(bias_ptr + rows).to(gl.float32)[:, None]
    mask = (rows[:, None] < N) & (toks[None, :] < M)
    gl.store(out_ptr + toks[None, :] * stride_om + rows[:, None] * stride_on, y.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _w4a8_wgmma_kernel(w_desc, alo_desc, ahi_desc, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr,
                       M, N, K, stride_om, stride_on, BO: gl.constexpr, HAS_ROUT: gl.constexpr,
                       HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, BARRIER: gl.constexpr,
                       scratch_ptr, WAIT: gl.constexpr, RESTORE: gl.constexpr, num_warps: gl.constexpr):
    """Register-operand W4A8 GEMM, wgmma kept in flight (WAIT groups): the packed weight tile is
    unpacked in registers as the wgmma A operand, two K steps per loop iteration (see below)."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    off_m, off_n = grouped_tile(gl.program_id(0), M, N, BMT, BN, GROUP)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 128 if BMT % 128 == 0 else 64, 32])
    acc = rs_mainloop(w_desc, alo_desc, ahi_desc, off_n, off_m, K, mma, STAGES, WAIT, BARRIER)  # the runtime's loop
    _epilogue(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
              BN, BMT, BO, HAS_ROUT, HAS_BIAS, mma, num_warps, scratch_ptr, RESTORE)


@gluon.jit
def _unpack_ring(w_desc, a_desc, M, N, STAGES: gl.constexpr, UBUFS: gl.constexpr, GROUP: gl.constexpr):
    """Program's tile (off_m, off_n) and the shared memory of the unpack-to-shared kernels: a ring of
    STAGES packed weight tiles (BN, BK/2) and codes' tiles (BMT, BK), UBUFS unpacked (BN, BK) tiles."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    BMT: gl.constexpr = a_desc.block_type.shape[0]
    off_m, off_n = grouped_tile(gl.program_id(0), M, N, BMT, BN, GROUP)
    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BKH], w_desc.layout)
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, 2 * BKH], a_desc.layout)
    ubuf = gl.allocate_shared_memory(gl.int8, [UBUFS, BN, 2 * BKH],
                                     gl.NVMMASharedLayout.get_default_for([BN, 2 * BKH], gl.int8))
    return off_m, off_n, w_bufs, a_bufs, ubuf


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
    off_m, off_n, w_bufs, a_bufs, ubuf = _unpack_ring(w_desc, a_desc, M, N, STAGES, 2, GROUP)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(bars.index(q), count=1)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 128 if BMT % 128 == 0 else 64, 32])
    blk: gl.constexpr = gl.BlockedLayout([1, 16], [32 // (BKH // 16), BKH // 16], [num_warps, 1], [1, 0])
    acc = gl.zeros((BN, BMT), dtype=gl.int32, layout=mma)
    nk = K // (2 * BKH)
    for p in gl.static_range(STAGES - 1):
        _fill(w_desc, a_desc, bars.index(p), w_bufs.index(p), a_bufs.index(p), off_n, off_m, p)
    for i in range(nk):
        st = i % STAGES
        ub = i % 2
        mbarrier.wait(bars.index(st), (i // STAGES) & 1)
        lo, hi = unpack_int8x16(w_bufs.index(st).load(blk))
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
            _fill(w_desc, a_desc, bars.index(sj), w_bufs.index(sj), a_bufs.index(sj), off_n, off_m, j)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(q))
    _epilogue(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
              BN, BMT, BO, HAS_ROUT, HAS_BIAS, mma, num_warps, w_scale_ptr, 0)


@gluon.jit
def _ws_load(w_desc, a_desc, w_bufs, a_bufs, ubuf, loaded, ready, empty, off_n, off_m, nk, SKIP: gl.constexpr,
             PART: gl.constexpr, NPART: gl.constexpr):
    """Worker (1 warp): TMA of the packed weight tile and the codes' tile into ring stage i % S,
    once the consumer has freed it."""
    S: gl.constexpr = w_bufs.type.shape[0]
    for i in range(nk):
        st = i % S
        mbarrier.wait(empty.index(st), ((i // S) & 1) ^ 1)
        _fill(w_desc, a_desc, loaded.index(st), w_bufs.index(st), a_bufs.index(st), off_n, off_m, i)


@gluon.jit
def _ws_unpack(w_desc, a_desc, w_bufs, a_bufs, ubuf, loaded, ready, empty, off_n, off_m, nk, SKIP: gl.constexpr,
               PART: gl.constexpr, NPART: gl.constexpr):
    """Worker: packed int4 tile of stage i % S -> int8 16 * q, [low nibbles | high nibbles] along
    K (the codes' `_deint` order), into the stage's unpacked buffer, for the steps i = PART mod
    NPART (NPART such partitions unpack NPART steps at once). SKIP: no unpack (wrong results;
    times the pipeline without it)."""
    S: gl.constexpr = w_bufs.type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    blk: gl.constexpr = gl.BlockedLayout([1, 16], [32 // (BKH // 16), BKH // 16], [gl.num_warps(), 1], [1, 0])
    for i in range(PART, nk, NPART):
        st = i % S
        mbarrier.wait(loaded.index(st), (i // S) & 1)
        if not SKIP:
            lo, hi = unpack_int8x16(w_bufs.index(st).load(blk))
            ubuf.index(st).slice(0, BKH, dim=1).store(lo)
            ubuf.index(st).slice(BKH, BKH, dim=1).store(hi)
            fence_async_shared()
        mbarrier.arrive(ready.index(st), count=1)


@gluon.jit
def _ws_mma(a_bufs, ubuf, ready, empty, nk, acc):
    """Default partition: one async wgmma per K step on the unpacked weight and the codes, one in
    flight; frees the previous step's stage."""
    S: gl.constexpr = a_bufs.type.shape[0]
    for i in range(nk):
        st = i % S
        mbarrier.wait(ready.index(st), (i // S) & 1)
        acc = warpgroup_mma(ubuf.index(st), a_bufs.index(st).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(empty.index((i + S - 1) % S), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    return (acc, )


@gluon.jit
def _w4a8_ws_kernel(w_desc, a_desc, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr,
                    M, N, K, stride_om, stride_on, BO: gl.constexpr, HAS_ROUT: gl.constexpr, HAS_BIAS: gl.constexpr,
                    STAGES: gl.constexpr, GROUP: gl.constexpr, UW: gl.constexpr, SKIP: gl.constexpr,
                    NPART: gl.constexpr, num_warps: gl.constexpr):
    """Warp-specialized: a TMA warp, four unpack warps and the default partition's wgmma
    warpgroup(s) pass ring stages through three mbarriers each (loaded, ready, empty)."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    BMT: gl.constexpr = a_desc.block_type.shape[0]
    off_m, off_n, w_bufs, a_bufs, ubuf = _unpack_ring(w_desc, a_desc, M, N, STAGES, STAGES, GROUP)
    loaded = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(loaded.index(q), count=1)
        mbarrier.init(ready.index(q), count=1)
        mbarrier.init(empty.index(q), count=1)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 128 if BMT % 128 == 0 else 64, 32])
    acc = gl.zeros((BN, BMT), dtype=gl.int32, layout=mma)
    nk = K // (2 * BKH)
    if NPART == 1:
        a0 = (w_desc, a_desc, w_bufs, a_bufs, ubuf, loaded, ready, empty, off_n, off_m, nk, SKIP, 0, 1)
        acc = gl.warp_specialize([(_ws_mma, (a_bufs, ubuf, ready, empty, nk, acc)), (_ws_load, a0), (_ws_unpack, a0)],
                                 [1, UW], [40, 96 if UW == 4 else 64])[0]
    else:
        a0 = (w_desc, a_desc, w_bufs, a_bufs, ubuf, loaded, ready, empty, off_n, off_m, nk, SKIP, 0, 2)
        a1 = (w_desc, a_desc, w_bufs, a_bufs, ubuf, loaded, ready, empty, off_n, off_m, nk, SKIP, 1, 2)
        acc = gl.warp_specialize([(_ws_mma, (a_bufs, ubuf, ready, empty, nk, acc)), (_ws_load, a0), (_ws_unpack, a0),
                                  (_ws_unpack, a1)], [1, UW, UW], [40, 64, 64])[0]
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(loaded.index(q))
        mbarrier.invalidate(ready.index(q))
        mbarrier.invalidate(empty.index(q))
    _epilogue(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
              BN, BMT, BO, HAS_ROUT, HAS_BIAS, mma, num_warps, w_scale_ptr, 0)


def wgmma_gemm(codes: torch.Tensor, tok_scale: torch.Tensor, *, qweight: torch.Tensor, w_scale: torch.Tensor,
               r_out: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor, cfg: dict) -> torch.Tensor:
    """out (M, N) (any strides) = restore((codes @ W_q^T) x scales) + bias for int8 codes (M, K) in the
    `_deint` order of K tiles cfg["BK"], per-token scales (M,), packed int4 qweight uint8 (N, K/2)."""
    m, k = codes.shape
    n = qweight.shape[0]
    bn, bmt, bk = cfg["BN"], cfg["BMT"], cfg["BK"]
    w8 = qweight.view(torch.int8)
    bo = r_out.shape[-1] if r_out is not None else 16
    if cfg.get("SS") or cfg.get("WS"):
        kern = _w4a8_ws_kernel if cfg.get("WS") else _w4a8_ss_kernel
        descs = (descriptor(w8, [bn, bk // 2]), descriptor(codes, [bmt, bk]))
        extra = ({"UW": cfg.get("UW", 4), "SKIP": cfg.get("SKIP", False), "NPART": cfg.get("NPART", 1)}
                 if cfg.get("WS") else {})
    else:
        scratch = torch.empty(triton.cdiv(n, bn) * triton.cdiv(m, bmt) * bn * bmt, device=codes.device,
                              dtype=torch.float32) if cfg.get("SCRATCH") else w_scale
        kern, extra = _w4a8_wgmma_kernel, {"BARRIER": cfg.get("BARRIER", True), "scratch_ptr": scratch,
                                           "WAIT": cfg.get("WAIT", 2), "RESTORE": 2 if cfg.get("SCRATCH") else 1}
        descs = (descriptor(w8, [bn, bk // 2]), descriptor(codes, [bmt, bk // 2]), descriptor(codes, [bmt, bk // 2]))
    kern[(triton.cdiv(n, bn) * triton.cdiv(m, bmt),)](
        *descs, tok_scale, w_scale,
        r_out if r_out is not None else w_scale, bias if bias is not None else w_scale, out, m, n, k,
        out.stride(0), out.stride(1), BO=bo, HAS_ROUT=r_out is not None, HAS_BIAS=bias is not None,
        STAGES=cfg.get("STAGES", 3), GROUP=cfg.get("GROUP", 8), num_warps=cfg["num_warps"], **extra)
    return out


SS_TILES = [(64, 128, 256, 4, 3), (64, 128, 256, 4, 4), (64, 128, 128, 4, 4), (64, 128, 128, 4, 6),
            (128, 128, 256, 8, 3), (128, 128, 128, 8, 4), (64, 256, 128, 8, 3)]
WS_TILES = [(128, 128, 128, 4, 4, 4, False, 1), (128, 128, 128, 4, 4, 4, True, 1), (128, 128, 128, 4, 4, 4, False, 2),
            (128, 128, 64, 4, 6, 4, False, 2), (128, 256, 128, 8, 3, 4, False, 2), (128, 256, 128, 8, 3, 4, False, 1),
            (64, 128, 256, 4, 3, 4, False, 2), (128, 128, 128, 4, 4, 2, False, 2)]


RS_TILES = [(64, 128, 256, 4, 3, 1), (64, 128, 256, 4, 4, 1), (128, 128, 256, 8, 3, 1), (128, 128, 256, 8, 4, 1),
              (64, 128, 256, 4, 4, 2), (128, 128, 256, 8, 4, 2), (128, 256, 256, 8, 2, 1)]
RS_TILES = [(64, 128, 256, 4, 3, 2, False, True, True), (64, 128, 256, 4, 3, 2, False, True, False),
            (64, 128, 128, 4, 4, 2, False, True, False), (128, 128, 256, 8, 3, 2, True, True, False),
            (128, 128, 256, 8, 4, 2, True, True, False), (64, 128, 256, 4, 4, 2, False, True, False),
            (128, 128, 256, 8, 4, 1, True, True, True)]  # ..., WAIT, BARRIER, SCRATCH, R_out


def probe_ss(kind: str, results: list) -> None:
    """The shared-memory-unpack kernels (SS: all warps unpack; WS: warp-specialized) against the
    Triton GEMM on the same codes: error, time."""
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
        tiles = {"WS": WS_TILES, "SS": SS_TILES, "RS": RS_TILES}[kind]
        for tile in tiles:
            bn, bmt, bk, warps, st = tile[:5]
            cfg = dict(base, BN=bn, BMT=bmt, BK=bk, num_warps=warps, STAGES=st, SPLIT=1, BARRIER=False, **{kind: True})
            rout = r_out
            if kind == "RS":
                cfg.update(WAIT=tile[5], BARRIER=tile[6], SCRATCH=tile[7])
                rout = r_out if tile[8] else None
                st = f"{st} wait {tile[5]} barrier {tile[6]} scratch {tile[7]} {'with' if tile[8] else 'WITHOUT'} R_out"
            if kind == "WS":
                cfg.update(UW=tile[5], SKIP=tile[6], NPART=tile[7])
                st = f"{st} unpack {tile[7]} x {tile[5]} warps{' SKIP-UNPACK' if tile[6] else ''}"
            try:
                codes, ts = K.prepare_activation(x, r_in=r_in, perm=None, smooth=None, mode=K.MODE_DYNAMIC, cfg=cfg)
                ref = K.w4_gemm(codes, ts, qweight=qw, w_scale=ws, r_out=rout, bias=None, out_dtype=torch.bfloat16,
                                cfg=cfg).float()
                out = torch.empty((m, n), device="cuda", dtype=torch.bfloat16)
                f = lambda a, c=cfg, o=out, ts=ts, ro=rout: wgmma_gemm(a, ts, qweight=qw, w_scale=ws, r_out=ro,
                                                                      bias=None, out=o, cfg=c)
                got = f(codes).float()
                err = float((got - ref).norm() / ref.norm())
                same = bool(torch.equal(got, ref))
                t = graph_time([f], codes, 7)
            except Exception as e:  # noqa: BLE001  (a tile that does not compile is reported)
                print(f"  {kind} {bn}/{bmt}/{bk} w{warps} s{st}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            results.append({"N": n, "K": k, "M": m, "kind": kind, "tile": list(tile), "triton_s": t_tri, "s": t,
                            "rel_err": err, "bit_identical": same})
            print(f"  {kind} {bn}/{bmt}/{bk} w{warps} s{st}: err {err:.1e} identical={same} {t * 1e6:.1f} us", flush=True)


def restore_cost(results: list) -> None:
    """The picked Triton GEMM with and without the R_out restore (what the restore costs)."""
    from runtime_gpu import graph_time
    from duquant_runtime.kernels import w4a8 as K
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((800, 2048, 16384), (800, 32768, 2048), (800, 2048, 2048), (800, 2560, 2048), (50, 1024, 4096),
                    (50, 8192, 1024), (50, 1024, 2048)):
        x = torch.randn(m, k, generator=g).bfloat16().cuda()
        r_in = torch.linalg.qr(torch.randn(k // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()
        r_out = torch.linalg.qr(torch.randn(n // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()
        count = max(1, min(16, (200 << 20) // (n * k // 2)))  # weights beyond L2
        qws = [torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda() for _ in range(count)]
        ws = (torch.rand(n, generator=g) * 0.01 + 0.001).cuda()
        cfg = K.pick_config(m, n, k, K.MODE_DYNAMIC)
        codes, ts = K.prepare_activation(x, r_in=r_in, perm=None, smooth=None, mode=K.MODE_DYNAMIC, cfg=cfg)
        row = {"M": m, "N": n, "K": k}
        for key, ro in (("with_rout_s", r_out), ("without_rout_s", None)):
            fns = [lambda a, q=q, ro=ro: K.w4_gemm(a, ts, qweight=q, w_scale=ws, r_out=ro, bias=None,
                                                   out_dtype=torch.bfloat16, cfg=cfg) for q in qws]
            row[key] = graph_time(fns, codes, 7)
        results.append(row)
        print(f"M={m} N={n} K={k}: Triton GEMM with R_out {row['with_rout_s'] * 1e6:.1f} us, "
              f"without {row['without_rout_s'] * 1e6:.1f} us", flush=True)


def main(argv=None) -> int:
    import argparse
    from results_file import write_results
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=("rs", "ss", "ws", "restore-cost"))
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/wgmma_probe_<probe>.json)")
    args = ap.parse_args(argv)
    results: list = []
    if args.probe == "restore-cost":
        restore_cost(results)
    else:
        probe_ss(args.probe.upper(), results)
    out = Path(args.out or f"benchmarks/results/wgmma_probe_{args.probe.replace('-', '_')}.json")
    write_results(out, {"probe": args.probe, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
