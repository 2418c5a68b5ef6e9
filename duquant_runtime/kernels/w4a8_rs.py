"""The register-operand W4A8 GEMM for Hopper (Gluon), with the R_out restore as its own launch.

    y' = (codes @ W_q^T) x token scales x row scales        (`_rs_gemm_kernel`, bf16, (N, M))
    y  = y' BD(R_out)^T + b                                   (`w4a8._restore_kernel`)

Why two launches: the GEMM keeps wgmma in flight (Triton 3.6-3.9 wait for every int8 wgmma of
`w4a8._gemm_kernel`), and ptxas serializes every wgmma of a kernel (warning C7515) as soon as
its epilogue touches shared memory, which an in-epilogue restore dot does
(benchmarks/notes_runtime_gpu.md). So this GEMM's epilogue only scales the int32 sums and stores
y' in bf16, token-minor (the accumulator layout holds consecutive tokens per thread); the
restore reads y' back from L2. The numerics are those of `w4a8`'s bf16 restore (`RESTORE` 1):
the scaled sums rounded to bf16, a bf16 dot with float32 sums, the bias, the cast.

The weight tile is unpacked in registers (16 * q as int8, exact; the 1/16 is folded into the
scales) as the wgmma A operand; TMA brings the packed weight and both halves of the codes' tile
(`_deint` order: even k, then odd k) through a ring of STAGES stages. Two K steps per loop
iteration: PTX reuses a loop body's registers every iteration and wgmma reads its register
operand asynchronously, so with one step per iteration the next unpack would overwrite the
operand of the wgmma still in flight.

Used by `w4a8.w4_gemm` where `pick_config` asks for it (GEMM="rs") on sm_90 with Gluon; every
other case, and the CPU interpreter, runs the Triton GEMM. The GPU tests compare it with the
Triton GEMM and the float32 reference (tests/test_w4a8_rs.py)."""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def grouped_tile(pid, M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP: gl.constexpr):
    """(first token, first weight row) of program pid's (BM, BN) output tile: GROUP weight-row
    tiles x all token tiles per group, so a weight tile stays in L2 while every token tile reads it."""
    num_m = gl.cdiv(M, BM)
    per_group = GROUP * num_m
    first_n = (pid // per_group) * GROUP
    group_n = gl.minimum(gl.cdiv(N, BN) - first_n, GROUP)
    return ((pid % per_group) // group_n) * BM, (first_n + (pid % per_group) % group_n) * BN


@gluon.jit
def unpack_int8x16(wb):
    """(16 * low nibble, 16 * high nibble) as int8 of int8 bytes wb, four bytes per register."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
        "=r,=r,r", [wb], dtype=(gl.int8, gl.int8), is_pure=True, pack=4)


@gluon.jit
def fill_split(w_desc, alo_desc, ahi_desc, bar, w_buf, lo_buf, hi_buf, off_n, off_m, j):
    """TMA of K step j into one ring stage, completing on bar: the packed weight tile (BN, BK/2)
    and both halves of the codes' tile (even k, odd k: `_deint` order)."""
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    mbarrier.expect(bar, w_desc.block_type.nbytes + alo_desc.block_type.nbytes + ahi_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(w_desc, [off_n, j * BKH], bar, w_buf)
    tma.async_copy_global_to_shared(alo_desc, [off_m, 2 * j * BKH], bar, lo_buf)
    tma.async_copy_global_to_shared(ahi_desc, [off_m, 2 * j * BKH + BKH], bar, hi_buf)


@gluon.jit
def rs_ring(w_desc, alo_desc, ahi_desc, STAGES: gl.constexpr):
    """The TMA ring of `rs_steps`: STAGES stages of the packed weight tile (BN, BK/2) and both
    halves of the codes' tile (BMT, BK/2), and one initialized mbarrier per stage."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BKH], w_desc.layout)
    lo_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, BKH], alo_desc.layout)
    hi_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, BKH], ahi_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(bars.index(q), count=1)
    return w_bufs, lo_bufs, hi_bufs, bars


@gluon.jit
def rs_steps(w_desc, alo_desc, ahi_desc, ring, off_n, off_m, j0, nk, g0, mma: gl.constexpr, STAGES: gl.constexpr,
             WAIT: gl.constexpr, BARRIER: gl.constexpr):
    """int32 sums (BN, BMT) in layout mma of 16 * W_q tile @ codes^T over K steps j0 .. j0 + nk - 1
    (nk even): the weight unpacked in registers as the wgmma A operand, WAIT wgmma groups kept in
    flight. The ring's fills and waits are numbered from g0 on (stage g % STAGES, phase
    g // STAGES), so that one ring serves several calls; the ring is drained on return."""
    w_bufs, lo_bufs, hi_bufs, bars = ring
    w_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    acc = gl.zeros((BN, BMT), dtype=gl.int32, layout=mma)
    for p in gl.static_range(STAGES - 1):
        if p < nk:
            sp = (g0 + p) % STAGES
            fill_split(w_desc, alo_desc, ahi_desc, bars.index(sp), w_bufs.index(sp), lo_bufs.index(sp),
                       hi_bufs.index(sp), off_n, off_m, j0 + p)
    for i0 in range(0, nk, 2):  # two K steps per iteration (distinct operand registers, see above)
        for u in gl.static_range(2):
            i = i0 + u
            st = (g0 + i) % STAGES
            mbarrier.wait(bars.index(st), ((g0 + i) // STAGES) & 1)
            lo, hi = unpack_int8x16(w_bufs.index(st).load(w_reg))
            acc = warpgroup_mma(lo, lo_bufs.index(st).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(hi, hi_bufs.index(st).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=WAIT, deps=(acc, ))  # step i - 1 is done: its stage is free
            j = i + STAGES - 1
            if BARRIER:  # every warpgroup is past step i - 1 before its stage is refilled
                gl.thread_barrier()
            if j < nk:
                sj = (g0 + j) % STAGES
                fill_split(w_desc, alo_desc, ahi_desc, bars.index(sj), w_bufs.index(sj), lo_bufs.index(sj),
                           hi_bufs.index(sj), off_n, off_m, j0 + j)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))


@gluon.jit
def rs_mainloop(w_desc, alo_desc, ahi_desc, off_n, off_m, K, mma: gl.constexpr, STAGES: gl.constexpr,
                WAIT: gl.constexpr, BARRIER: gl.constexpr):
    """`rs_steps` over all of K with a ring of its own."""
    BKH: gl.constexpr = w_desc.block_type.shape[1]  # BK / 2: packed bytes per row and K step
    ring = rs_ring(w_desc, alo_desc, ahi_desc, STAGES)
    acc = rs_steps(w_desc, alo_desc, ahi_desc, ring, off_n, off_m, 0, K // (2 * BKH), 0, mma, STAGES, WAIT, BARRIER)
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(ring[3].index(q))
    return acc


@gluon.jit
def _store_scaled(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, out_ptr, M, N, mma: gl.constexpr):
    """y'^T tile (BN, BMT) bf16 into out (N, M): the int32 sums x token scales x row scales / 16."""
    BN: gl.constexpr = acc.shape[0]
    BMT: gl.constexpr = acc.shape[1]
    rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    toks = off_m + gl.arange(0, BMT, layout=gl.SliceLayout(0, mma))
    ts = gl.load(tok_scale_ptr + toks, mask=toks < M, other=0.0)
    y = (acc.to(gl.float32) * 0.0625) * ts[None, :]  # exact: the codes were 16 * q
    y = y * gl.load(w_scale_ptr + rows)[:, None]
    mask = (rows[:, None] < N) & (toks[None, :] < M)
    gl.store(out_ptr + rows[:, None] * M + toks[None, :], y.to(gl.bfloat16), mask=mask)


@gluon.jit
def _fence_gpu(t):
    """fence.acq_rel.gpu, once by every thread (t: int32, one element per thread); returns t, so
    that later reads can depend on it."""
    return gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [t], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _rs_streamk_kernel(w_desc, alo_desc, ahi_desc, tok_scale_ptr, w_scale_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K,
                       P, STAGES: gl.constexpr, GROUP: gl.constexpr, WAIT: gl.constexpr, BARRIER: gl.constexpr,
                       num_warps: gl.constexpr):
    """`_rs_gemm_kernel`'s y'^T with the work split evenly over P programs (stream-K): the T tiles'
    K loops, in units of two K steps (S per tile, U = T * S in all), are cut into P contiguous
    ranges [p U / P, (p + 1) U / P). A program covers at most two tiles (U / P < S). A tile
    covered whole is stored at once; a partly covered one leaves its int32 partial sums in the
    workspace ws (2 P, BN, BMT) slot 2 p (the program's first tile) or 2 p + 1 (its second), and
    the program that brings the tile's unit count cnt[t] to S adds the others' partials (exact
    integer sums: the same result whatever the order), stores, and resets cnt[t]."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 128 if BMT % 128 == 0 else 64, 32])
    S = K // (4 * BKH)  # units (two K steps each) per tile
    T = gl.cdiv(N, BN) * gl.cdiv(M, BMT)
    U = T * S
    pid = gl.program_id(0)
    u0 = (pid * U) // P
    u1 = ((pid + 1) * U) // P
    first_tile = u0 // S
    ring = rs_ring(w_desc, alo_desc, ahi_desc, STAGES)
    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, BMT, layout=gl.SliceLayout(0, mma))
    tile_off = rows[:, None] * BMT + cols[None, :]
    one: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    sync = gl.zeros([32 * num_warps], gl.int32, layout=one)
    g = 0
    u = u0
    for _seg in range(2):
        if u < u1:
            t = u // S
            s0 = u - t * S
            s1 = gl.minimum(u1 - t * S, S)
            off_m, off_n = grouped_tile(t, M, N, BMT, BN, GROUP)
            gl.thread_barrier()  # every warp is done with the ring's previous use
            acc = rs_steps(w_desc, alo_desc, ahi_desc, ring, off_n, off_m, 2 * s0, 2 * (s1 - s0), g, mma, STAGES,
                           WAIT, BARRIER)
            g += 2 * (s1 - s0)
            if s1 - s0 == S:
                _store_scaled(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, out_ptr, M, N, mma)
            else:
                slot = 2 * pid + (t != first_tile).to(gl.int32)
                gl.store(ws_ptr + slot * (BN * BMT) + tile_off, acc)
                sync = _fence_gpu(sync)  # this thread's partial is visible GPU-wide before the count moves
                gl.thread_barrier()
                before = gl.atomic_add(cnt_ptr + t, s1 - s0, sem="relaxed")
                if before + (s1 - s0) == S:  # the tile's last contributor: add the others' partials
                    z = gl.max(_fence_gpu(sync), axis=0)  # 0: the reads below come after the fence
                    q_first = ((t * S + 1) * P - 1) // U  # the programs whose ranges meet the tile
                    q_last = (((t + 1) * S) * P - 1) // U
                    for q in range(q_first, q_last + 1):
                        if q != pid:
                            qslot = 2 * q + (t != ((q * U) // P) // S).to(gl.int32)
                            acc += gl.load(ws_ptr + z + qslot * (BN * BMT) + tile_off, cache_modifier=".cg")
                    _store_scaled(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, out_ptr, M, N, mma)
                    gl.atomic_xchg(cnt_ptr + t, 0, sem="relaxed")  # ready for the next call
            u = (t + 1) * S
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(ring[3].index(q))


@gluon.jit
def _rs_gemm_kernel(w_desc, alo_desc, ahi_desc, tok_scale_ptr, w_scale_ptr, out_ptr, M, N, K,
                    STAGES: gl.constexpr, GROUP: gl.constexpr, WAIT: gl.constexpr, BARRIER: gl.constexpr,
                    num_warps: gl.constexpr):
    """y'^T (N, M) bf16, token-minor = scaled sums of one (BN, BMT) tile; no shared memory after
    the main loop (C7515)."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    off_m, off_n = grouped_tile(gl.program_id(0), M, N, BMT, BN, GROUP)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 128 if BMT % 128 == 0 else 64, 32])
    acc = rs_mainloop(w_desc, alo_desc, ahi_desc, off_n, off_m, K, mma, STAGES, WAIT, BARRIER)
    _store_scaled(acc, off_n, off_m, tok_scale_ptr, w_scale_ptr, out_ptr, M, N, mma)


def descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor of an int8 tensor read in (rows, cols) blocks."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, gl.NVMMASharedLayout.get_default_for(block, gl.int8))


def rs_gemm(codes: torch.Tensor, tok_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
            cfg: dict) -> torch.Tensor:
    """y'^T (N, M) bfloat16 = ((codes @ W_q^T) x tok_scale x w_scale)^T for int8 codes (M, K) in the
    `_deint` order of K tiles cfg["BK"] (16 * q), tok_scale float32 (M,), packed int4 qweight uint8
    (N, K/2), w_scale float32 (N,). cfg: BN, BMT, BK, num_warps, RS_STAGES, GROUP, STREAMK (the
    K loops spread over one program per SM where there are fewer tiles than SMs: `streamk_programs`)."""
    m, k = codes.shape
    n = qweight.shape[0]
    bn, bmt, bk = cfg["BN"], cfg["BMT"], cfg["BK"]
    if n % bn or k % (2 * bk):
        raise ValueError(f"register-operand GEMM tiles {bn}/{bk} do not fit N={n}, K={k} (two K steps per iteration)")
    out = torch.empty((n, m), device=codes.device, dtype=torch.bfloat16)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bmt)
    descs = (descriptor(qweight.view(torch.int8), [bn, bk // 2]), descriptor(codes, [bmt, bk // 2]),
             descriptor(codes, [bmt, bk // 2]))
    consts = dict(STAGES=cfg.get("RS_STAGES", 4), GROUP=cfg.get("GROUP", 8), WAIT=2, BARRIER=True,
                  num_warps=cfg["num_warps"])
    progs = streamk_programs(tiles, k // (2 * bk), _sm_count(codes.device)) if cfg.get("STREAMK") else None
    if progs is None:
        _rs_gemm_kernel[(tiles,)](*descs, tok_scale, w_scale, out, m, n, k, **consts)
        return out
    from .w4a8 import _counters  # zeroed per-tile counters, reset by each tile's last program
    ws = torch.empty((2 * progs, bn, bmt), device=codes.device, dtype=torch.int32)
    _rs_streamk_kernel[(progs,)](*descs, tok_scale, w_scale, out, ws, _counters(codes.device, tiles), m, n, k, progs,
                                 **consts)
    return out


def streamk_programs(tiles: int, units: int, sms: int) -> int | None:
    """Programs of the stream-K launch (`_rs_streamk_kernel`) for `tiles` output tiles of `units`
    two-step K units each on `sms` SMs: one per SM when the tiles leave SMs idle (tiles < sms) and
    each program's share is under one tile (so that it meets at most two tiles); else None (one
    program per tile)."""
    if tiles >= sms or tiles * units < sms:
        return None
    return sms


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
