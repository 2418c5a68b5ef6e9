"""Dynamic per-token activation codes in one launch for Hopper (Gluon): a thread-block cluster per token tile.

    cluster c: tokens c*BM .. c*BM + BM - 1 of x (M, K); its CL programs own K/CL channels each
    phase 0: program r copies x[tile, channels r*K/CL ..] into the x^T scratch (K, MP) bf16
             (tokens past M zero)                                        -> cluster barrier
    phase 1: program r rotates its K/(64 CL) blocks (cp.async of the permuted x^T rows, wgmma
             as in w4a8_act) and writes its per-token absmax to part     -> cluster barrier
    phase 2: token max over the cluster's CL partials, scale, the rotation again (from shared
             memory), int8 codes in the GEMM's column order (`w4a8._deint`), scales (M,)

The Triton launches (prep + quantize) and `w4a8_act` (two passes) need two dependent launches,
plus a transpose launch for row-major x at M > 64: the per-token maximum spans every program of
a token tile. A software grid barrier measured slower than a launch boundary (docs/benchmarks.md,
"kernels v8 probes"); the cluster barrier (barrier.cluster, release / acquire) is the hardware's,
and a cluster is resident at once by construction. The partial maxima and the x^T scratch go
through global memory (L2), which the barrier's release / acquire orders at cluster scope.

Numerics: the products and sums of `w4a8_act` with the same ACT_F16 setting (R_in's float16 block
and rows scaled by powers of two, or R_in split exactly into bf16 hi + lo; the same wgmma order per
block, Markstein's quotient), so the codes and scales are bit-identical to it.
Launched by `act_codes` as a cluster launch of the compiled kernel (Triton's launcher, with the
cluster size as its CTA count); used by `w4a8.prepare_activation` where `pick_config` asks for
ACT="cluster" on sm_90 with Gluon (tests/test_w4a8_cluster.py). Measured (H200, docs/benchmarks.md
"kernels v11"): faster than the two-launch paths on the K = 2048 layers at M = 800 (q/o 24.4 ->
21.5 us a layer), slower at M = 50, where one cluster's chain of dependent round trips through
L2 takes longer than the two launches it replaces. A GPU that cannot schedule a cluster of this
size (fewer SMs per GPC, or another kernel holding them) refuses the launch: `act_codes` then
returns None, the size is not tried again on that device, and the other paths run."""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .w4a8 import is_token_minor
from .w4a8_act import (_codes, _even_odd, _f16_absmax, _f16_block, _f16_scale, _f16_scaled, _griddepcontrol,
                       _quotient, _r_halves, _recip, _scaled_quotient, _store_split, _tile_buffers, _x_buffers,
                       f16_layout, rotation_layout, tile_layout)

CH = 128  # channels per phase-0 copy step


@gluon.jit
def _cluster_barrier(t):
    """barrier.cluster arrive (release) + wait (acquire), once by every thread of the program
    (t: int32, one element per thread); returns t, so later reads can depend on it."""
    return gl.inline_asm_elementwise(
        "barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned; mov.b32 $0, $1;",
        "=r,r", [t], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _rotate(x_bufs, r_bufs, i, BM: gl.constexpr, B: gl.constexpr, mma: gl.constexpr):
    """Block i of this program rotated, float32 (BM, B): the tile (B, BM) as wgmma's MN-major A
    operand times R_in's hi then lo term (columns: the block's even channels, then its odd ones)."""
    a = x_bufs.index(i).permute((1, 0))
    acc = warpgroup_mma(a, r_bufs.index(2 * i), gl.zeros([BM, B], gl.float32, layout=mma), is_async=True)
    acc = warpgroup_mma(a, r_bufs.index(2 * i + 1), acc, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))


@gluon.jit
def _copy_blocks(x_bufs, xt_ptr, MP, perm_ptr, kb0, ts, NB: gl.constexpr, B: gl.constexpr, HAS_PERM: gl.constexpr,
                 xl: gl.constexpr):
    """Blocks kb0 .. kb0 + NB - 1 of the tile's tokens ts (BM,) into x_bufs (NB, B, BM): cp.async of
    the x^T scratch rows (K, MP) they read through the permutation (or not); returns once every
    thread's copies have landed and are visible to wgmma."""
    cb = gl.arange(0, B, layout=gl.SliceLayout(1, xl))
    for i in gl.static_range(NB):
        if HAS_PERM:
            src = gl.load(perm_ptr + (kb0 + i) * B + cb)
        else:
            src = (kb0 + i) * B + cb
        async_copy.async_copy_global_to_shared(x_bufs.index(i), xt_ptr + src[:, None] * MP + ts[None, :])
    async_copy.commit_group()
    async_copy.wait_group(0)
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _program_tile(CL: gl.constexpr, BM: gl.constexpr):
    """(token tile, rank in its cluster, first token) of this program: clusters of CL consecutive
    programs, one BM-token tile each."""
    pid = gl.program_id(0)
    return pid // CL, pid % CL, (pid // CL) * BM


@gluon.jit
def _cluster_kernel(x_ptr, sxm, sxk, M, MP, xt_ptr, part_ptr, perm_ptr, r_ptr, codes_ptr, tok_scale_ptr,
                    K: gl.constexpr, CL: gl.constexpr, BM: gl.constexpr, B: gl.constexpr, BKD: gl.constexpr,
                    CHK: gl.constexpr, XT: gl.constexpr, HAS_PERM: gl.constexpr, QMIN: gl.constexpr,
                    QMAX: gl.constexpr, PDL: gl.constexpr, SATCVT: gl.constexpr, num_warps: gl.constexpr,
                    F16: gl.constexpr = False):
    """Program p = cluster p // CL, rank p % CL (clusters of CL consecutive programs). x (M, K)
    with strides (sxm, sxk): rows contiguous (XT False) or token-minor (XT: sxm 1). xt_ptr: the
    (K, MP) bf16 scratch, MP = tiles * BM; part_ptr: (programs, BM) float32; codes (M, K) int8;
    tok_scale (M,) float32. PDL: R_in and the permutation are read before waiting for x. F16:
    R_in's float16 blocks copied as they are and one float16 wgmma per block on rows scaled by
    powers of two (`w4a8_act`'s F16, the same sums)."""
    pid = gl.program_id(0)
    tile, rank, off_m = _program_tile(CL, BM)
    KC: gl.constexpr = K // CL
    NBC: gl.constexpr = KC // B
    xl: gl.constexpr = tile_layout(BM, num_warps)
    mma: gl.constexpr = rotation_layout(B, num_warps)
    one: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    sync = gl.zeros([32 * num_warps], gl.int32, layout=one)
    if F16:  # this program's x^T tiles; R_in's blocks as they are (copies land by phase 1's wait)
        x_bufs = _x_buffers(NBC, BM, B)
        r16 = gl.allocate_shared_memory(gl.float16, [NBC, B, B], f16_layout())
        for i in gl.static_range(NBC):
            _f16_block(r_ptr, rank * NBC + i, r16.index(i), B, num_warps)
        async_copy.commit_group()
    else:
        x_bufs, r_bufs = _tile_buffers(NBC, 2 * NBC, BM, B)  # this program's x^T tiles; R_in's hi, lo terms
        for i in gl.static_range(NBC):  # R_in's terms first: under PDL this overlaps the previous launch
            kb = rank * NBC + i
            r_e, r_o = _r_halves(r_ptr, kb, B, num_warps)
            _store_split(r_e, r_bufs.index(2 * i).slice(0, B // 2, dim=1),
                         r_bufs.index(2 * i + 1).slice(0, B // 2, dim=1))
            _store_split(r_o, r_bufs.index(2 * i).slice(B // 2, B // 2, dim=1),
                         r_bufs.index(2 * i + 1).slice(B // 2, B // 2, dim=1))
    if PDL:
        _griddepcontrol(sync, "wait")
        _griddepcontrol(sync, "launch_dependents")
    # phase 0: this program's channel slice of the tile into x^T (tokens contiguous), zero past M
    rl: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // CHK, CHK // 8], [num_warps, 1], [1, 0])
    ks = gl.arange(0, CHK, layout=gl.SliceLayout(1, xl))
    ts = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, xl))
    for c in gl.static_range(KC // CHK):
        k0 = rank * KC + c * CHK
        if XT:
            v = gl.load(x_ptr + (k0 + ks)[:, None] * sxk + ts[None, :] * sxm, mask=(ts < M)[None, :], other=0.0)
        else:  # read along the rows of x, then one layout change
            tr = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, rl))
            kr = k0 + gl.arange(0, CHK, layout=gl.SliceLayout(0, rl))
            v = gl.load(x_ptr + tr[:, None] * sxm + kr[None, :] * sxk, mask=(tr < M)[:, None], other=0.0)
            v = gl.convert_layout(gl.permute(v, (1, 0)), xl)
        gl.store(xt_ptr + (k0 + ks)[:, None] * MP + ts[None, :], v)
    sync = _cluster_barrier(sync)
    # phase 1: this program's blocks, rotated; their per-token absmax
    _copy_blocks(x_bufs, xt_ptr, MP, perm_ptr, rank * NBC, ts, NBC, B, HAS_PERM, xl)
    tl_ = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    mx = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, mma))
    for i in gl.static_range(NBC):
        if F16:
            mx = gl.maximum(mx, _f16_absmax(x_bufs.index(i), r16.index(i), BM, B, mma))
        else:
            mx = gl.maximum(mx, gl.max(gl.abs(_rotate(x_bufs, r_bufs, i, BM, B, mma)), axis=1))
    gl.store(part_ptr + pid * BM + tl_, mx)
    sync = _cluster_barrier(sync)
    # phase 2: the tile's token maxima, scales, codes
    pl: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
    jj = gl.arange(0, CL, layout=gl.SliceLayout(1, pl))
    tt = gl.arange(0, BM, layout=gl.SliceLayout(0, pl))
    z = gl.max(sync, axis=0)  # 0, read after the barrier
    pm = gl.load(part_ptr + z + (tile * CL + jj)[:, None] * BM + tt[None, :], cache_modifier=".cg")
    tmax = gl.convert_layout(gl.max(pm, axis=0), gl.SliceLayout(1, mma))
    s = gl.div_rn(tmax, gl.full([BM], QMAX, gl.float32, layout=gl.SliceLayout(1, mma)))
    s = gl.where(s > 0, s, 1.0)
    if F16:  # the scaled sums over the scaled scale: the same quotients
        fs, sf, rcp = _f16_scale(tmax, s)
    else:
        rcp = _recip(s)
    toks = off_m + tl_
    if rank == 0:
        gl.store(tok_scale_ptr + toks, s, mask=toks < M)
    ol: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // B, B // 16], [num_warps, 1], [1, 0])
    orow = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, ol))
    oc = gl.arange(0, B, layout=gl.SliceLayout(0, ol))
    for i in gl.static_range(NBC):
        c0 = (rank * NBC + i) * B  # codes of column j go to run + j % (B/2) + (j // (B/2)) * BKD/2 (`_deint`)
        run = gl.multiple_of(c0 - c0 % BKD + (c0 % BKD) // 2, B // 2)
        ocol = run + oc % (B // 2) + (oc // (B // 2)) * (BKD // 2)
        if F16:
            acc = _f16_scaled(x_bufs.index(i), r16.index(i), fs, BM, B, mma)
            q = _even_odd(_codes(_scaled_quotient(acc, sf, rcp), QMIN, QMAX, SATCVT), BM, B)
        else:
            acc = _rotate(x_bufs, r_bufs, i, BM, B, mma)
            q = _codes(_quotient(acc, s, rcp, True), QMIN, QMAX, SATCVT)
        gl.store(codes_ptr + orow[:, None] * K + ocol[None, :], gl.convert_layout(q, ol), mask=(orow < M)[:, None])


def cluster_size(k: int, cfg: dict) -> int:
    """Programs per cluster for K = k: cfg's CL (default 16, at most 16), halved until each owns
    whole 64-wide blocks."""
    cl = min(16, cfg.get("CL", 16))  # 16: the largest (non-portable) cluster on sm_90
    while cl > 1 and k % (cl * 64):
        cl //= 2
    return cl


SHARED_LIMIT = 200 * 1024  # of sm_90's 227 KB per program, with room for the layout conversions


def usable(x: torch.Tensor, r_in: torch.Tensor, smooth, qmax: int, bkd: int, cfg: dict) -> bool:
    """Whether these operands fit the kernel: x (M, K) bf16, rows contiguous or token-minor,
    float16 R_in in 64-wide blocks, no smoothing, 8-bit codes, GEMM K tiles (bkd) of whole blocks,
    clusters of at least 2 programs whose tiles fit in shared memory (`shared_bytes`), a token
    tile of at least one 16-row wgmma slice per warp."""
    k = x.shape[1]
    cl, bm = cluster_size(k, cfg), cfg.get("CL_BM", 64)
    return (x.dtype == torch.bfloat16 and (x.stride(1) == 1 or is_token_minor(x)) and r_in.dtype == torch.float16
            and r_in.shape[-1] == 64 and smooth is None and qmax <= 127 and bkd % 64 == 0 and cl >= 2
            and shared_bytes(k, cl, bm, bool(cfg.get("ACT_F16"))) <= SHARED_LIMIT and bm >= 16 * cfg.get("CL_WARPS", 4))


def shared_bytes(k: int, cl: int, bm: int, f16: bool = False) -> int:
    """Shared memory of one program's tiles: per 64-wide block, x^T (64, bm) and R_in's two bf16
    terms (64, 64), or its float16 block (f16)."""
    return k // cl // 64 * (64 * bm * 2 + (1 if f16 else 2) * 64 * 64 * 2)


def act_codes(x: torch.Tensor, perm: torch.Tensor | None, r_in: torch.Tensor, bkd: int, qmin: int, qmax: int,
              cfg: dict, pdl: bool = False, early: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes int8 (M, K) in the `_deint` order of BKD-wide K tiles, per-token scales float32 (M,)),
    or None when the GPU refuses the cluster launch (see the module docstring),
    for x (M, K) bf16 (rows contiguous, or token-minor), perm (K,) int or None, r_in float16
    (K/64, 64, 64). cfg: CL (programs per cluster), CL_BM (tokens per cluster), CL_WARPS, ACT_F16.
    pdl: the next launch may start early (griddepcontrol.launch_dependents); early (implies pdl):
    this launch starts early itself and waits for x's producer."""
    m, k = x.shape
    cl = cluster_size(k, cfg)
    bm = cfg.get("CL_BM", 64)
    key = (str(x.device), cl, bm)
    if key in _REFUSED:
        return None
    tiles = triton.cdiv(m, bm)
    mp = tiles * bm
    dev = x.device
    xt = torch.empty((k, mp), device=dev, dtype=torch.bfloat16)
    part = torch.empty((tiles * cl, bm), device=dev, dtype=torch.float32)
    codes = torch.empty((m, k), device=dev, dtype=torch.int8)
    tok_scale = torch.empty((m,), device=dev, dtype=torch.float32)
    args = dict(x_ptr=x, sxm=x.stride(0), sxk=x.stride(1), M=m, MP=mp, xt_ptr=xt, part_ptr=part,
                perm_ptr=perm if perm is not None else r_in, r_ptr=r_in, codes_ptr=codes, tok_scale_ptr=tok_scale,
                K=k, CL=cl, BM=bm, B=r_in.shape[-1], BKD=bkd, CHK=min(CH, k // cl), XT=is_token_minor(x),
                HAS_PERM=perm is not None, QMIN=qmin, QMAX=qmax, PDL=pdl, SATCVT=cfg.get("SATCVT", True),
                F16=bool(cfg.get("ACT_F16", False)), num_warps=cfg.get("CL_WARPS", 4))
    try:
        _launch_clusters(_cluster_kernel, tiles, cl, args, early)
    except RuntimeError:  # e.g. CUDA_ERROR_CLUSTER_OUT_OF_RESOURCES: the caller's other paths run
        _REFUSED.add(key)
        return None
    return codes, tok_scale


_REFUSED: set = set()  # (device, cluster size, tokens per cluster) whose cluster launch the GPU refused


def _launch_clusters(kernel, clusters: int, cl: int, args: dict, pdl: bool) -> None:
    """Launch `kernel` (compiled for one program) as `clusters` clusters of cl programs (grid
    clusters * cl): Triton's launcher does a cluster launch when its CTA count is above 1."""
    launch = {"launch_pdl": True} if pdl else {}
    ck = kernel.warmup(**args, grid=(clusters * cl, ), **launch)  # compiled once, then the cache
    if hasattr(ck, "result"):
        ck = ck.result()
    meta = list(ck.packed_metadata)
    meta[1] = cl
    stream = torch.cuda.current_stream(args["x_ptr"].device).cuda_stream
    ck.run(clusters, 1, 1, stream, ck.function, tuple(meta), None, None, None,
           *[args[name] for name in kernel.arg_names])
