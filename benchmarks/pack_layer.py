"""Benchmark: pack one full-size pi0.5 LLM decoder layer and one action-expert layer.

    python benchmarks/pack_layer.py [--repeats 3] [--jobs 1,2] [--out benchmarks/results/pack_layer.json]

Synthesizes (in a temporary directory) exactly the 14 linears of decoder layer 0 of the language
model (7 linears, 110,100,480 weights) and of the action expert (7 linears, 16,777,216 weights) at
full size, then times `build_pack` per layer set and job count (median of --repeats fresh builds).

The baseline, measured in the same run, is the openpi_duquant algorithm's cost: a full SVD per
block (`torch.linalg.svd(..., full_matrices=True)` of W[:, block]^T for R_in and of W[rows, :] for
R_out, as that code does). Full runs take hours, so per linear and per rotation kind the first
--baseline-blocks blocks are timed and the time is extrapolated to all blocks (the blocks of one
kind have identical shapes); the scale search, the same in both, is not included.

Writes JSON (machine, settings, per-run seconds, medians, weights/s, speed-up vs the baseline).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import machine_info
from results_file import write_results

from duquant_pack.build import build_pack
from duquant_pack.checkpoint import Checkpoint
from duquant_pack.config import resolve
from duquant_pack.synth import write_synth

LLM = r"language_model\.layers\.0\.(self_attn|mlp)\.[a-z_]+_proj\.weight$"
EXPERT = r"gemma_expert\.model\.layers\.0\.(self_attn|mlp)\.[a-z_]+_proj\.weight$"
SETS = {"llm_layer": LLM, "expert_layer": EXPERT}


def old_block_svd_seconds(w: torch.Tensor, block: int, max_blocks: int) -> dict:
    """Time the old code's full SVDs on the first blocks of W (float32), extrapolate to all blocks."""
    out_f, in_f = w.shape
    res = {}
    for kind, n_blocks, get in (
            ("r_in", -(-in_f // block), lambda b: w[:, b * block:(b + 1) * block].t().contiguous()),
            ("r_out", -(-out_f // block), lambda b: w[b * block:(b + 1) * block, :].contiguous())):
        k = min(max_blocks, n_blocks)
        t0 = time.perf_counter()
        for b in range(k):
            torch.linalg.svd(get(b), full_matrices=True)
        dt = time.perf_counter() - t0
        res[kind] = {"blocks": n_blocks, "timed_blocks": k, "timed_seconds": dt,
                     "estimated_seconds": dt / k * n_blocks}
    res["estimated_seconds"] = res["r_in"]["estimated_seconds"] + res["r_out"]["estimated_seconds"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", default="1,2", help="comma-separated job counts")
    ap.add_argument("--baseline-blocks", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pack_layer.json"))
    args = ap.parse_args(argv)
    jobs_list = [int(j) for j in args.jobs.split(",")]

    cfg, _ = resolve("pi05-llm-expert")
    report = {"benchmark": "pack_layer", "machine": machine_info(),
        "config": {"preset": "pi05-llm-expert", "block": cfg.block, "row_rot": cfg.row_rot, "scale": cfg.scale},
        "repeats": args.repeats, "sets": {}}
    with tempfile.TemporaryDirectory(prefix="duquant-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_synth(tmp / "ckpt", "pi05", layers=1, include=f"{LLM}|{EXPERT}")
        report["synth_seconds"] = time.perf_counter() - t0
        ckpt = Checkpoint(tmp / "ckpt")
        for set_name, regex in SETS.items():
            set_cfg, _ = resolve("pi05-llm-expert", include=regex.replace(r"\.weight$", "$"))
            keys = [k for k in ckpt.names() if __import__("re").search(regex, k)]
            weights = sum(ckpt.info(k).shape[0] * ckpt.info(k).shape[1] for k in keys)
            entry = {"linears": len(keys), "weights": weights, "runs": {}}
            for jobs in jobs_list:
                secs = []
                for _ in range(args.repeats):
                    out = tmp / f"pack-{set_name}-{jobs}"
                    shutil.rmtree(out, ignore_errors=True)
                    t = time.perf_counter()
                    s = build_pack(tmp / "ckpt", out, set_cfg, jobs=jobs, progress=False)
                    secs.append(time.perf_counter() - t)
                    assert s.layers == len(keys) and s.computed == len(keys)
                med = statistics.median(secs)
                entry["runs"][f"jobs{jobs}"] = {"seconds": secs, "median_seconds": med,
                                                "weights_per_second": weights / med}
                print(f"{set_name:13s} jobs={jobs}: median {med:.2f} s over {args.repeats} "
                      f"({weights / med / 1e6:.1f} M weights/s)", file=sys.stderr)
            base_total = 0.0
            per_linear = {}
            for k in keys:
                w = ckpt.read_weight(k)
                b = old_block_svd_seconds(w, cfg.block, args.baseline_blocks)
                per_linear[k] = b
                base_total += b["estimated_seconds"]
            entry["baseline_full_svd"] = {"estimated_seconds_single_process": base_total, "per_linear": per_linear}
            best = min(r["median_seconds"] for r in entry["runs"].values())
            entry["speedup_vs_baseline"] = base_total / best
            print(f"{set_name:13s} old full-SVD estimate: {base_total:.0f} s -> speed-up {base_total / best:.0f}x",
                  file=sys.stderr)
            report["sets"][set_name] = entry
    report["peak_rss_mib"] = {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    write_results(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
