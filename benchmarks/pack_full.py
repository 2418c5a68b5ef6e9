"""Benchmark: build the whole pi0.5 pack (pi05-llm-expert: 252 linears, 2,293,235,712 weights).

    python benchmarks/pack_full.py --ckpt /tmp/pi05-full [--runs cpu:1,cpu:2,cuda] [--repeats 3] \
        [--cold] [--out benchmarks/results/pack_full.json]

`--ckpt` is a full-size synthetic checkpoint (`duquant-pack synth --arch pi05 --out DIR`, 7.2 GB);
without it one is synthesized into --workdir first (about 2.5 minutes on 2 cores).

Per run kind (`cpu:J` = J worker processes, `cuda` = the GPU build) and repeat, from a warm page
cache (the checkpoint is read once before): wall seconds of a fresh `build_pack`, weights/s and
the peak RSS of the whole process tree (driver + workers, sampled every 20 ms). `--cold` adds one
run per kind after evicting the checkpoint's pages (posix_fadvise DONTNEED; a VM's host may still
cache them). Also, in the same run:

- the old approach (openpi_duquant: a full SVD per block for R_in and R_out), estimated by timing
  `--baseline-blocks` blocks of every distinct weight shape and extrapolating to all 252 layers;
- a lower bound: the bytes the build must read (each selected weight once) over the measured read
  bandwidth, and its FLOPs (float64 Gram matrices of input and output blocks, float32 block
  transforms) over the measured matrix-multiply rates of this machine with all its cores;
- incremental rebuilds: `--abits` changed (no layer recomputed) and the layer set grown.

Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402
from results_file import write_results  # noqa: E402
from pack_layer import old_block_svd_seconds  # noqa: E402
from rss import TreeRSS  # noqa: E402

from duquant_pack.parallel import limit_malloc_arenas
from duquant_pack.build import build_pack  # noqa: E402
from duquant_pack.checkpoint import Checkpoint  # noqa: E402
from duquant_pack.config import resolve  # noqa: E402
from duquant_pack.selection import select_layers  # noqa: E402
from duquant_pack.synth import write_synth  # noqa: E402

PRESET = "pi05-llm-expert"
SELECTED_RE = r"(language_model|gemma_expert\.model)\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight$"


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (clean pages only; best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_seconds(ckpt: Checkpoint, keys: list[str]) -> tuple[float, int]:
    """Time to read the selected tensors once (pread into fresh buffers), and their bytes."""
    t0 = time.perf_counter()
    n = 0
    for k in keys:
        n += ckpt.read(k).numel() * 2
    return time.perf_counter() - t0, n


def matmul_rate(dtype: torch.dtype, n: int = 2048) -> float:
    """Peak FLOP/s of this CPU: best of 5 (n x n) @ (n x n) products with all threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def baseline_seconds(ckpt: Checkpoint, selected, block: int, blocks: int) -> dict:
    """The old full-SVD approach, timed on `blocks` blocks per distinct shape, extrapolated."""
    shapes = Counter((s.out_features, s.in_features) for s in selected)
    example = {}
    for s in selected:
        example.setdefault((s.out_features, s.in_features), s.key)
    per_shape, total = {}, 0.0
    for shape, count in sorted(shapes.items()):
        b = old_block_svd_seconds(ckpt.read_weight(example[shape]), block, blocks)
        per_shape[f"{shape[0]}x{shape[1]}"] = {"layers": count, "seconds_per_layer": b["estimated_seconds"]}
        total += count * b["estimated_seconds"]
    return {"estimated_seconds_single_process": total, "per_shape": per_shape, "timed_blocks_per_kind": blocks}


def one_build(ckpt_dir: Path, out: Path, cfg, kind: str, jobs: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    device = "cuda" if kind == "cuda" else "cpu"
    with TreeRSS() as rss:
        t0 = time.perf_counter()
        s = build_pack(ckpt_dir, out, cfg, preset=PRESET, jobs=jobs, device=device, progress=False)
        secs = time.perf_counter() - t0
    assert s.computed == s.layers
    return {"seconds": secs, "peak_rss_bytes": rss.peak_bytes, "layers": s.layers, "weights": s.weights,
            "pack_bytes": s.pack_bytes}


def compare_packs(a: Path, b: Path) -> dict:
    """Largest differences between two packs of the same config (e.g. CPU vs CUDA): rotations (max
    abs), scales (max relative, and the fraction of rows whose MSE search chose another clipping
    ratio: relative difference >= 1e-5), stored integers (fraction differing, where both store them)."""
    from duquant_runtime import load_pack
    pa, pb = load_pack(a), load_pack(b)
    d = {"perm_equal": True, "r_in_max_abs": 0.0, "r_out_max_abs": 0.0, "scale_max_rel": 0.0}
    rows = rows_diff = 0
    q_total = q_diff = 0
    for name in pa.layer_names:
        x, y = pa.layer(name), pb.layer(name)
        d["perm_equal"] &= (x.perm is None and y.perm is None) or bool(torch.equal(x.perm, y.perm))
        d["r_in_max_abs"] = max(d["r_in_max_abs"], float((x.r_in - y.r_in).abs().max()))
        if x.r_out is not None:
            d["r_out_max_abs"] = max(d["r_out_max_abs"], float((x.r_out - y.r_out).abs().max()))
        if x.weight_scale is not None:
            rel = ((x.weight_scale - y.weight_scale) / x.weight_scale).abs()
            d["scale_max_rel"] = max(d["scale_max_rel"], float(rel.max()))
            rows += rel.numel()
            rows_diff += int((rel >= 1e-5).sum())
        if getattr(x, "qweight", None) is not None and getattr(y, "qweight", None) is not None:
            q_total += x.qweight.numel()
            q_diff += int((x.qweight != y.qweight).sum())
    d["scale_rows_other_ratio_fraction"] = rows_diff / max(rows, 1)
    if q_total:
        d["qweight_bytes_differing_fraction"] = q_diff / q_total
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, help="full-size pi0.5 checkpoint directory (else synthesized)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/duquant-pack-full"))
    ap.add_argument("--runs", default="cpu:1,cpu:2", help="comma-separated: cpu:JOBS or cuda[:THREADS]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also one run per kind after evicting the page cache")
    ap.add_argument("--baseline-blocks", type=int, default=1)
    ap.add_argument("--no-incremental", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the old-approach estimate")
    ap.add_argument("--synth-selected-only", action="store_true",
                    help="synthesize only the 252 packed tensors (4.6 GB instead of 7.2 GB; same values)")
    ap.add_argument("--store-qweights", action="store_true", help="build with --store-qweights (the integers "
                    "are then compared between CPU and CUDA builds too)")
    ap.add_argument("--share-inputs", action="store_true", help="build with --share-inputs (one input transform "
                    "per q/k/v and gate/up group)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pack_full.json"))
    args = ap.parse_args(argv)
    if "cuda" in args.runs:
        limit_malloc_arenas()  # as `duquant-pack build --device cuda` does, before any thread starts

    args.workdir.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "pack_full", "machine": machine_info(), "preset": PRESET, "runs": {}}
    if torch.cuda.is_available():
        report["machine"]["gpu"] = torch.cuda.get_device_name(0)
    ckpt_dir = args.ckpt
    if ckpt_dir is None:
        ckpt_dir = args.workdir / "ckpt"
        t0 = time.perf_counter()
        write_synth(ckpt_dir, "pi05", include=SELECTED_RE if args.synth_selected_only else None)
        report["synth_seconds"] = time.perf_counter() - t0
    extra = {"store_qweights": True} if args.store_qweights else {}
    if args.share_inputs:
        extra["share_inputs"] = True
    cfg, _ = resolve(PRESET, **extra)
    ckpt = Checkpoint(ckpt_dir)
    selected = select_layers(ckpt, cfg)
    keys = [s.key for s in selected]
    report["layers"] = len(selected)
    report["weights"] = sum(s.numel for s in selected)
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.files)

    # lower bound: bytes to read / read bandwidth, FLOPs / matmul rate
    read_seconds(ckpt, keys)  # warm the page cache
    t_read, n_bytes = read_seconds(ckpt, keys)
    flops64 = sum(2 * s.numel * cfg.block * (2 if cfg.row_rot == "restore" else 1) for s in selected)
    flops32 = flops64
    rate64, rate32 = matmul_rate(torch.float64), matmul_rate(torch.float32)
    bound = {"bytes_read": n_bytes, "warm_read_seconds_1_thread": t_read,
             "gram_flops_f64": flops64, "transform_flops_f32": flops32,
             "bmm_rate_f64_all_cores": rate64, "bmm_rate_f32_all_cores": rate32,
             "compute_seconds": flops64 / rate64 + flops32 / rate32}
    bound["seconds"] = max(bound["compute_seconds"], t_read)
    report["lower_bound"] = bound

    kinds = []
    for item in args.runs.split(","):
        kind, _, jobs = item.partition(":")
        kinds.append((kind, int(jobs) if jobs else 0))
    for kind, jobs in kinds:
        label = f"{kind}:{jobs}" if jobs else kind
        runs = []
        for _ in range(args.repeats):
            runs.append(one_build(ckpt_dir, args.workdir / f"pack-{kind}-{jobs}", cfg, kind, jobs))
            print(f"{label}: {runs[-1]['seconds']:.1f} s, peak RSS {runs[-1]['peak_rss_bytes'] / 2**30:.2f} GiB",
                  file=sys.stderr)
        entry = {"repeats": runs, "median_seconds": statistics.median(r["seconds"] for r in runs),
                 "median_peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs)}
        entry["weights_per_second"] = report["weights"] / entry["median_seconds"]
        if args.cold:
            for f in ckpt.files:
                evict(f)
            entry["cold"] = one_build(ckpt_dir, args.workdir / f"pack-{kind}-{jobs}", cfg, kind, jobs)
            print(f"{label} cold: {entry['cold']['seconds']:.1f} s", file=sys.stderr)
        report["runs"][label] = entry

    if any(k.startswith("cuda") for k in report["runs"]) and any(k.startswith("cpu") for k in report["runs"]):
        cpu_label = next(k for k in report["runs"] if k.startswith("cpu"))
        k, j = cpu_label.split(":")
        cuda_kind, cuda_jobs = next((k, j) for k, j in kinds if k == "cuda")
        report["cuda_vs_cpu"] = compare_packs(args.workdir / f"pack-cpu-{j}",
                                              args.workdir / f"pack-{cuda_kind}-{cuda_jobs}")

    if not args.no_incremental and kinds:
        kind, jobs = kinds[-1]
        out = args.workdir / f"pack-{kind}-{jobs}"
        device = "cuda" if kind == "cuda" else "cpu"
        inc = {}
        abits_cfg, _ = resolve(PRESET, abits=4, **extra)
        t0 = time.perf_counter()
        s = build_pack(ckpt_dir, out, abits_cfg, jobs=jobs, device=device, overwrite=True, progress=False)
        inc["abits_changed"] = {"seconds": time.perf_counter() - t0, "computed": s.computed, "reused": s.reused}
        llm_cfg, _ = resolve("pi05-llm", **extra)
        small = args.workdir / "pack-grow"
        shutil.rmtree(small, ignore_errors=True)
        build_pack(ckpt_dir, small, llm_cfg, jobs=jobs, device=device, progress=False)
        t0 = time.perf_counter()
        s = build_pack(ckpt_dir, small, cfg, jobs=jobs, device=device, overwrite=True, progress=False)
        inc["layer_set_grown_llm_to_llm_expert"] = {"seconds": time.perf_counter() - t0, "computed": s.computed,
                                                    "reused": s.reused}
        report["incremental"] = inc

    base = None
    if not args.no_baseline:
        base = baseline_seconds(ckpt, selected, cfg.block, args.baseline_blocks)
        report["baseline_full_svd"] = base

    write_results(args.out, report)
    w = report["weights"]
    print(f"\n{'run':<10} {'seconds':>8} {'M weights/s':>12} {'peak RSS GiB':>13}")
    for label, e in report["runs"].items():
        print(f"{label:<10} {e['median_seconds']:>8.1f} {w / e['median_seconds'] / 1e6:>12.1f} "
              f"{e['median_peak_rss_bytes'] / 2**30:>13.2f}")
        if "cold" in e:
            print(f"{label + ' cold':<10} {e['cold']['seconds']:>8.1f} {w / e['cold']['seconds'] / 1e6:>12.1f} "
                  f"{e['cold']['peak_rss_bytes'] / 2**30:>13.2f}")
    if base is not None:
        b = base["estimated_seconds_single_process"]
        print(f"{'old SVD':<10} {b:>8.0f} {w / b / 1e6:>12.2f} {'-':>13}   (estimated, 1 process)")
    print(f"lower bound {bound['seconds']:.1f} s (read {t_read:.1f} s, compute {bound['compute_seconds']:.1f} s)")
    if "incremental" in report:
        for k, v in report["incremental"].items():
            print(f"incremental {k}: {v['seconds']:.1f} s, {v['computed']} computed, {v['reused']} reused")
    if "cuda_vs_cpu" in report:
        print("cuda vs cpu:", json.dumps(report["cuda_vs_cpu"]))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
