"""Stage breakdown of the W4 GPU kernels (kernels/w4a8.py) on the pi0.5 shapes, with the ceilings
they are judged against.

    PYTHONPATH=. python3 benchmarks/stages_w4a8.py [--out FILE] [--only llm:gate/up:800,...] [--repeats N]

Per shape (N out, K in) and token count M, timed as CUDA-graph replays in one run (median of
--repeats; each replay calls enough layer instances that the weights exceed the L2 cache):
- bf16 `nn.Linear` (the baseline);
- per activation mode (dynamic, static): the activation launches alone (`prepare_activation`)
  for `pick_config`'s choice and prep variants (rows per program BMP, row tiles per program
  TILES, reading x through the permutation, gathered beforehand or transposed: XLOAD; for dynamic
  activations the quantize launch's rows BMQ and column chunks QCH); the GEMM launch alone with
  split-K variants (small N at large M); the whole `w4_linear` with the picked and the best
  ("tuned") configuration, and without programmatic dependent launch, with its error against the
  float32 reference;
- at M >= 64: `torch._int_mm` (cuBLAS int8 x int8 -> int32, weights held as int8) as the
  int8 tensor-core ceiling of an unfused design;
- once: the time of an empty Triton launch inside a CUDA graph (the per-launch floor).
Writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from runtime_gpu import graph_time  # noqa: E402
from sweep_w4a8 import make_input, make_layers, reference, safe_time  # noqa: E402
from w4a8_cases import add_common_args, instances, selected_shapes  # noqa: E402
from duquant_runtime.kernels import w4a8 as K  # noqa: E402


@triton.jit
def _noop_kernel(p):
    tl.store(p + tl.program_id(0), 1.0)


def launch_floor(repeats: int) -> float:
    buf = torch.zeros(16, device="cuda")
    return graph_time([lambda x: _noop_kernel[(1,)](buf)] * 32, buf, repeats)


def bench(tower, name, n, k, m, args) -> dict:
    dev = torch.device("cuda")
    count = instances(n, k, args.l2_bytes)
    layers = make_layers(n, k, count, dev)
    x = make_input(m, k, dev)
    lins = [nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16) for _ in range(count)]
    res = {"tower": tower, "name": name, "N": n, "K": k, "M": m, "instances": count,
           "bf16_s": graph_time(lins, x, args.repeats)}
    del lins
    line = [f"{tower:6s} {name:8s} N={n:5d} K={k:5d} M={m:3d}: bf16 {res['bf16_s'] * 1e6:6.1f}"]
    if m >= 64:
        w8 = [torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8) for _ in range(count)]
        xa = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
        res["int_mm_s"] = safe_time([lambda a, w=w: torch._int_mm(a, w.t()) for w in w8], xa, args.repeats)
        line.append(f"_int_mm {res['int_mm_s'] * 1e6:6.1f}")
        del w8
    for mode_name, mode in (("dynamic", K.MODE_DYNAMIC), ("static", K.MODE_STATIC)):
        base = K.pick_config(m, n, k, mode)
        r = {"picked": base}
        with torch.no_grad():
            ref = reference(x, layers[0], mode)

        def prep(lay, cfg):
            return lambda a: K.prepare_activation(a, r_in=lay["r_in"], perm=lay["perm"], smooth=None, mode=mode,
                                                  act_scale=lay["act_scale"], cfg=cfg)

        def full(lay, cfg):
            return lambda a: K.w4_linear(a, qweight=lay["qweight"], w_scale=lay["w_scale"], r_in=lay["r_in"],
                                         perm=lay["perm"], r_out=lay["r_out"], bias=None, smooth=None, mode=mode,
                                         act_scale=lay["act_scale"], config=cfg)

        def best_of(variants, key):
            rows = []
            for v in variants:
                cfg = {**base, **v}
                t = safe_time([prep(lay, cfg) for lay in layers], x, args.repeats)
                if t is not None:
                    rows.append({"variant": v, "s": t})
            r[key] = rows
            return min(rows, key=lambda row: row["s"]) if rows else {"variant": {}, "s": None}

        pv = [{}]  # the picked configuration first
        if not args.quick:
            for xl in (("gather", "index_select", "transpose") if m >= 64 else ("gather",)):
                for bmp in ((64, 128) if m >= 256 else (16, 32, 64) if m > 1 else (16,)):
                    for tiles in ((1, 4) if m >= 256 else (1,)):
                        pv.append(dict(XLOAD=xl, BMP=bmp, TILES=tiles, prep_warps=4 if bmp <= 64 else 8,
                                       prep_stages=3))
        bp = best_of(pv, "prep_variants")
        if mode == K.MODE_DYNAMIC and not args.quick:
            bp = best_of([bp["variant"]] + [{**bp["variant"], "QCH": q, "BMQ": bq}
                                            for q in (1, 4, 16) for bq in (4, 16)], "quant_variants")
        tuned = {**base, **bp["variant"]}
        with torch.no_grad():
            a, ts = K.prepare_activation(x, r_in=layers[0]["r_in"], perm=layers[0]["perm"], smooth=None, mode=mode,
                                         act_scale=layers[0]["act_scale"], cfg=tuned)
        gemm = []
        for sp in ((1, 2, 4) if m >= 64 and n <= 2048 and not args.quick else (base.get("SPLIT", 1),)):
            cfg = {**tuned, "SPLIT": sp}
            t = safe_time([lambda _a, lay=lay, cfg=cfg: K.w4_gemm(a, ts, qweight=lay["qweight"], w_scale=lay["w_scale"],
                                                                  r_out=lay["r_out"], bias=None,
                                                                  out_dtype=torch.bfloat16, cfg=cfg)
                           for lay in layers], x, args.repeats)
            if t is not None:
                gemm.append({"SPLIT": sp, "s": t})
        r["gemm_variants"] = gemm
        if gemm:
            tuned["SPLIT"] = min(gemm, key=lambda row: row["s"])["SPLIT"]
        r["tuned"] = tuned
        for label, cfg in (("picked", base), ("tuned", tuned), ("picked_nopdl", {**base, "PDL": False})):
            r[f"full_{label}_s"] = safe_time([full(lay, cfg) for lay in layers], x, args.repeats)
            with torch.no_grad():
                r[f"full_{label}_err"] = float((full(layers[0], cfg)(x).float() - ref).norm() / ref.norm())
        res[mode_name] = r
        us = lambda v: f"{v * 1e6:.1f}" if v else "-"  # noqa: E731
        line.append(f"\n   {mode_name:7s} prep {us(r['prep_variants'][0]['s'])} -> {us(bp['s'])} {bp['variant']} | "
                    f"gemm " + " ".join(f"split{g['SPLIT']} {us(g['s'])}" for g in gemm) +
                    f" | full picked {us(r['full_picked_s'])} ({r['full_picked_s'] / res['bf16_s']:.2f}x) "
                    f"tuned {us(r['full_tuned_s'])} ({r['full_tuned_s'] / res['bf16_s']:.2f}x) "
                    f"no-PDL {us(r['full_picked_nopdl_s'])} "
                    f"err {r['full_picked_err']:.1e}/{r['full_tuned_err']:.1e}")
    print(" ".join(line), flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "benchmarks/results/stages_w4a8.json", 7)
    ap.add_argument("--quick", action="store_true", help="only the picked configuration (no variants)")
    args = ap.parse_args(argv)
    shapes = selected_shapes(ap, args.only)
    result = {"benchmark": "stages_w4a8", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "launch_floor_s": launch_floor(args.repeats), "shapes": []}
    print(f"empty Triton launch in a CUDA graph: {result['launch_floor_s'] * 1e6:.2f} us", flush=True)
    for tower, name, n, k, m in shapes:
        result["shapes"].append(bench(tower, name, n, k, m, args))
        torch.cuda.empty_cache()
        write_results(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
