"""Probe: the dynamic prep's rotation as two bf16 dots (R = R_hi + R_lo) instead of one tf32 dot.

    PYTHONPATH=. python3 benchmarks/probe_prep16.py [--out FILE] [--repeats N]

tf32 wgmma takes only K-major operands, so a tile of x^T (channels x tokens, tokens contiguous)
must be transposed (and widened to float32) before the shipped prep's dot. 16-bit wgmma takes
either layout: with the fp16 rotation split exactly into two bf16 parts, x (bf16) @ R is two
bf16 dots with exact products and float32 sums. Times the prep launch alone (shipped vs the
split form; and one bf16 R, lossy, as the bound) and reports the largest difference of the
rotated values. Writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from runtime_gpu import graph_time  # noqa: E402
from sweep_w4a8 import make_input, make_layers  # noqa: E402
from duquant_runtime.kernels import w4a8 as W  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/probe_prep16.json")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name, n, k, m, tm in (("llm down", 2048, 16384, 800, True), ("llm o (x^T given)", 2048, 2048, 800, True),
                              ("expert down", 1024, 4096, 50, True), ("expert o", 1024, 2048, 50, False)):
        lay = make_layers(n, k, 1, dev)[0]
        x0 = make_input(m, k, dev)
        xs = x0.t().contiguous() if tm else x0  # what the prep reads: x^T (K, M) or x (M, K)
        cfg = W.pick_config(m, n, k, W.MODE_DYNAMIC)
        nb = k // 64
        vals = torch.empty((m, k), device=dev, dtype=torch.float32)
        part = torch.empty((m, nb), device=dev, dtype=torch.float32)
        bmp0 = cfg["BMP"]
        tiles0 = max(1, min(cfg.get("TILES", 1), triton.cdiv(m, bmp0)))
        g0 = cfg["G"]
        xload = 2 if tm else 0

        def shipped(_x, bmp=bmp0, tiles=tiles0, g=g0, st=cfg.get("prep_stages", 2), w=cfg["prep_warps"]):
            W._prep_kernel[(nb // g, triton.cdiv(m, bmp * tiles))](
                xs, xs.stride(0), m, k, lay["perm"], lay["r_in"], lay["r_in"], lay["r_in"], vals, part, NB=nb,
                QMIN=-128, QMAX=127, MODE=W.MODE_DYNAMIC, G=g, BMP=bmp, TILES=tiles, STAGES=st, B=64, HAS_PERM=True,
                HAS_SMOOTH=False, PREC="tf32", XLOAD=xload, PDL=False, PDL_WAIT=False, num_warps=w)
        shipped(None)
        ref_v, ref_p = vals.clone(), part.clone()
        row = {"name": name, "N": n, "K": k, "M": m, "x_transposed": tm, "shipped_cfg": [g0, bmp0, tiles0],
               "shipped_s": graph_time([shipped] * 8, xs, args.repeats), "variants": []}
        print(f"{name}: shipped prep {row['shipped_s'] * 1e6:.1f} us", flush=True)
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
                    try:
                        alt(None)
                        dv = float((vals - ref_v).abs().max() / ref_v.abs().max())
                        dp = float((part - ref_p).abs().max() / ref_p.abs().max())
                        t = graph_time([alt] * 8, xs, args.repeats)
                    except Exception as err:
                        print(f"  {(split, g, bmp, tiles, warps)}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                        continue
                    row["variants"].append({"split": split, "G": g, "BMP": bmp, "TILES": tiles_, "warps": warps,
                                            "s": t, "max_rel_diff_values": dv, "max_rel_diff_absmax": dp})
                    print(f"  split={split} G={g} BMP={bmp} TILES={tiles_} warps={warps}: {t * 1e6:.1f} us "
                          f"diff {dv:.2e}/{dp:.2e}", flush=True)
        rows.append(row)
    write_results(Path(args.out), {"probe": "prep16", "rows": rows})


if __name__ == "__main__":
    main()
