"""Where do the Gluon activation launches spend their time? Ablations on pi0.5 shapes (development aid).

    PYTHONPATH=. python3 benchmarks/probe_act.py [--m 800] [--k 16384] [--repeats 7] [--buffers 1]
                                                 [--bm 128,64] [--out FILE]

Each row is timed as CUDA-graph replays of --launches launches (median of --repeats; --buffers N
rotates them over N copies of the input, 3 exceed the L2 cache). Copies of the kernels with parts
switched off give wrong results on purpose; only their time is of interest.
- LLM down_proj's codes (`w4a8_act`, x^T (K, M) bf16 token-minor as the gate/up GEMM leaves it):
  the production passes 1 and 2 with the picked tiles and operand form (ACT_F16); pass 1 (one tile
  per program, --bm tokens)
  without the permutation gather (PERM), R_in's load and split (RLOAD), the two wgmma (MMA; else
  the absmax of the unrotated tile), the per-token atomics (ATOM 1; 2: a plain store per program;
  0: none), or with the tile as one float16 operand times R_in's float16 block copied as it is
  (one wgmma, no split: RLOAD 2, MMA 2); pass 2 (128- and 64-token tiles) without the quotients
  (QUANT 0; 1: rint and clamp, 2: SATCVT), with other code stores (STORE) or with the float16
  operand (float16 1); the loads alone (cp.async through a ring, or plain loads; token tiles per
  program).
- The cluster kernel (`w4a8_cluster`, K = 2048 at M tokens, row-major x): without the copy into
  the x^T scratch (P0), the two cluster barriers (B1, B2), the first rotation and partial maxima
  (PH1), the second rotation with the codes (PH2).
- torch references reading x^T (a reduction; a copy, which also writes it).
Writes JSON: us per launch and the DRAM-equivalent GB/s of reading x^T once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from duquant_runtime.kernels import w4a8_act as A  # noqa: E402
from duquant_runtime.kernels import w4a8_cluster as C  # noqa: E402


@gluon.jit
def _one_tile(perm_ptr, PERM: gl.constexpr, BM: gl.constexpr, B: gl.constexpr, xl: gl.constexpr):
    """(block, first token, one x^T tile buffer, two R_in term buffers, the block's source rows (B,)
    through the permutation or not) of a one-tile-per-program pass."""
    kb = gl.program_id(0)
    x_bufs, r_bufs = A._tile_buffers(1, 2, BM, B)
    cb = gl.arange(0, B, layout=gl.SliceLayout(1, xl))
    if PERM:
        src = gl.load(perm_ptr + kb * B + cb)
    else:
        src = kb * B + cb
    return kb, gl.program_id(1) * BM, x_bufs, r_bufs, src


@gluon.jit
def _pass1_ablation(xt_ptr, ld, M, perm_ptr, r_ptr, tokmax_ptr, part_ptr, BM: gl.constexpr, B: gl.constexpr,
                    PERM: gl.constexpr, RLOAD: gl.constexpr, MMA: gl.constexpr, ATOM: gl.constexpr,
                    num_warps: gl.constexpr):
    xl: gl.constexpr = A.tile_layout(BM, num_warps)
    mma: gl.constexpr = A.rotation_layout(B, num_warps)
    kb, m0, x_bufs, r_bufs, src = _one_tile(perm_ptr, PERM, BM, B, xl)
    if RLOAD == 1:
        r_e, r_o = A._r_halves(r_ptr, kb, B, num_warps)
    elif RLOAD == 2:  # R_in's block as it is (float16), copied: the B operand of one float16 wgmma
        r16 = gl.allocate_shared_memory(gl.float16, [B, B], A.f16_layout())
        A._f16_block(r_ptr, kb, r16, B, num_warps)
    A._issue(x_bufs, 0, xt_ptr, ld, src, m0, M, BM, xl)
    async_copy.commit_group()
    if RLOAD == 1:
        A._store_split(r_e, r_bufs.index(0).slice(0, B // 2, dim=1), r_bufs.index(1).slice(0, B // 2, dim=1))
        A._store_split(r_o, r_bufs.index(0).slice(B // 2, B // 2, dim=1), r_bufs.index(1).slice(B // 2, B // 2, dim=1))
    async_copy.wait_group(0)
    fence_async_shared()
    gl.thread_barrier()
    toks = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    if MMA == 2:  # the tile as a float16 register operand, one wgmma with R_in's float16 block
        a = x_bufs.index(0).permute((1, 0)).load(a_reg).to(gl.float16)
        acc = warpgroup_mma(a, r16, gl.zeros([BM, B], gl.float32, layout=mma), is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mx = gl.max(gl.abs(acc), axis=1)
    elif MMA:  # 1: the tile read by both bf16 dots from shared memory; 3: once, as their register operand
        if MMA == 3:
            a = x_bufs.index(0).permute((1, 0)).load(a_reg)
        else:
            a = x_bufs.index(0).permute((1, 0))
        acc = warpgroup_mma(a, r_bufs.index(0), gl.zeros([BM, B], gl.float32, layout=mma), is_async=True)
        acc = warpgroup_mma(a, r_bufs.index(1), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mx = gl.max(gl.abs(acc), axis=1)
    else:
        v = x_bufs.index(0).load(xl).to(gl.float32)
        mx = gl.convert_layout(gl.max(gl.abs(v), axis=0), gl.SliceLayout(1, mma))
    if ATOM == 1:
        gl.atomic_max(tokmax_ptr + toks, mx, mask=toks < M, sem="relaxed")
    elif ATOM == 2:
        gl.store(part_ptr + kb * M + toks, mx, mask=toks < M)
    else:  # never true: keeps the work alive
        gl.store(part_ptr + toks, mx, mask=mx < -1.0)


@gluon.jit
def _load_probe(xt_ptr, ld, M, perm_ptr, part_ptr, TT: gl.constexpr, BM: gl.constexpr, B: gl.constexpr,
                STAGES: gl.constexpr, LOADER: gl.constexpr, num_warps: gl.constexpr):
    """Only the loads of pass 1: TT token tiles of one permuted block per program. LOADER 0:
    cp.async through a ring of STAGES tiles; 1: plain loads into registers (no shared memory)."""
    kb = gl.program_id(0)
    m0 = gl.program_id(1) * TT * BM
    xl: gl.constexpr = A.tile_layout(BM, num_warps)
    cb = gl.arange(0, B, layout=gl.SliceLayout(1, xl))
    src = gl.load(perm_ptr + kb * B + cb)
    mx = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(0, xl))
    if LOADER == 0:
        x_bufs, r_bufs = A._tile_buffers(STAGES, 1, BM, B)
        for p in gl.static_range(STAGES - 1):
            if p < TT:
                A._issue(x_bufs, p, xt_ptr, ld, src, m0 + p * BM, M, BM, xl)
            async_copy.commit_group()
        for t in range(TT):
            if t > 0:
                gl.thread_barrier()
            j = t + STAGES - 1
            if j < TT:
                A._issue(x_bufs, j % STAGES, xt_ptr, ld, src, m0 + j * BM, M, BM, xl)
            async_copy.commit_group()
            async_copy.wait_group(STAGES - 1)
            gl.thread_barrier()
            v = x_bufs.index(t % STAGES).load(xl).to(gl.float32)
            mx = gl.maximum(mx, gl.max(gl.abs(v), axis=0))
        async_copy.wait_group(0)
    else:
        for t in gl.static_range(TT):
            toks = m0 + t * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, xl))
            v = gl.load(xt_ptr + src[:, None] * ld + toks[None, :], mask=(toks < M)[None, :], other=0.0)
            mx = gl.maximum(mx, gl.max(gl.abs(v.to(gl.float32)), axis=0))
    toks = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, xl))
    gl.store(part_ptr + toks, mx, mask=mx < -1.0)


@triton.constexpr_function
def _columns_first(layout):
    """The same distribution with each thread's column registers first (register order only)."""
    regs = sorted(layout.reg_bases, key=lambda b: b[1] == 0)
    return gl.DistributedLinearLayout(regs, layout.lane_bases, layout.warp_bases, layout.block_bases, layout.shape)


@gluon.jit
def _pass2_ablation(xt_ptr, ld, M, perm_ptr, rs_ptr, tokmax_ptr, codes_ptr, K: gl.constexpr, BM: gl.constexpr,
                    B: gl.constexpr, BKD: gl.constexpr, QUANT: gl.constexpr, STORE: gl.constexpr,
                    num_warps: gl.constexpr, F16: gl.constexpr = 0, r16_ptr=None):
    """Pass 2 (one tile per program, R_in's terms copied from pass 1's cache) with parts switched off:
    QUANT 0 casts the rotated values instead of dividing by the token scale (1: rint and clamp, 2: the
    saturating conversion, SATCVT); STORE 0 stores nothing, 1 stores the codes through a layout
    change (production), 2 straight from the wgmma layout (2-byte stores), 3 as each thread's
    16 columns regrouped into one contiguous run (a register-only reshape; the addresses are not
    those of the production order: timing only). F16 1: the tile as one float16 register operand
    times R_in's float16 block (r16_ptr) copied as it is, one wgmma (timing only)."""
    xl: gl.constexpr = A.tile_layout(BM, num_warps)
    mma: gl.constexpr = A.rotation_layout(B, num_warps)
    kb, m0, x_bufs, r_bufs, src = _one_tile(perm_ptr, True, BM, B, xl)
    tl_: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    ri = gl.arange(0, B, layout=gl.SliceLayout(1, tl_))
    rc = gl.arange(0, B, layout=gl.SliceLayout(0, tl_))
    if F16:
        r16 = gl.allocate_shared_memory(gl.float16, [B, B], A.f16_layout())
        A._f16_block(r16_ptr, kb, r16, B, num_warps)
    else:
        for term in gl.static_range(2):
            async_copy.async_copy_global_to_shared(r_bufs.index(term), rs_ptr + (kb * 2 + term) * B * B
                                                   + ri[:, None] * B + rc[None, :])
    A._issue(x_bufs, 0, xt_ptr, ld, src, m0, M, BM, xl)
    async_copy.commit_group()
    toks = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    row_ok = toks < M
    s = gl.div_rn(gl.load(tokmax_ptr + toks, mask=row_ok, other=0.0),
                  gl.full([BM], 127.0, gl.float32, layout=gl.SliceLayout(1, mma)))
    s = gl.where(s > 0, s, 1.0)
    rcp = A._recip(s)
    async_copy.wait_group(0)
    fence_async_shared()
    gl.thread_barrier()
    if F16:
        a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        a16 = x_bufs.index(0).permute((1, 0)).load(a_reg).to(gl.float16)
        acc = warpgroup_mma(a16, r16, gl.zeros([BM, B], gl.float32, layout=mma), is_async=True)
    else:
        a = x_bufs.index(0).permute((1, 0))
        acc = warpgroup_mma(a, r_bufs.index(0), gl.zeros([BM, B], gl.float32, layout=mma), is_async=True)
        acc = warpgroup_mma(a, r_bufs.index(1), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    if QUANT:
        q = A._codes(A._quotient(acc, s, rcp, True), -128, 127, QUANT == 2)
    else:
        q = acc.to(gl.int8)
    c0 = kb * B
    run = gl.multiple_of(c0 - c0 % BKD + (c0 % BKD) // 2, B // 2)
    if STORE == 1:
        ol: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // B, B // 16], [num_warps, 1], [1, 0])
        ocol = gl.arange(0, B, layout=gl.SliceLayout(0, ol))
        ocol = run + ocol % (B // 2) + (ocol // (B // 2)) * (BKD // 2)
        orow = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, ol))
        gl.store(codes_ptr + orow[:, None] * K + ocol[None, :], gl.convert_layout(q, ol), mask=(orow < M)[:, None])
    elif STORE == 2:
        ocol = gl.arange(0, B, layout=gl.SliceLayout(0, mma))
        ocol = run + ocol % (B // 2) + (ocol // (B // 2)) * (BKD // 2)
        gl.store(codes_ptr + toks[:, None] * K + ocol[None, :], q, mask=row_ok[:, None])
    elif STORE == 3:  # each thread's 16 codes of a row as one contiguous run: (g, c, e) -> (c, g, e)
        q2 = gl.reshape(gl.permute(gl.reshape(q, [BM, 8, 4, 2]), [0, 2, 1, 3]), [BM, B])
        lay: gl.constexpr = _columns_first(q2.type.layout)
        q2 = gl.convert_layout(q2, lay)
        p = gl.arange(0, B, layout=gl.SliceLayout(0, lay))
        ocol = run + p % (B // 2) + (p // (B // 2)) * (BKD // 2)
        orow = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, lay))
        gl.store(codes_ptr + orow[:, None] * K + ocol[None, :], q2, mask=(orow < M)[:, None])
    else:
        gl.store(codes_ptr + toks[:, None] * K + run + 0 * q, q, mask=row_ok[:, None] & (q == 99))


@gluon.jit
def _cluster_ablation(x_ptr, sxm, M, MP, xt_ptr, part_ptr, perm_ptr, r_ptr, codes_ptr, K: gl.constexpr,
                      CL: gl.constexpr, BM: gl.constexpr, B: gl.constexpr, BKD: gl.constexpr, CHK: gl.constexpr,
                      P0: gl.constexpr, B1: gl.constexpr, PH1: gl.constexpr, B2: gl.constexpr, PH2: gl.constexpr,
                      num_warps: gl.constexpr):
    """`w4a8_cluster._cluster_kernel` (row-major x, no PDL) with its phases switched off: P0 the copy
    into the x^T scratch, B1 / B2 the two cluster barriers, PH1 the first rotation and the partial
    maxima, PH2 the second rotation, the codes and their stores."""
    pid = gl.program_id(0)
    tile, rank, off_m = C._program_tile(CL, BM)
    KC: gl.constexpr = K // CL
    NBC: gl.constexpr = KC // B
    xl: gl.constexpr = A.tile_layout(BM, num_warps)
    mma: gl.constexpr = A.rotation_layout(B, num_warps)
    x_bufs, r_bufs = A._tile_buffers(NBC, 2 * NBC, BM, B)
    one: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    sync = gl.zeros([32 * num_warps], gl.int32, layout=one)
    for i in gl.static_range(NBC):
        kb = rank * NBC + i
        r_e, r_o = A._r_halves(r_ptr, kb, B, num_warps)
        A._store_split(r_e, r_bufs.index(2 * i).slice(0, B // 2, dim=1), r_bufs.index(2 * i + 1).slice(0, B // 2, dim=1))
        A._store_split(r_o, r_bufs.index(2 * i).slice(B // 2, B // 2, dim=1),
                       r_bufs.index(2 * i + 1).slice(B // 2, B // 2, dim=1))
    rl: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // CHK, CHK // 8], [num_warps, 1], [1, 0])
    ks = gl.arange(0, CHK, layout=gl.SliceLayout(1, xl))
    ts = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, xl))
    if P0:
        for c in gl.static_range(KC // CHK):
            k0 = rank * KC + c * CHK
            tr = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, rl))
            kr = k0 + gl.arange(0, CHK, layout=gl.SliceLayout(0, rl))
            v = gl.load(x_ptr + tr[:, None] * sxm + kr[None, :], mask=(tr < M)[:, None], other=0.0)
            v = gl.convert_layout(gl.permute(v, (1, 0)), xl)
            gl.store(xt_ptr + (k0 + ks)[:, None] * MP + ts[None, :], v)
    if B1:
        sync = C._cluster_barrier(sync)
    C._copy_blocks(x_bufs, xt_ptr, MP, perm_ptr, rank * NBC, ts, NBC, B, True, xl)
    tl_ = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    mx = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, mma)) + 1.0
    if PH1:
        for i in gl.static_range(NBC):
            mx = gl.maximum(mx, gl.max(gl.abs(C._rotate(x_bufs, r_bufs, i, BM, B, mma)), axis=1))
        gl.store(part_ptr + pid * BM + tl_, mx)
    if B2:
        sync = C._cluster_barrier(sync)
    if PH2:
        pl: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        jj = gl.arange(0, CL, layout=gl.SliceLayout(1, pl))
        tt = gl.arange(0, BM, layout=gl.SliceLayout(0, pl))
        z = gl.max(sync, axis=0)
        pm = gl.load(part_ptr + z + (tile * CL + jj)[:, None] * BM + tt[None, :], cache_modifier=".cg")
        tmax = gl.convert_layout(gl.max(pm, axis=0), gl.SliceLayout(1, mma))
        sc = gl.div_rn(tmax, gl.full([BM], 127.0, gl.float32, layout=gl.SliceLayout(1, mma)))
        sc = gl.where(sc > 0, sc, 1.0)
        rcp = A._recip(sc)
        ol: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // B, B // 16], [num_warps, 1], [1, 0])
        orow = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, ol))
        oc = gl.arange(0, B, layout=gl.SliceLayout(0, ol))
        for i in gl.static_range(NBC):
            c0 = (rank * NBC + i) * B
            run = gl.multiple_of(c0 - c0 % BKD + (c0 % BKD) // 2, B // 2)
            ocol = run + oc % (B // 2) + (oc // (B // 2)) * (BKD // 2)
            acc = C._rotate(x_bufs, r_bufs, i, BM, B, mma)
            q = A._codes(A._quotient(acc, sc, rcp, True), -128, 127, True)
            gl.store(codes_ptr + orow[:, None] * K + ocol[None, :], gl.convert_layout(q, ol), mask=(orow < M)[:, None])


def graph_us(fns, repeats: int) -> float:
    """Median us per call of a CUDA graph of fns (called in order), warm."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(repeats):
        start.record()
        for _ in range(5):
            g.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / 5 / len(fns))
    return statistics.median(out)


VARIANTS = {  # name: (PERM, RLOAD, MMA, ATOM)
    "full": (1, 1, 1, 1), "store_not_atomic": (1, 1, 1, 2), "no_result": (1, 1, 1, 0), "no_perm": (0, 1, 1, 1),
    "no_rload": (1, 0, 1, 1), "no_mma": (1, 1, 0, 1), "load_only": (1, 0, 0, 0), "load_only_no_perm": (0, 0, 0, 0),
    "register_operand": (1, 1, 3, 1),  # the tile read once, as both bf16 dots' register operand (ACT_AREG)
    "one_float16_term": (1, 2, 2, 1),  # x converted to float16 (exact for 2^-17 <= |x| <= 65504, timing only),
}                                      # R_in copied as it is, one wgmma instead of the split and two


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=800)
    ap.add_argument("--k", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--launches", type=int, default=12)
    ap.add_argument("--buffers", type=int, default=1)
    ap.add_argument("--bm", default="128,64", help="token tiles to try for the pass-1 ablations (empty: none)")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/probe_act.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_act: needs a CUDA GPU (sm_90, Gluon)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    m, k, b = args.m, args.k, 64
    g = torch.Generator(device="cpu").manual_seed(0)
    xts = [torch.randn(k, m, generator=g).to(dev, torch.bfloat16) for _ in range(args.buffers)]
    perm = torch.randperm(k, generator=g).to(dev)
    r_in = torch.linalg.qr(torch.randn(k // b, b, b, generator=g, dtype=torch.float64))[0].to(dev, torch.float16)
    tokmax = torch.zeros(m, device=dev)
    part = torch.zeros(k // b * m + 256, device=dev)
    gbs = lambda us: k * m * 2 / (us * 1e-6) / 1e9  # noqa: E731
    rows = []

    def record(name, us, **kw):
        rows.append({"variant": name, "us": us, "x_read_GBps": gbs(us), **kw})
        print(f"{name:28s} {kw} {us:7.2f} us  ({gbs(us):6.0f} GB/s of x^T)", flush=True)

    # production passes, as act_codes launches them for LLM down_proj (pick_config's ACT_* keys)
    from duquant_runtime.kernels import w4a8 as K
    cfg = K.pick_config(m, 2048, k, K.MODE_DYNAMIC)
    bm = cfg.get("ACT_BM", 128)
    tt = max(1, min(triton.cdiv(m, bm), cfg.get("ACT_TT", 1)))  # as act_codes derives them
    stages = max(1, min(tt, cfg.get("ACT_STAGES", 3)))
    codes = torch.empty((m, k), device=dev, dtype=torch.int8)
    tok_scale = torch.empty((m,), device=dev)
    rs = torch.empty((k // b, 2, b, b), device=dev, dtype=torch.bfloat16)
    grid = (k // b, triton.cdiv(triton.cdiv(m, bm), tt))
    f16 = bool(cfg.get("ACT_F16", False))  # as act_codes: the cache of R_in's terms only without ACT_F16
    rcache = bool(cfg.get("ACT_RCACHE")) and not f16
    for p in (1, 2):
        fns = [lambda i=i, p=p: A._act_kernel[grid](xts[i % len(xts)], m, m, perm, r_in, tokmax, codes, tok_scale, rs,
                                                    K=k, TT=tt, BM=bm, B=b, BKD=cfg["BK"], STAGES=stages, PASS=p,
                                                    HAS_PERM=True, QMIN=-128, QMAX=127, FASTDIV=True, AREG=False,
                                                    PDL=False, RCACHE=rcache, SATCVT=cfg.get("SATCVT", True),
                                                    F16=f16, num_warps=4)
               for i in range(args.launches)]
        record(f"production_pass{p}", graph_us(fns, args.repeats), bm=bm, tt=tt, stages=stages, float16=f16)
    for warps in map(int, args.warps.split(",")):
        for bm in map(int, filter(None, args.bm.split(","))):
            grid = (k // b, triton.cdiv(m, bm))
            for name, (pm, rl, mm, at) in VARIANTS.items():
                fns = [lambda i=i, pm=pm, rl=rl, mm=mm, at=at: _pass1_ablation[grid](
                    xts[i % len(xts)], m, m, perm, r_in, tokmax, part, BM=bm, B=b, PERM=pm, RLOAD=rl, MMA=mm,
                    ATOM=at, num_warps=warps) for i in range(args.launches)]
                record(name, graph_us(fns, args.repeats), bm=bm, warps=warps)
    bm = 128
    grid = (k // b, triton.cdiv(m, bm))
    tokmax.fill_(3.0)
    for bm in (128, 64):
        grid = (k // b, triton.cdiv(m, bm))
        for quant, store, f16 in ((1, 1, 0), (2, 1, 0), (2, 1, 1), (2, 3, 0), (2, 0, 0), (2, 0, 1), (1, 0, 0),
                                  (0, 1, 0), (0, 0, 0)):
            if bm == 64 and (quant, store) not in ((2, 1), (2, 0)):
                continue
            fns = [lambda i=i, quant=quant, store=store, f16=f16: _pass2_ablation[grid](
                xts[i % len(xts)], m, m, perm, rs, tokmax, codes, K=k, BM=bm, B=b, BKD=cfg["BK"], QUANT=quant,
                STORE=store, F16=f16, r16_ptr=r_in, num_warps=4) for i in range(args.launches)]
            record("pass2", graph_us(fns, args.repeats), quant=quant, store=store, float16=f16, bm=bm)
    bm = 128
    grid = (k // b, triton.cdiv(m, bm))
    # the cluster kernel (K = 2048 layers at M = 800: q/o, the q/k/v and gate/up groups), phases switched off
    kc, cl, cbm = 2048, 16, 64
    xr = torch.randn(m, kc, generator=g).to(dev, torch.bfloat16)
    tiles = triton.cdiv(m, cbm)
    cargs = dict(x_ptr=xr, sxm=kc, M=m, MP=tiles * cbm, xt_ptr=torch.empty((kc, tiles * cbm), device=dev,
                 dtype=torch.bfloat16), part_ptr=torch.zeros((tiles * cl, cbm), device=dev),
                 perm_ptr=torch.randperm(kc, generator=g).to(dev), r_ptr=r_in[:kc // b].contiguous(),
                 codes_ptr=torch.empty((m, kc), device=dev, dtype=torch.int8), K=kc, CL=cl, BM=cbm, B=b, BKD=256,
                 CHK=min(C.CH, kc // cl), num_warps=4)
    for flags in ((1, 1, 1, 1, 1), (0, 1, 1, 1, 1), (1, 0, 1, 0, 1), (1, 1, 0, 1, 1), (1, 1, 1, 1, 0), (1, 1, 1, 0, 0),
                  (0, 0, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 0, 1)):
        fl = dict(zip(("P0", "B1", "PH1", "B2", "PH2"), flags))
        fns = [lambda fl=fl: C._launch_clusters(_cluster_ablation, tiles, cl, {**cargs, **fl}, False)] * args.launches
        record("cluster", graph_us(fns, args.repeats), **fl)
    for loader, tt, stages in ((1, 1, 1), (1, 2, 1), (0, 1, 1), (0, 7, 2), (0, 7, 3), (0, 7, 4), (1, 7, 1)):
        grid = (k // b, triton.cdiv(triton.cdiv(m, bm), tt))
        fns = [lambda i=i, loader=loader, tt=tt, stages=stages: _load_probe[grid](
            xts[i % len(xts)], m, m, perm, part, TT=tt, BM=bm, B=b, STAGES=stages, LOADER=loader, num_warps=4)
            for i in range(args.launches)]
        record("loads_only", graph_us(fns, args.repeats), loader="cp.async" if loader == 0 else "ldg", tt=tt,
               stages=stages)
    # reference: torch reading x^T once (a reduction) and copying it
    x0 = xts[0]
    record("torch_amax_dim0", graph_us([lambda: torch.amax(x0, dim=0)] * args.launches, args.repeats))
    record("torch_clone(read+write)", graph_us([lambda: x0.clone()] * args.launches, args.repeats))
    write_results(args.out, {"benchmark": "probe_act", "device": torch.cuda.get_device_name(), "M": m, "K": k,
                             "buffers": args.buffers, "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
