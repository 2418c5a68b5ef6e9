"""Probe: what bounds the dynamic activation launches of LLM down_proj (M = 800, K = 16384).

    PYTHONPATH=. python3 benchmarks/probe_prep_floor.py [--out FILE] [--repeats N]

Times, on x^T (K, M) bf16 as the token-minor path reads it: a copy of x (torch), a read of x
through the permutation that stores only per-(token, block) maxima (no rotation), the same
without the permutation, the shipped prep (rotation, float32 values), the shipped prep storing
bf16 values, and the quantize launch reading float32 vs bf16 values. Writes JSON.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/probe_prep_floor.json")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    dev = torch.device("cuda")
    n, k, m = 2048, 16384, 800
    lay = make_layers(n, k, 1, dev)[0]
    xT = make_input(m, k, dev).t().contiguous()  # (K, M)
    nb = k // 64
    part = torch.empty((m, nb), device=dev, dtype=torch.float32)
    res = {"N": n, "K": k, "M": m}
    res["copy_x_s"] = graph_time([lambda _x: xT.clone()] * 8, xT, args.repeats)
    for perm in (True, False):
        for bmp, tiles in ((64, 4), (128, 2), (256, 1), (64, 1), (128, 1)):
            def rd(_x, bmp=bmp, tiles=tiles, perm=perm):
                _read_kernel[(nb, triton.cdiv(m, bmp * tiles))](xT, xT.stride(0), m, lay["perm"], part, NB=nb, BMP=bmp,
                                                               TILES=tiles, STAGES=3, B=64, HAS_PERM=perm, num_warps=4)
            res[f"read_perm{int(perm)}_bmp{bmp}_t{tiles}_s"] = graph_time([rd] * 8, xT, args.repeats)
    cfg = W.pick_config(m, n, k, W.MODE_DYNAMIC)
    bkd = W.gemm_tiling(k, cfg)[0]
    for vdt in (torch.float32, torch.bfloat16):
        vals = torch.empty((m, k), device=dev, dtype=vdt)

        def prep(_x, vals=vals):
            W._prep_kernel[(nb, triton.cdiv(m, 64 * 4))](
                xT, xT.stride(0), m, k, lay["perm"], lay["r_in"], lay["r_in"], lay["r_in"], vals, part, NB=nb,
                QMIN=-128, QMAX=127, MODE=W.MODE_DYNAMIC, G=1, BMP=64, TILES=4, STAGES=3, B=64, HAS_PERM=True,
                HAS_SMOOTH=False, PREC="tf32", XLOAD=2, PDL=False, PDL_WAIT=False, num_warps=4)
        codes = torch.empty((m, k), device=dev, dtype=torch.int8)
        tok = torch.empty((m,), device=dev, dtype=torch.float32)

        def quant(_x, vals=vals):
            W._quant_kernel[(triton.cdiv(m, 4), k // (256 * 4))](
                vals, part, codes, tok, m, K=k, NB=nb, NB_P2=nb, QMIN=-128, QMAX=127, BMQ=4, BKQ=256, QCH=4, PDL=False,
                BKD=bkd, RUNS=True, num_warps=4)
        name = "f32" if vdt == torch.float32 else "bf16"
        try:
            res[f"prep_{name}_s"] = graph_time([prep] * 8, xT, args.repeats)
            res[f"quant_{name}_s"] = graph_time([quant] * 8, xT, args.repeats)
            res[f"prep_quant_{name}_s"] = graph_time([prep, quant] * 4, xT, args.repeats) * 2
        except Exception as err:
            res[f"error_{name}"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    for key, v in res.items():
        print(f"{key}: {v * 1e6:.1f} us" if isinstance(v, float) else f"{key}: {v}", flush=True)
    write_results(Path(args.out), {"probe": "prep_floor", **res})


if __name__ == "__main__":
    main()
