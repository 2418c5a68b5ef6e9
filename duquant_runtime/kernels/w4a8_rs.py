"""The register-operand W4A8 GEMM for Hopper (Gluon), with the R_out restore in its epilogue.

    y' = (codes @ W_q^T) x token scales x row scales, rounded to bf16
    y  = y' BD(R_out)^T + b    (one more wgmma on the tile's block-diagonal R_out slice, bf16,
                                float32 sums; RS_RESTORE, the default where it runs)

Why not the Triton GEMM: Triton 3.6-3.9 wait for every int8 wgmma of `w4a8._gemm_kernel`; this
kernel keeps two in flight. The restore in the epilogue needs shared memory after the main loop
(y' and R_out as wgmma operands), and ptxas serializes every wgmma of a kernel (warning C7515,
"non wgmma instructions defining accumulator registers") when the main loop might run zero times:
the zeroed sums then reach the loop's exit through plain moves. So `rs_mainloop` runs its first
two K steps before the loop (K has at least two steps). Checked offline for every tile and
layout used (benchmarks/compile_w4a8.py `rs_report`, tests/test_kernels.py). Without RS_RESTORE
the epilogue stores y' (N, M) in bf16 and `w4a8._restore_kernel` restores it in a second launch;
both give the numerics of `w4a8`'s bf16 restore (`RESTORE` 1) up to the order of float32 sums.

The weight tile is unpacked in registers (16 * q as int8, exact; the 1/16 is folded into the
scales) as the wgmma A operand; TMA brings the packed weight and both halves of the codes' tile
(`_deint` order: even k, then odd k) through a ring of STAGES stages. Two K steps per loop
iteration: PTX reuses a loop body's registers every iteration and wgmma reads its register
operand asynchronously, so with one step per iteration the next unpack would overwrite the
operand of the wgmma still in flight. Token tiles of 256 run as two N = 128 wgmma per weight
operand (Triton 3.6 has no int8 N = 256). With PDL the kernel is launched while the codes'
producer runs, requests its first weight tiles, and waits before it requests the codes.
Split-K (SPLIT > 1, for few tokens): program (tile, j) sums the j-th K / SPLIT columns and stores
its int32 sums; the tile's last program (a per-tile counter) adds them and runs the epilogue.
Integer sums are exact in any order, so the output does not depend on SPLIT, bit for bit.
A launch of the last tokens (`w4a8.row_launches`) may run beside the first launch's last wave
(RS_TAIL_OVERLAP: the first launch's RELEASE, the tail's END_WAIT; see `_rs_gemm_kernel`).

Used by `w4a8.w4_gemm` where `pick_config` asks for it (GEMM="rs") on sm_90 with Gluon; every
other case, and the CPU interpreter, runs the Triton GEMM. The GPU tests compare it with the
restore launch, the Triton GEMM and the float32 reference (tests/test_w4a8_rs.py)."""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .w4a8_act import _griddepcontrol


@gluon.constexpr_function
def _instr_n(bmt):
    """The wgmma N of a BMT-token tile: 128 (Triton 3.6 has no int8 N = 256), 64 or 32."""
    return 128 if bmt % 128 == 0 else (64 if bmt % 64 == 0 else 32)


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
def fill_weight(w_desc, alo_desc, ahi_desc, bar, w_buf, off_n, j):
    """The first half of `fill_split`: the stage's expected bytes (weight and codes) and the TMA of
    its packed weight tile (BN, BK/2) of K step j (counted from K = 0), which does not depend on the
    previous launch."""
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    mbarrier.expect(bar, w_desc.block_type.nbytes + alo_desc.block_type.nbytes + ahi_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(w_desc, [off_n, j * BKH], bar, w_buf)


@gluon.jit
def fill_codes(alo_desc, ahi_desc, bar, lo_buf, hi_buf, off_m, j):
    """The second half of `fill_split`: the TMA of both halves of K step j's codes tile (even k,
    odd k: `_deint` order)."""
    BKH: gl.constexpr = alo_desc.block_type.shape[1]
    tma.async_copy_global_to_shared(alo_desc, [off_m, 2 * j * BKH], bar, lo_buf)
    tma.async_copy_global_to_shared(ahi_desc, [off_m, 2 * j * BKH + BKH], bar, hi_buf)


@gluon.jit
def fill_split(w_desc, alo_desc, ahi_desc, bar, w_buf, lo_buf, hi_buf, off_n, off_m, j):
    """TMA of K step j into one ring stage, completing on bar: the packed weight tile (BN, BK/2)
    and both halves of the codes' tile (even k, odd k: `_deint` order)."""
    fill_weight(w_desc, alo_desc, ahi_desc, bar, w_buf, off_n, j)
    fill_codes(alo_desc, ahi_desc, bar, lo_buf, hi_buf, off_m, j)


@gluon.jit
def rs_step(w_desc, alo_desc, ahi_desc, bars, w_bufs, lo_bufs, hi_bufs, acc, i, nk, k0, off_n, off_m,
            w_reg: gl.constexpr, STAGES: gl.constexpr, WAIT: gl.constexpr, BARRIER: gl.constexpr):
    """K step i (of nk, from step k0 of K) of `rs_mainloop`: wait for its stage, unpack the weight,
    two async wgmma (even and odd k), keep WAIT groups in flight, refill the stage step i - 1 used
    with step i + STAGES - 1."""
    st = i % STAGES
    mbarrier.wait(bars.index(st), (i // STAGES) & 1)
    lo, hi = unpack_int8x16(w_bufs.index(st).load(w_reg))
    acc = warpgroup_mma(lo, lo_bufs.index(st).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(hi, hi_bufs.index(st).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=WAIT, deps=(acc, ))  # step i - 1 is done: its stage is free
    j = i + STAGES - 1
    if BARRIER:  # every warpgroup is past step i - 1 before its stage is refilled
        gl.thread_barrier()
    if j < nk:
        sj = j % STAGES
        fill_split(w_desc, alo_desc, ahi_desc, bars.index(sj), w_bufs.index(sj), lo_bufs.index(sj),
                   hi_bufs.index(sj), off_n, off_m, k0 + j)
    return acc


@gluon.jit
def rs_prologue(w_desc, alo_desc, ahi_desc, off_n, off_m, mma: gl.constexpr, STAGES: gl.constexpr,
                PDL: gl.constexpr = False, k0=0, RELEASE: gl.constexpr = False):
    """The ring of `rs_mainloop` (STAGES stages of the packed weight tile and both halves of the
    codes' tile, one mbarrier each) with its first STAGES - 1 K steps (from K step k0) requested:
    with PDL the weight tiles before the wait for the previous launch (which writes the codes), the
    codes after it. RELEASE: the next launch may start once the wait has returned. Returns
    (w_bufs, lo_bufs, hi_bufs, bars) for `rs_loop`."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]  # BK / 2: packed bytes per row and K step
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BKH], w_desc.layout)
    lo_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, BKH], alo_desc.layout)
    hi_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, BKH], ahi_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(bars.index(q), count=1)
    for p in gl.static_range(STAGES - 1):
        fill_weight(w_desc, alo_desc, ahi_desc, bars.index(p), w_bufs.index(p), off_n, k0 + p)
    if PDL:
        _griddepcontrol(gl.arange(0, BN, layout=gl.SliceLayout(1, mma)), "wait")
    if RELEASE:  # the next launch may start: the codes' producer is done (see `_rs_gemm_kernel`)
        _griddepcontrol(gl.arange(0, BN, layout=gl.SliceLayout(1, mma)), "launch_dependents")
    for p in gl.static_range(STAGES - 1):
        fill_codes(alo_desc, ahi_desc, bars.index(p), lo_bufs.index(p), hi_bufs.index(p), off_m, k0 + p)
    return w_bufs, lo_bufs, hi_bufs, bars


@gluon.jit
def rs_loop(w_desc, alo_desc, ahi_desc, w_bufs, lo_bufs, hi_bufs, bars, off_n, off_m, K, mma: gl.constexpr,
            STAGES: gl.constexpr, WAIT: gl.constexpr, BARRIER: gl.constexpr, k0=0):
    """The K steps of `rs_mainloop` on the ring `rs_prologue` filled; returns the int32 sums."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    w_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    acc = gl.zeros((BN, BMT), dtype=gl.int32, layout=mma)
    nk = K // (2 * BKH)
    for u in gl.static_range(2):  # peeled (see `rs_mainloop`)
        acc = rs_step(w_desc, alo_desc, ahi_desc, bars, w_bufs, lo_bufs, hi_bufs, acc, u, nk, k0, off_n, off_m,
                      w_reg, STAGES, WAIT, BARRIER)
    for i0 in range(2, nk, 2):  # two K steps per iteration (distinct operand registers, see above)
        for u in gl.static_range(2):
            acc = rs_step(w_desc, alo_desc, ahi_desc, bars, w_bufs, lo_bufs, hi_bufs, acc, i0 + u, nk, k0, off_n,
                          off_m, w_reg, STAGES, WAIT, BARRIER)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(q))
    return acc


@gluon.jit
def rs_mainloop(w_desc, alo_desc, ahi_desc, off_n, off_m, K, mma: gl.constexpr, STAGES: gl.constexpr,
                WAIT: gl.constexpr, BARRIER: gl.constexpr, PDL: gl.constexpr = False, k0=0):
    """int32 sums (BN, BMT) in layout mma of 16 * W_q tile @ codes^T over K columns from K step k0
    (split-K: the program's chunk; at least two K steps): the weight unpacked in registers as the
    wgmma A operand, WAIT wgmma groups kept in flight (`rs_prologue`, then `rs_loop`). The first two
    steps run before the loop: with a loop that might run zero times, the zeroed sums reach its
    exit through plain moves, and ptxas then serializes every wgmma of a kernel whose epilogue
    touches shared memory (C7515, "non wgmma instructions defining accumulator registers"; checked
    offline, benchmarks/compile_w4a8.py `rs_report`). PDL: the first stages' weight tiles are
    requested before the wait for the previous launch (which writes the codes), their codes after
    it."""
    w_bufs, lo_bufs, hi_bufs, bars = rs_prologue(w_desc, alo_desc, ahi_desc, off_n, off_m, mma, STAGES, PDL, k0)
    return rs_loop(w_desc, alo_desc, ahi_desc, w_bufs, lo_bufs, hi_bufs, bars, off_n, off_m, K, mma, STAGES, WAIT,
                   BARRIER, k0)


@gluon.jit
def rout_smem(rout_ptr, off_n, N, BN: gl.constexpr, BO: gl.constexpr, num_warps: gl.constexpr):
    """The tile's block-diagonal slice of R_out, BD (BN, BN) bf16 in shared memory (R_out's 16-bit
    values rounded to bf16, zeros across blocks; the slice `w4a8._rout_tile` loads for the Triton
    GEMM): the restore wgmma's A operand."""
    rl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    i = gl.arange(0, BN, layout=gl.SliceLayout(1, rl))
    c = gl.arange(0, BN, layout=gl.SliceLayout(0, rl))
    gi = off_n + i
    same = (i[:, None] // BO) == (c[None, :] // BO)
    t = gl.load(rout_ptr + (gi[:, None] // BO) * (BO * BO) + (i[:, None] % BO) * BO + (c[None, :] % BO),
                mask=same & (gi[:, None] < N), other=0.0)
    r_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    r_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, BN], r_layout)
    r_smem.store(t.to(gl.bfloat16))
    return r_smem


@gluon.jit
def _fence_gpu(t):
    """fence.acq_rel.gpu by every thread (t: any tensor, a dummy operand that gives it a layout):
    this thread's earlier global stores are visible GPU-wide before its later memory operations
    (release side), or the other programs' stores before its later loads (acquire side)."""
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [t], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def rs_epilogue(acc, off_n, off_m, r_smem, tok_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, stride_om,
                stride_on, M_OUT, mma: gl.constexpr, RESTORE: gl.constexpr, HAS_ROUT: gl.constexpr, HAS_BIAS: gl.constexpr,
                TOKEN_MINOR: gl.constexpr, num_warps: gl.constexpr):
    """The tile's int32 sums acc (BN, BMT) (16 * W_q @ codes^T over all of K) to the output: see
    `_rs_gemm_kernel` (RESTORE, TOKEN_MINOR)."""
    BN: gl.constexpr = acc.shape[0]
    BMT: gl.constexpr = acc.shape[1]
    rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    toks = off_m + gl.arange(0, BMT, layout=gl.SliceLayout(0, mma))
    ts = gl.load(tok_scale_ptr + toks, mask=toks < M, other=0.0)
    y = (acc.to(gl.float32) * 0.0625) * ts[None, :]  # exact: the codes were 16 * q
    y = y * gl.load(w_scale_ptr + rows)[:, None]
    if not RESTORE:
        mask = (rows[:, None] < N) & (toks[None, :] < M)
        gl.store(out_ptr + rows[:, None] * M + toks[None, :], y.to(gl.bfloat16), mask=mask)
    else:
        if HAS_ROUT:
            mma16: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, _instr_n(BMT), 16])
            y_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(128, 2 * BMT), element_bitwidth=16,
                                                          rank=2)
            y_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, BMT], y_layout)
            y_smem.store(y.to(gl.bfloat16))
            fence_async_shared()
            z = warpgroup_mma(r_smem, y_smem, gl.zeros((BN, BMT), dtype=gl.float32, layout=mma16), use_acc=False)
        else:
            z = y.to(gl.bfloat16).to(gl.float32)
        if TOKEN_MINOR:  # consecutive tokens are consecutive in memory: the accumulator layout stores them
            ol: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [num_warps, 1], [1, 0])
        else:  # row-major out: channels consecutive
            ol: gl.constexpr = gl.BlockedLayout([4, 1], [16, 2], [1, num_warps], [0, 1])
        z = gl.convert_layout(z, ol)
        ch = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, ol))
        tk = off_m + gl.arange(0, BMT, layout=gl.SliceLayout(0, ol))
        if HAS_BIAS:
            z = z + gl.load(bias_ptr + ch).to(gl.float32)[:, None]
        mask = (ch[:, None] < N) & (tk[None, :] < M_OUT)  # M_OUT >= M: tokens past M (scale 0) into the padding
        gl.store(out_ptr + tk[None, :] * stride_om + ch[:, None] * stride_on, z.to(out_ptr.dtype.element_ty),
                 mask=mask)


@gluon.jit
def _rs_gemm_kernel(w_desc, alo_desc, ahi_desc, tok_scale_ptr, w_scale_ptr, rout_ptr, bias_ptr, out_ptr, M, N, K,
                    stride_om, stride_on, M_OUT, ws_ptr, cnt_ptr, STAGES: gl.constexpr, GROUP: gl.constexpr,
                    WAIT: gl.constexpr, BARRIER: gl.constexpr, TRIGGER: gl.constexpr, RESTORE: gl.constexpr,
                    HAS_ROUT: gl.constexpr, HAS_BIAS: gl.constexpr, BO: gl.constexpr, TOKEN_MINOR: gl.constexpr,
                    PDL: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr, RELEASE: gl.constexpr = False,
                    END_WAIT: gl.constexpr = False):
    """One (BN, BMT) output tile (program_id(0)), one K chunk of SPLIT (program_id(1)). RESTORE False:
    y'^T (N, M) bf16, token-minor = the scaled sums (the restore is the next launch). RESTORE True:
    out (M, N) with strides (stride_om, stride_on) = y' BD(R_out)^T + bias, y' rounded to bf16 and
    multiplied by the tile's bf16 block-diagonal R_out slice in one more wgmma (float32 sums), as
    `w4a8._restore_kernel` does; TOKEN_MINOR: stride_om is 1. TRIGGER: the next launch (PDL, it
    waits for this grid's results) may start at once, on the SMs this grid leaves free. PDL:
    launched while the previous launch (the codes' producer) runs; the weight-side loads start
    before waiting for it. RELEASE (a launch of the last tokens follows, `w4a8.row_launches`): it may
    start once every program of this one has waited for the codes' producer, on the SMs the last
    wave of tiles leaves free. END_WAIT (that launch of the last tokens, launched with PDL, PDL
    False): it reads the codes at once (their producer finished before the previous launch let it
    start) and writes rows the previous launch does not, and waits for the previous launch only
    before it exits, so that the launch after it still finds both launches' output. SPLIT > 1
    (split-K): each program stores its int32 sums to ws_ptr (SPLIT, M, N); the tile's last program
    (int32 counter cnt_ptr[tile], which it resets) adds them, exact in any order (the same sums as
    SPLIT 1), and runs the epilogue."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    pid = gl.program_id(0)
    off_m, off_n = grouped_tile(pid, M, N, BMT, BN, GROUP)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, _instr_n(BMT), 32])
    if TRIGGER:
        _griddepcontrol(gl.arange(0, BN, layout=gl.SliceLayout(1, mma)), "launch_dependents")
    k_chunk = K // SPLIT
    k0 = gl.program_id(1) * (k_chunk // (2 * BKH))
    w_bufs, lo_bufs, hi_bufs, bars = rs_prologue(w_desc, alo_desc, ahi_desc, off_n, off_m, mma, STAGES, PDL, k0,
                                                 RELEASE)
    r_smem = None
    if RESTORE and HAS_ROUT:  # loaded while the first K steps' copies are in flight
        r_smem = rout_smem(rout_ptr, off_n, N, BN, BO, num_warps)
    acc = rs_loop(w_desc, alo_desc, ahi_desc, w_bufs, lo_bufs, hi_bufs, bars, off_n, off_m, k_chunk, mma, STAGES,
                  WAIT, BARRIER, k0)
    if SPLIT == 1:
        rs_epilogue(acc, off_n, off_m, r_smem, tok_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, stride_om,
                    stride_on, M_OUT, mma, RESTORE, HAS_ROUT, HAS_BIAS, TOKEN_MINOR, num_warps)
    else:
        rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        toks = off_m + gl.arange(0, BMT, layout=gl.SliceLayout(0, mma))
        mask = (rows[:, None] < N) & (toks[None, :] < M)
        wsp = ws_ptr + toks[None, :] * N + rows[:, None]
        gl.store(wsp + gl.program_id(1) * (M * N), acc, mask=mask)
        _fence_gpu(rows)  # release: this thread's partial sums before the counter moves
        gl.thread_barrier()
        done = gl.atomic_add(cnt_ptr + pid, 1, sem="relaxed")
        if done == SPLIT - 1:
            _fence_gpu(rows)  # acquire: the other programs' partial sums, after their fences
            tot = gl.zeros((BN, BMT), dtype=gl.int32, layout=mma)
            for s in gl.static_range(SPLIT):  # int32: exact in any order
                tot += gl.load(wsp + s * (M * N), mask=mask, other=0, cache_modifier=".cg")
            rs_epilogue(tot, off_n, off_m, r_smem, tok_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, stride_om,
                        stride_on, M_OUT, mma, RESTORE, HAS_ROUT, HAS_BIAS, TOKEN_MINOR, num_warps)
            gl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")  # ready for the next call (kernel boundary orders it)
    if END_WAIT:
        _griddepcontrol(gl.arange(0, BN, layout=gl.SliceLayout(1, mma)), "wait")


def descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor of an int8 tensor read in (rows, cols) blocks."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, gl.NVMMASharedLayout.get_default_for(block, gl.int8))


def rs_gemm(codes: torch.Tensor, tok_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
            cfg: dict, r_out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
            out: torch.Tensor | None = None, pdl: bool = False, release: bool = False,
            overlap: bool = False, store_m: int | None = None) -> torch.Tensor:
    """For int8 codes (M, K) in the `_deint` order of K tiles cfg["BK"] (16 * q), tok_scale float32
    (M,), packed int4 qweight uint8 (N, K/2), w_scale float32 (N,):
    - out None: y'^T (N, M) bfloat16 = ((codes @ W_q^T) x tok_scale x w_scale)^T, for the restore
      launch (`w4a8.restore`);
    - out (M, N), row-major or token-minor (strides (1, s), s >= M): out = y' BD(R_out)^T + bias in
      this launch (r_out (N/Bo, Bo, Bo) 16-bit or None, bias (N,) or None); returns out. store_m (>= M,
      token-minor out only): the tokens stored, those past M (zero sums) into the rows' padding
      (`w4a8._store_tokens`).
    cfg: BN, BMT, BK, num_warps, RS_STAGES, GROUP, RS_TRIGGER (the next launch, if launched with
    PDL, may start while this one runs), SPLIT (split-K ways, default 1: each program sums K / SPLIT,
    the tile's last one adds the int32 partial sums, so the values do not depend on SPLIT).
    pdl: launched with programmatic dependent launch (sm_90), waiting for the previous launch only
    before it reads the codes. release (with pdl): the next launch may start once every program has
    waited for the codes' producer; only for a next launch made with overlap. overlap: launched
    with PDL after a launch made with release, on other rows of the same codes and out: reads the
    codes at once, waits for the previous launch before it exits."""
    from .w4a8 import _counters, rs_k_fits
    m, k = codes.shape
    n = qweight.shape[0]
    bn, bmt, bk, split = cfg["BN"], cfg["BMT"], cfg["BK"], cfg.get("SPLIT", 1)
    bo = r_out.shape[-1] if r_out is not None else bn
    if n % bn or not rs_k_fits(k, bk, split) or bn % bo:
        raise ValueError(f"register-operand GEMM tiles {bn}/{bk} (split-K {split}) do not fit N={n}, K={k}, output "
                         f"block {bo} (two K steps per iteration and chunk)")
    restore = out is not None
    if restore and not (out.stride(1) == 1 or out.stride(0) == 1):
        raise ValueError(f"register-operand GEMM: out strides {out.stride()} are neither row-major nor token-minor")
    y = out if restore else torch.empty((n, m), device=codes.device, dtype=torch.bfloat16)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bmt)
    stages = min(cfg.get("RS_STAGES", 4), k // (bk * split) + 1)  # the ring never runs ahead of the chunk
    ws = torch.empty((split, m, n), device=codes.device, dtype=torch.int32) if split > 1 else w_scale
    cnt = _counters(codes.device, tiles) if split > 1 else w_scale
    _rs_gemm_kernel[(tiles, split)](
        descriptor(qweight.view(torch.int8), [bn, bk // 2]), descriptor(codes, [bmt, bk // 2]),
        descriptor(codes, [bmt, bk // 2]), tok_scale, w_scale, r_out if r_out is not None else w_scale,
        bias if bias is not None else w_scale, y, m, n, k, y.stride(0), y.stride(1),
        store_m if store_m is not None and restore else m, ws, cnt,
        STAGES=stages, GROUP=cfg.get("GROUP", 8), WAIT=2, BARRIER=True,
        TRIGGER=cfg.get("RS_TRIGGER", False), RESTORE=restore, HAS_ROUT=r_out is not None,
        HAS_BIAS=bias is not None, BO=bo, TOKEN_MINOR=restore and out.stride(0) == 1 and m > 1,
        PDL=pdl and not overlap, SPLIT=split, RELEASE=release and pdl, END_WAIT=overlap, num_warps=cfg["num_warps"],
        **({"launch_pdl": True} if pdl or overlap else {}))
    return y
