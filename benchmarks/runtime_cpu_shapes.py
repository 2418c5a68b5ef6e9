"""Benchmark: the pi0.5 linear shapes on the CPU (figures only, no targets).

    python benchmarks/runtime_cpu_shapes.py [--repeats 5] [--out FILE]

The same workload as benchmarks/runtime_gpu.py: the language model's q/k/v/o/gate/up/down at
M = 800 and M = 1, the action expert's at M = 50, and the `sample_actions` total (LLM set once at
M = 800 + expert set ten times at M = 50). Per shape, median of --repeats calls after one
warm-up, in this process with torch's default threads:
- bf16 and float32 `nn.Linear`;
- old-style fake quantization (runtime_gpu.OldFakeQuant: bf16 fake-quantized W_t, unfused
  transforms);
- ours: `DuQuantLinear` W4A8, the CPU reference path, dynamic (per token) and static (per
  channel, calibrated on one call);
- the low-bit GEMMs torch offers on the CPU, for scale (the GEMM alone, no transforms):
  `torch._int_mm` (int8 x int8 -> int32) and `torch._weight_int4pack_mm_for_cpu` (int4
  weights, bf16 activations, group 128).
Writes JSON (per shape and total) and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402
from results_file import write_results  # noqa: E402
from runtime_gpu import EXPERT, LLM, OldFakeQuant, activations, random_layer  # noqa: E402

from duquant_runtime import DuQuantLinear  # noqa: E402

VARIANTS = ("bf16", "fp32", "old_fakequant", "ours_dynamic", "ours_static", "int8_mm", "int4_mm")
INT4_GROUP = 128


def median_seconds(fn, x, repeats: int) -> float:
    with torch.no_grad():
        fn(x)  # warm-up
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def shape_fns(out_f: int, in_f: int, m: int, seed: int) -> tuple[dict, torch.Tensor]:
    """The callables of every variant for one shape, and its bf16 input (m, in_f)."""
    lin, lp, w_fq = random_layer(out_f, in_f, seed, "cpu")
    x = activations(m, in_f, seed + 1, "cpu")
    lin32 = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin32.weight.copy_(lin.weight.float())
    dyn = DuQuantLinear.from_linear(lin, lp, abits=8, act_mode="dynamic")
    sta = DuQuantLinear.from_linear(lin, lp, abits=8, act_mode="static", calib_steps=1)
    with torch.no_grad():
        sta(x)  # calibrates the static scales
    old = OldFakeQuant(sta, w_fq)
    a8 = torch.randint(-127, 128, (m, in_f), dtype=torch.int8)
    w8 = torch.randint(-8, 8, (in_f, out_f), dtype=torch.int8)
    w4 = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (out_f, in_f), dtype=torch.int32), 8)
    sz = torch.ones(in_f // INT4_GROUP, out_f, 2, dtype=torch.bfloat16)
    fns = {
        "bf16": lin,
        "fp32": lambda v: lin32(v.float()),
        "old_fakequant": old,
        "ours_dynamic": dyn,
        "ours_static": sta,
        "int8_mm": lambda v: torch._int_mm(a8, w8),
        "int4_mm": lambda v: torch._weight_int4pack_mm_for_cpu(v, w4, INT4_GROUP, sz),
    }
    return fns, x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime_cpu_shapes.json"))
    args = ap.parse_args(argv)
    work = [("llm", LLM, 800), ("llm", LLM, 1), ("expert", EXPERT, 50)]
    report = {"benchmark": "runtime_cpu_shapes", "machine": machine_info(), "repeats": args.repeats,
              "shapes": []}
    seed = 0
    for tower, layers, m in work:
        for name, out_f, in_f in layers:
            seed += 10
            fns, x = shape_fns(out_f, in_f, m, seed)
            row = {"tower": tower, "name": name, "out": out_f, "in": in_f, "M": m}
            for v in VARIANTS:
                row[f"{v}_s"] = median_seconds(fns[v], x, args.repeats)
            row["ratio_dynamic"] = row["ours_dynamic_s"] / row["bf16_s"]
            row["ratio_static"] = row["ours_static_s"] / row["bf16_s"]
            report["shapes"].append(row)
            print(f"{tower:<6} {name:<9} M={m:<4} " + "  ".join(f"{v} {row[f'{v}_s'] * 1e3:8.2f} ms" for v in VARIANTS),
                  flush=True)
    total = {}
    for v in VARIANTS:
        llm = sum(r[f"{v}_s"] for r in report["shapes"] if r["tower"] == "llm" and r["M"] == 800)
        exp = sum(r[f"{v}_s"] for r in report["shapes"] if r["tower"] == "expert")
        total[f"{v}_s"] = llm + 10 * exp
    for v in VARIANTS:
        total[f"ratio_{v}"] = total[f"{v}_s"] / total["bf16_s"]
    report["total_sample_actions"] = total
    write_results(args.out, report)
    print("\nsample_actions linears (LLM set at M=800 once + expert set at M=50 x10):")
    for v in VARIANTS:
        print(f"  {v:<14} {total[f'{v}_s'] * 1e3:9.1f} ms  ({total[f'ratio_{v}']:.2f}x bf16)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
