"""Probes of the dynamic activation launches (measured on an H200; none adopted by the runtime).

    PYTHONPATH=. python3 benchmarks/probe_activation.py {fused,recompute,split-bf16,floor} [--out FILE] [--repeats N]

The shipped dynamic path (kernels/w4a8.py) is prep (x[:, perm] @ R_in blocks in tf32, float32
values + per-(token, block) absmax) then quantize (per-token scale, int8 codes in the GEMM's K
order). At M = 800, K = 16384 (LLM down_proj) that is 26 MB read, 52 MB written, 52 MB read and
13 MB written, 53.8 us in all. Each subcommand times one alternative against it (CUDA-graph
replays, medians) and checks its codes against the shipped launches; JSON to --out:
- `fused`: ONE launch, no float32 intermediate. Program p keeps block p % NB of a token group in
  registers; the group's token maxima meet through atomics and a per-group arrival counter
  (all NB * C programs resident at once), then each program quantizes its own tile. Also times
  the whole `w4_linear` with it.
- `recompute`: two launches, no float32 intermediate: rotate once for the maxima, once again for
  the codes (x read twice).
- `split-bf16`: the prep's rotation as two bf16 dots (R = R_hi + R_lo, exact products) instead of
  one tf32 dot (which needs K-major operands, i.e. a transposed and widened x tile); and one
  bf16 R (lossy) as the bound.
- `floor`: LLM down_proj only: a copy of x, a read of x^T through the permutation storing only
  block maxima, the shipped prep and quantize with float32 vs bf16 values.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from runtime_gpu import graph_time  # noqa: E402
from sweep_w4a8 import make_input, make_layers  # noqa: E402
from w4a8_cases import instances  # noqa: E402
from duquant_runtime.kernels import w4a8 as W  # noqa: E402

_rotation_block = W._rotation_block
_token_scales = W._token_scales
_scale_of_max = W._scale_of_max
_codes = W._codes
_store_code_runs = W._store_code_runs

# (name, N, K, M, x token-minor as the runtime gives it)
SHAPES = (("llm down", 2048, 16384, 800, True), ("llm o", 2048, 2048, 800, False),
          ("llm gate/up linked", 32768, 2048, 800, False), ("llm q/k/v linked", 2560, 2048, 800, False),
          ("expert down", 1024, 4096, 50, True), ("expert o", 1024, 2048, 50, False),
          ("expert gate/up linked", 8192, 1024, 50, False), ("expert q/k/v linked", 2560, 1024, 50, False),
          ("llm down M=1", 2048, 16384, 1, False))


# ---------------------------------------------------------------- fused: one launch, in-kernel group barrier
@triton.jit
def _fence_gpu(v):
    """fence.acq_rel.gpu in every thread (returns v, so that the fence is not dropped)."""
    return tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [v], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _prepq_kernel(x_ptr, stride_xm, M, K, perm_ptr, r_ptr, codes_ptr, tok_scale_ptr, tmax_ptr, sync_ptr, err_ptr,
                  NB: tl.constexpr, NGROUPS, C: tl.constexpr, BMP: tl.constexpr, B: tl.constexpr, BKD: tl.constexpr,
                  QMIN: tl.constexpr, QMAX: tl.constexpr, XT: tl.constexpr, PDL: tl.constexpr, PDL_WAIT: tl.constexpr,
                  SPIN_LIMIT: tl.constexpr):
    """Dynamic activations in one launch, without the float32 intermediate: program p rotates
    block p % NB of token groups p // NB, p // NB + C, ... (BMP tokens each) and keeps the rotated
    tile in registers; the group's token maxima meet in tmax (atomic max of non-negative floats),
    a per-group arrival counter (sync[2g]) tells every program of the group when all NB blocks
    are in, then each quantizes its own tile (int8 codes in `_deint` order, scales (M,)).
    The grid (NB * C programs) must be resident at once (`fused_programs`); the last program of a
    group to finish (sync[2g + 1]) zeroes the group's maxima and counters for the next call. A wait
    longer than SPIN_LIMIT polls sets err[0] and goes on (`check_fused_errors`), never hangs."""
    if PDL_WAIT:
        gdc_wait()
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    kb = pid % NB
    _, src, r, _ = _rotation_block(kb, perm_ptr, r_ptr, r_ptr, B, True, False)
    for g in range(pid // NB, NGROUPS, C):
        offs_m = g * BMP + tl.arange(0, BMP)
        row_ok = offs_m < M
        xt = _load_rot(x_ptr, stride_xm, src, offs_m, row_ok, r, XT)
        tl.atomic_max(tmax_ptr + offs_m, tl.max(tl.abs(xt), axis=1), mask=row_ok, sem="relaxed")
        _fence_gpu(g)
        tl.debug_barrier()
        seen = tl.atomic_add(sync_ptr + 2 * g, 1, sem="acq_rel") + 1
        polls = seen * 0
        while (seen < NB) & (polls < SPIN_LIMIT):
            seen = tl.load(sync_ptr + 2 * g, volatile=True)
            polls += 1
        if polls >= SPIN_LIMIT:
            tl.store(err_ptr, 1)
        _fence_gpu(g)
        mx = tl.load(tmax_ptr + offs_m, mask=row_ok, other=0.0, volatile=True)
        s = _scale_of_max(mx, QMAX)
        tl.store(tok_scale_ptr + offs_m, s, mask=row_ok & (kb == 0))
        _store_code_runs(codes_ptr, offs_m, row_ok, _codes(xt, s, QMIN, QMAX), kb * B, K, BKD)
        tl.debug_barrier()  # every thread has read the maxima before this program counts itself out
        done = tl.atomic_add(sync_ptr + 2 * g + 1, 1, sem="acq_rel")
        if done == NB - 1:  # the group's last reader: zero its maxima and counters for the next call
            tl.store(tmax_ptr + offs_m, tl.zeros((BMP,), tl.float32), mask=row_ok)
            tl.atomic_xchg(sync_ptr + 2 * g, 0)
            tl.atomic_xchg(sync_ptr + 2 * g + 1, 0)


_FUSED: dict = {}
SPIN_LIMIT = 1 << 22  # polls of a group counter before the fused launch gives up (err flag), ~seconds


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def fused_programs(nb: int, groups: int, sms: int) -> int | None:
    """Token groups C in flight per round of the fused launch (NB * C programs), or None when the
    NB programs of one group would not all be resident at once: at most two 4-warp programs per SM
    are counted on (register and shared-memory use of `_prepq_kernel` allow more)."""
    if nb > 2 * sms:
        return None
    return max(1, min(groups, (2 * sms) // nb))


def _fused_workspace(device: torch.device, m: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeroed (token maxima float32 (>= m,), group counters int32 (>= 2 * groups,), error flag int32
    (1,)) for `device` and its current stream; each fused launch leaves them zeroed again."""
    stream = torch.cuda.current_stream(device).cuda_stream
    ws = _FUSED.get((device, stream))
    if ws is None or ws[0].numel() < m or ws[1].numel() < 2 * groups:
        ws = (torch.zeros(max(m, 4096), dtype=torch.float32, device=device),
              torch.zeros(max(2 * groups, 1024), dtype=torch.int32, device=device),
              torch.zeros(1, dtype=torch.int32, device=device))
        _FUSED[(device, stream)] = ws
    return ws


def check_fused_errors(device) -> None:
    """Raise when a fused activation launch on `device` waited past its limit (its grid was not
    resident at once, e.g. on a GPU partition); synchronizes. Resets the flag."""
    for (dev, _), (_, _, err) in list(_FUSED.items()):
        if dev == torch.device(device) and int(err.item()):
            err.zero_()
            raise RuntimeError("fused activation launch timed out waiting for its programs "
                               "(its grid was not resident at once)")


def fused_activation(x, lay, cfg, fbmp):
    """(codes, tok_scale) by `_prepq_kernel` for x (M, K) read as the shipped path reads it
    (token-minor x^T, x^T from the transpose launch at large M, or x gathered), FBMP tokens per
    group."""
    m, k = x.shape
    pdl = W._use_pdl(cfg, x.device)
    early = pdl and cfg.get("PREP_PDL", False)
    if W.is_token_minor(x):
        xs, xt = x.t(), True
    elif cfg.get("XLOAD") == "transpose":
        xs = torch.empty((k, m), device=x.device, dtype=x.dtype)
        W._transpose_kernel[(triton.cdiv(m, 64), k // 64)](x, x.stride(0), xs, m, xs, BT=64, PDL=pdl, PDL_WAIT=early,
                                                           ZERO=False, num_warps=4, **W._pdl(early))
        xt, early = True, pdl
    else:
        xs, xt = x, False
    nb = k // lay["r_in"].shape[-1]
    groups = triton.cdiv(m, fbmp)
    dev_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    c = fused_programs(nb, groups, _sm_count(dev_index))
    if c is None:
        raise ValueError("grid of the fused launch cannot be resident")
    tmax, sync, err = _fused_workspace(x.device, groups * fbmp, groups)
    codes = torch.empty((m, k), device=x.device, dtype=torch.int8)
    tok_scale = torch.empty((m,), device=x.device, dtype=torch.float32)
    _prepq_kernel[(nb * c,)](
        xs, xs.stride(0), m, k, lay["perm"], lay["r_in"], codes, tok_scale, tmax, sync, err, NB=nb, NGROUPS=groups, C=c,
        BMP=fbmp, B=lay["r_in"].shape[-1], BKD=W.gemm_tiling(k, cfg)[0], QMIN=-128, QMAX=127, XT=xt, PDL=pdl,
        PDL_WAIT=early, SPIN_LIMIT=SPIN_LIMIT, num_warps=4, **W._pdl(early))
    return codes, tok_scale


def run_fused(args) -> list:
    dev = torch.device("cuda")
    rows = []
    for name, n, k, m, tm in SHAPES:
        lays = make_layers(n, k, instances(n, k, args.l2_bytes), dev)
        x0 = make_input(m, k, dev)
        x = x0.t().contiguous().t() if tm else x0
        base = W.pick_config(m, n, k, W.MODE_DYNAMIC)

        def shipped_act(xx, lay):
            return W.prepare_activation(xx, r_in=lay["r_in"], perm=lay["perm"], smooth=None, mode=W.MODE_DYNAMIC,
                                        cfg=base)

        def linear(xx, lay, act):
            a, s = act(xx, lay)
            return W.w4_gemm(a, s, qweight=lay["qweight"], w_scale=lay["w_scale"], r_out=lay["r_out"], bias=None,
                             out_dtype=xx.dtype, cfg=base)
        ref_c, ref_s = shipped_act(x, lays[0])
        row = {"name": name, "N": n, "K": k, "M": m, "token_minor": tm,
               "two_launch_act_s": graph_time([functools.partial(shipped_act, lay=la) for la in lays], x, args.repeats),
               "two_launch_linear_s": graph_time([functools.partial(linear, lay=la, act=shipped_act) for la in lays], x,
                                                 args.repeats), "fused": []}
        line = (f"{name} M={m}: two launches act {row['two_launch_act_s'] * 1e6:.1f} us, "
                f"linear {row['two_launch_linear_s'] * 1e6:.1f} us")
        for fbmp in (16, 32, 64, 128):
            if fbmp > max(16, 2 * m):
                continue
            act = functools.partial(fused_activation, cfg=base, fbmp=fbmp)
            c, s = act(x, lays[0])
            torch.cuda.synchronize()
            check_fused_errors(dev)
            r = {"FBMP": fbmp, "bit_identical": bool(torch.equal(c, ref_c) and torch.equal(s, ref_s)),
                 "max_code_diff": int((c.int() - ref_c.int()).abs().max()),
                 "act_s": graph_time([functools.partial(act, lay=la) for la in lays], x, args.repeats),
                 "linear_s": graph_time([functools.partial(linear, lay=la, act=act) for la in lays], x, args.repeats)}
            check_fused_errors(dev)
            row["fused"].append(r)
            line += (f"\n  fused FBMP {fbmp}: act {r['act_s'] * 1e6:.1f} us, linear {r['linear_s'] * 1e6:.1f} us, "
                     f"identical={r['bit_identical']} max code diff {r['max_code_diff']}")
        print(line, flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- recompute: rotate twice
@triton.jit
def _load_rot(x_ptr, stride_x, src, offs_m, row_ok, r, XT: tl.constexpr):
    if XT:
        x = tl.trans(tl.load(x_ptr + src[:, None] * stride_x + offs_m[None, :], mask=row_ok[None, :],
                             other=0.0)).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + src[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    return tl.dot(x, r, input_precision="tf32")


@triton.jit
def _absmax_kernel(x_ptr, stride_x, M, perm_ptr, r_ptr, part_ptr, NB: tl.constexpr, G: tl.constexpr,
                   BMP: tl.constexpr, TILES: tl.constexpr, STAGES: tl.constexpr, B: tl.constexpr, XT: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    for g in range(0, G):
        kb = pid_g * G + g
        _, src, r, _ = _rotation_block(kb, perm_ptr, r_ptr, r_ptr, B, True, False)
        for t in tl.range(0, TILES, num_stages=STAGES):
            offs_m = (pid_m * TILES + t) * BMP + tl.arange(0, BMP)
            row_ok = offs_m < M
            xt = _load_rot(x_ptr, stride_x, src, offs_m, row_ok, r, XT)
            tl.store(part_ptr + offs_m * NB + kb, tl.max(tl.abs(xt), axis=1), mask=row_ok)


@triton.jit
def _rotquant_kernel(x_ptr, stride_x, M, perm_ptr, r_ptr, part_ptr, out_ptr, tok_scale_ptr, K: tl.constexpr,
                     NB: tl.constexpr, NB_P2: tl.constexpr, G: tl.constexpr, BMP: tl.constexpr,
                     STAGES: tl.constexpr, B: tl.constexpr, BKD: tl.constexpr, XT: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BMP + tl.arange(0, BMP)
    row_ok = offs_m < M
    s = _token_scales(part_ptr, offs_m, row_ok, NB, NB_P2, 127)
    tl.store(tok_scale_ptr + offs_m, s, mask=row_ok & (pid_g == 0))
    for g in tl.range(0, G, num_stages=STAGES):
        kb = pid_g * G + g
        _, src, r, _ = _rotation_block(kb, perm_ptr, r_ptr, r_ptr, B, True, False)
        xt = _load_rot(x_ptr, stride_x, src, offs_m, row_ok, r, XT)
        _store_code_runs(out_ptr, offs_m, row_ok, _codes(xt, s, -128, 127), kb * B, K, BKD)


def recompute(x, lay, bkd, g1, bmp1, tiles1, st1, w1, g2, bmp2, st2, w2):
    """(codes, tok_scale) from x (M, K) token-minor or row-major, by the two rotate passes."""
    m, k = x.shape
    nb = k // 64
    xt_mode = W.is_token_minor(x)
    xs = x.t() if xt_mode else x
    part = torch.empty((m, nb), device=x.device, dtype=torch.float32)
    tiles1 = max(1, min(tiles1, triton.cdiv(m, bmp1)))
    _absmax_kernel[(nb // g1, triton.cdiv(m, bmp1 * tiles1))](
        xs, xs.stride(0), m, lay["perm"], lay["r_in"], part, NB=nb, G=g1, BMP=bmp1, TILES=tiles1, STAGES=st1, B=64,
        XT=xt_mode, num_warps=w1)
    codes = torch.empty((m, k), device=x.device, dtype=torch.int8)
    tok = torch.empty((m,), device=x.device, dtype=torch.float32)
    _rotquant_kernel[(nb // g2, triton.cdiv(m, bmp2))](
        xs, xs.stride(0), m, lay["perm"], lay["r_in"], part, codes, tok, K=k, NB=nb,
        NB_P2=triton.next_power_of_2(nb), G=g2, BMP=bmp2, STAGES=st2, B=64, BKD=bkd, XT=xt_mode, num_warps=w2)
    return codes, tok


def run_recompute(args) -> list:
    dev = torch.device("cuda")
    rows = []
    for name, n, k, m, tm in SHAPES[:2] + SHAPES[4:6]:
        lay = make_layers(n, k, 1, dev)[0]
        x0 = make_input(m, k, dev)
        x = x0.t().contiguous().t() if tm else x0
        cfg = W.pick_config(m, n, k, W.MODE_DYNAMIC)
        bkd = W.gemm_tiling(k, cfg)[0]

        def shipped(xx, lay=lay, cfg=cfg):
            return W.prepare_activation(xx, r_in=lay["r_in"], perm=lay["perm"], smooth=None, mode=W.MODE_DYNAMIC,
                                        cfg=cfg)
        ref_c, ref_s = shipped(x)
        row = {"name": name, "N": n, "K": k, "M": m, "shipped_s": graph_time([shipped] * 8, x, args.repeats),
               "variants": []}
        big = m >= 256
        for g1 in ((1, 4) if big else (1, 2)):
            for bmp1, tiles1 in (((64, 4), (128, 2), (64, 2)) if big else ((16, 1), (32, 1), (64, 1))):
                for g2, bmp2 in (((4, 64), (8, 64), (4, 32), (8, 32)) if big else ((1, 16), (2, 16), (4, 16))):
                    v = (g1, bmp1, tiles1, 3, 4, g2, bmp2, 2, 4)
                    if (k // 64) % g1 or (k // 64) % g2:
                        continue
                    alt = functools.partial(recompute, lay=lay, bkd=bkd, **dict(zip(
                        ("g1", "bmp1", "tiles1", "st1", "w1", "g2", "bmp2", "st2", "w2"), v)))
                    c, s = alt(x)
                    row["variants"].append({"cfg": v, "s": graph_time([alt] * 8, x, args.repeats),
                                            "bit_identical": bool(torch.equal(c, ref_c) and torch.equal(s, ref_s)),
                                            "max_code_diff": int((c.int() - ref_c.int()).abs().max())})
        best = min(row["variants"], key=lambda r: r["s"])
        print(f"{name} M={m}: shipped prep + quantize {row['shipped_s'] * 1e6:.1f} us; rotate twice, best of "
              f"{len(row['variants'])}: {best['s'] * 1e6:.1f} us {best['cfg']} (max code diff {best['max_code_diff']})",
              flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- split-bf16: two bf16 dots for the rotation
@triton.jit
def _prep16_kernel(x_ptr, stride_x, M, K, perm_ptr, r_ptr, out_ptr, part_ptr, NB: tl.constexpr, G: tl.constexpr,
                   BMP: tl.constexpr, TILES: tl.constexpr, STAGES: tl.constexpr, B: tl.constexpr,
                   XT: tl.constexpr, SPLIT: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    cb = tl.arange(0, B)
    for g in range(0, G):
        kb = pid_g * G + g
        offs_c = kb * B + cb
        src = tl.load(perm_ptr + offs_c)
        if XT:  # R^T: rt[j, i] = r[i, j]
            r = tl.load(r_ptr + kb * B * B + cb[None, :] * B + cb[:, None]).to(tl.float32)
        else:
            r = tl.load(r_ptr + kb * B * B + cb[:, None] * B + cb[None, :]).to(tl.float32)
        rhi = r.to(tl.bfloat16)
        rlo = (r - rhi.to(tl.float32)).to(tl.bfloat16)
        for t in tl.range(0, TILES, num_stages=STAGES):
            offs_m = (pid_m * TILES + t) * BMP + tl.arange(0, BMP)
            row_ok = offs_m < M
            if XT:
                xT = tl.load(x_ptr + src[:, None] * stride_x + offs_m[None, :], mask=row_ok[None, :], other=0.0)
                acc = tl.dot(rhi, xT)
                if SPLIT:
                    acc = tl.dot(rlo, xT, acc)
                tl.store(part_ptr + offs_m * NB + kb, tl.max(tl.abs(acc), axis=0), mask=row_ok)
                xt = tl.trans(acc)
            else:
                x = tl.load(x_ptr + offs_m[:, None] * stride_x + src[None, :], mask=row_ok[:, None], other=0.0)
                xt = tl.dot(x, rhi)
                if SPLIT:
                    xt = tl.dot(x, rlo, xt)
                tl.store(part_ptr + offs_m * NB + kb, tl.max(tl.abs(xt), axis=1), mask=row_ok)
            tl.store(out_ptr + offs_m[:, None] * K + offs_c[None, :], xt, mask=row_ok[:, None])


def run_split_bf16(args) -> list:
    dev = torch.device("cuda")
    rows = []
    for name, n, k, m, tm in (("llm down", 2048, 16384, 800, True), ("llm o (x^T given)", 2048, 2048, 800, True),
                              ("expert down", 1024, 4096, 50, True), ("expert o", 1024, 2048, 50, False)):
        lay = make_layers(n, k, 1, dev)[0]
        x0 = make_input(m, k, dev)
        xs = x0.t().contiguous() if tm else x0
        cfg = W.pick_config(m, n, k, W.MODE_DYNAMIC)
        nb = k // 64
        vals = torch.empty((m, k), device=dev, dtype=torch.float32)
        part = torch.empty((m, nb), device=dev, dtype=torch.float32)
        bmp0, g0 = cfg["BMP"], cfg["G"]
        tiles0 = max(1, min(cfg.get("TILES", 1), triton.cdiv(m, bmp0)))

        def shipped(_x, bmp=bmp0, tiles=tiles0, g=g0, st=cfg.get("prep_stages", 2), w=cfg["prep_warps"]):
            W._prep_kernel[(nb // g, triton.cdiv(m, bmp * tiles))](
                xs, xs.stride(0), m, k, lay["perm"], lay["r_in"], lay["r_in"], lay["r_in"], vals, part, NB=nb,
                QMIN=-128, QMAX=127, MODE=W.MODE_DYNAMIC, G=g, BMP=bmp, TILES=tiles, STAGES=st, B=64, HAS_PERM=True,
                HAS_SMOOTH=False, PREC="tf32", XLOAD=2 if tm else 0, PDL=False, PDL_WAIT=False, num_warps=w)
        shipped(None)
        ref_v = vals.clone()
        row = {"name": name, "N": n, "K": k, "M": m, "shipped_prep_s": graph_time([shipped] * 8, xs, args.repeats),
               "variants": []}
        grid_opts = (((1, 64, 4), (1, 128, 2), (2, 64, 2), (1, 64, 2), (1, 128, 1)) if m >= 256
                     else ((1, 16, 1), (1, 32, 1), (1, 64, 1), (2, 16, 1)))
        for split in (True, False):
            for g, bmp, tiles in grid_opts:
                for warps in (4, 8):
                    tiles_ = max(1, min(tiles, triton.cdiv(m, bmp)))

                    def alt(_x, g=g, bmp=bmp, tiles=tiles_, warps=warps, split=split):
                        _prep16_kernel[(nb // g, triton.cdiv(m, bmp * tiles))](
                            xs, xs.stride(0), m, k, lay["perm"], lay["r_in"], vals, part, NB=nb, G=g, BMP=bmp,
                            TILES=tiles, STAGES=3, B=64, XT=tm, SPLIT=split, num_warps=warps)
                    alt(None)
                    row["variants"].append({"split": split, "G": g, "BMP": bmp, "TILES": tiles_, "warps": warps,
                                            "s": graph_time([alt] * 8, xs, args.repeats),
                                            "max_rel_diff_values": float((vals - ref_v).abs().max() / ref_v.abs().max())})
        for split in (True, False):
            best = min((v for v in row["variants"] if v["split"] == split), key=lambda v: v["s"])
            print(f"{name} M={m}: shipped prep {row['shipped_prep_s'] * 1e6:.1f} us; "
                  f"{'R_hi + R_lo' if split else 'one bf16 R'}: best {best['s'] * 1e6:.1f} us, "
                  f"value diff {best['max_rel_diff_values']:.1e}", flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- floor: what bounds down_proj's launches
@triton.jit
def _read_kernel(x_ptr, stride_x, M, perm_ptr, part_ptr, NB: tl.constexpr, BMP: tl.constexpr, TILES: tl.constexpr,
                 STAGES: tl.constexpr, B: tl.constexpr, HAS_PERM: tl.constexpr):
    kb = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_c = kb * B + tl.arange(0, B)
    src = tl.load(perm_ptr + offs_c) if HAS_PERM else offs_c
    for t in tl.range(0, TILES, num_stages=STAGES):
        offs_m = (pid_m * TILES + t) * BMP + tl.arange(0, BMP)
        row_ok = offs_m < M
        x = tl.load(x_ptr + src[:, None] * stride_x + offs_m[None, :], mask=row_ok[None, :], other=0.0)
        tl.store(part_ptr + offs_m * NB + kb, tl.max(tl.abs(x.to(tl.float32)), axis=0), mask=row_ok)


def run_floor(args) -> dict:
    dev = torch.device("cuda")
    n, k, m = 2048, 16384, 800
    lay = make_layers(n, k, 1, dev)[0]
    xT = make_input(m, k, dev).t().contiguous()  # (K, M): the token-minor input as the prep reads it
    nb = k // 64
    part = torch.empty((m, nb), device=dev, dtype=torch.float32)
    res = {"N": n, "K": k, "M": m, "copy_x_s": graph_time([lambda _x: xT.clone()] * 8, xT, args.repeats)}
    for perm in (True, False):
        for bmp, tiles in ((64, 4), (128, 2), (256, 1), (64, 1), (128, 1)):
            def rd(_x, bmp=bmp, tiles=tiles, perm=perm):
                _read_kernel[(nb, triton.cdiv(m, bmp * tiles))](xT, xT.stride(0), m, lay["perm"], part, NB=nb, BMP=bmp,
                                                               TILES=tiles, STAGES=3, B=64, HAS_PERM=perm, num_warps=4)
            res[f"read_perm{int(perm)}_bmp{bmp}_t{tiles}_s"] = graph_time([rd] * 8, xT, args.repeats)
    bkd = W.gemm_tiling(k, W.pick_config(m, n, k, W.MODE_DYNAMIC))[0]
    codes = torch.empty((m, k), device=dev, dtype=torch.int8)
    tok = torch.empty((m,), device=dev, dtype=torch.float32)
    for name, vdt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        vals = torch.empty((m, k), device=dev, dtype=vdt)

        def prep(_x, vals=vals):
            W._prep_kernel[(nb, triton.cdiv(m, 64 * 4))](
                xT, xT.stride(0), m, k, lay["perm"], lay["r_in"], lay["r_in"], lay["r_in"], vals, part, NB=nb,
                QMIN=-128, QMAX=127, MODE=W.MODE_DYNAMIC, G=1, BMP=64, TILES=4, STAGES=3, B=64, HAS_PERM=True,
                HAS_SMOOTH=False, PREC="tf32", XLOAD=2, PDL=False, PDL_WAIT=False, num_warps=4)

        def quant(_x, vals=vals):
            W._quant_kernel[(triton.cdiv(m, 4), k // (256 * 4))](
                vals, part, codes, tok, m, K=k, NB=nb, NB_P2=nb, QMIN=-128, QMAX=127, BMQ=4, BKQ=256, QCH=4, PDL=False,
                BKD=bkd, RUNS=True, num_warps=4)
        res[f"prep_{name}_s"] = graph_time([prep] * 8, xT, args.repeats)
        res[f"quant_{name}_s"] = graph_time([quant] * 8, xT, args.repeats)
        res[f"prep_quant_{name}_s"] = graph_time([prep, quant] * 4, xT, args.repeats) * 2
    for key, v in res.items():
        print(f"{key}: {v * 1e6:.1f} us" if key.endswith("_s") else f"{key}: {v}", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=("fused", "recompute", "split-bf16", "floor"))
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/probe_<probe>.json)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--l2-bytes", type=int, default=120 << 20)
    args = ap.parse_args(argv)
    run = {"fused": run_fused, "recompute": run_recompute, "split-bf16": run_split_bf16, "floor": run_floor}[args.probe]
    out = Path(args.out or f"benchmarks/results/probe_{args.probe.replace('-', '_')}.json")
    write_results(out, {"probe": args.probe, "results": run(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
