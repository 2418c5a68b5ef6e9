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

from .w4a8_act import _griddepcontrol


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
def rs_mainloop(w_desc, alo_desc, ahi_desc, off_n, off_m, K, mma: gl.constexpr, STAGES: gl.constexpr,
                WAIT: gl.constexpr, BARRIER: gl.constexpr):
    """int32 sums (BN, BMT) in layout mma of 16 * W_q tile @ codes^T over all of K: the weight
    unpacked in registers as the wgmma A operand, WAIT wgmma groups kept in flight."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKH: gl.constexpr = w_desc.block_type.shape[1]  # BK / 2: packed bytes per row and K step
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BKH], w_desc.layout)
    lo_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, BKH], alo_desc.layout)
    hi_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BMT, BKH], ahi_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(bars.index(q), count=1)
    w_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    acc = gl.zeros((BN, BMT), dtype=gl.int32, layout=mma)
    nk = K // (2 * BKH)
    for p in gl.static_range(STAGES - 1):
        fill_split(w_desc, alo_desc, ahi_desc, bars.index(p), w_bufs.index(p), lo_bufs.index(p), hi_bufs.index(p),
                   off_n, off_m, p)
    for i0 in range(0, nk, 2):  # two K steps per iteration (distinct operand registers, see above)
        for u in gl.static_range(2):
            i = i0 + u
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
                           hi_bufs.index(sj), off_n, off_m, j)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(q))
    return acc


@gluon.jit
def _rs_gemm_kernel(w_desc, alo_desc, ahi_desc, tok_scale_ptr, w_scale_ptr, out_ptr, M, N, K,
                    STAGES: gl.constexpr, GROUP: gl.constexpr, WAIT: gl.constexpr, BARRIER: gl.constexpr,
                    TRIGGER: gl.constexpr, num_warps: gl.constexpr):
    """y'^T (N, M) bf16, token-minor = scaled sums of one (BN, BMT) tile; no shared memory after
    the main loop (C7515). TRIGGER: the restore launch (PDL, it waits for this grid's results) may
    start at once, on the SMs this grid leaves free."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BMT: gl.constexpr = alo_desc.block_type.shape[0]
    off_m, off_n = grouped_tile(gl.program_id(0), M, N, BMT, BN, GROUP)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 128 if BMT % 128 == 0 else 64, 32])
    if TRIGGER:
        _griddepcontrol(gl.arange(0, BN, layout=gl.SliceLayout(1, mma)), "launch_dependents")
    acc = rs_mainloop(w_desc, alo_desc, ahi_desc, off_n, off_m, K, mma, STAGES, WAIT, BARRIER)
    rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    toks = off_m + gl.arange(0, BMT, layout=gl.SliceLayout(0, mma))
    ts = gl.load(tok_scale_ptr + toks, mask=toks < M, other=0.0)
    y = (acc.to(gl.float32) * 0.0625) * ts[None, :]  # exact: the codes were 16 * q
    y = y * gl.load(w_scale_ptr + rows)[:, None]
    mask = (rows[:, None] < N) & (toks[None, :] < M)
    gl.store(out_ptr + rows[:, None] * M + toks[None, :], y.to(gl.bfloat16), mask=mask)


def descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor of an int8 tensor read in (rows, cols) blocks."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, gl.NVMMASharedLayout.get_default_for(block, gl.int8))


def rs_gemm(codes: torch.Tensor, tok_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
            cfg: dict) -> torch.Tensor:
    """y'^T (N, M) bfloat16 = ((codes @ W_q^T) x tok_scale x w_scale)^T for int8 codes (M, K) in the
    `_deint` order of K tiles cfg["BK"] (16 * q), tok_scale float32 (M,), packed int4 qweight uint8
    (N, K/2), w_scale float32 (N,). cfg: BN, BMT, BK, num_warps, RS_STAGES, GROUP, RS_TRIGGER (the
    next launch, if launched with PDL, may start while this one runs)."""
    m, k = codes.shape
    n = qweight.shape[0]
    bn, bmt, bk = cfg["BN"], cfg["BMT"], cfg["BK"]
    if n % bn or k % (2 * bk):
        raise ValueError(f"register-operand GEMM tiles {bn}/{bk} do not fit N={n}, K={k} (two K steps per iteration)")
    out = torch.empty((n, m), device=codes.device, dtype=torch.bfloat16)
    _rs_gemm_kernel[(triton.cdiv(n, bn) * triton.cdiv(m, bmt),)](
        descriptor(qweight.view(torch.int8), [bn, bk // 2]), descriptor(codes, [bmt, bk // 2]),
        descriptor(codes, [bmt, bk // 2]), tok_scale, w_scale, out, m, n, k, STAGES=cfg.get("RS_STAGES", 4),
        GROUP=cfg.get("GROUP", 8), WAIT=2, BARRIER=True, TRIGGER=cfg.get("RS_TRIGGER", False),
        num_warps=cfg["num_warps"])
    return out

