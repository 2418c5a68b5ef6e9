"""Where one layer's build time goes: per-stage seconds of the pack compiler on the CPU or a GPU.

    python benchmarks/pack_stages.py --ckpt DIR [--device cuda] [--match REGEX] [--out FILE.json]

Runs the stages of `build_one_layer` / `compute_layer` one after the other on every selected
linear of the pi05-llm-expert preset whose name matches --match (default: LLM and expert layer 0),
synchronizing the device after each stage, and prints the summed seconds per stage.
On the CPU it runs single-threaded, as a build worker does.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from duquant_pack.checkpoint import Checkpoint
from duquant_pack.config import resolve
from duquant_pack.permutation import compute_permutation
from duquant_pack.rotation import column_block_grams, principal_rotations, row_block_grams
from duquant_pack.layer import scales_and_stats
from duquant_pack.selection import select_layers
from duquant_runtime.fingerprint import weight_fingerprint
from duquant_runtime.transforms import transform_weight


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--match", default=r"\.layers\.0\.")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    cfg, _ = resolve("pi05-llm-expert")
    ck = Checkpoint(args.ckpt)
    layers = [s for s in select_layers(ck, cfg) if re.search(args.match, s.name)]
    tot: dict[str, float] = {}

    def stage(name, fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        tot[name] = tot.get(name, 0.0) + time.perf_counter() - t0
        return r

    if dev.type == "cuda":  # warm up cuBLAS / cuSOLVER
        g = torch.eye(64, dtype=torch.float64, device=dev)[None]
        torch.linalg.eigh(torch.bmm(g, g))
    weights = 0
    for s in layers:
        spec = cfg.layer_spec(s.name)
        raw = stage("read", lambda: ck.read_weight(s.key, dtype=None))
        weights += raw.numel()
        stage("fingerprint", lambda: weight_fingerprint(raw))
        w = stage("to_device_f32", lambda: raw.to(dev).to(torch.float32))
        b = min(spec.block, w.shape[1])
        perm = stage("permutation", lambda: compute_permutation(w, spec.permute, b, spec.permute_metric))
        pt = torch.from_numpy(perm).to(dev)
        wp = stage("gather", lambda: w.index_select(1, pt))
        g = stage("gram_in", lambda: column_block_grams(wp, b))
        r_in = stage("eigh_in", lambda: principal_rotations(g, b).to(torch.float32))
        r_out = None
        if spec.block_out is not None:
            bo = min(spec.block_out, w.shape[0])
            go = stage("gram_out", lambda: row_block_grams(w, bo))
            r_out = stage("eigh_out", lambda: principal_rotations(go, bo).to(torch.float32))
        wt = stage("transform", lambda: transform_weight(wp, None, r_in, r_out))
        stage("scales", lambda: scales_and_stats(w, wt, spec.wbits, spec.scale))
        stage("to_host", lambda: (r_in.cpu(), r_out.cpu() if r_out is not None else None))
    total = sum(tot.values())
    print(f"{len(layers)} linears, {weights:,} weights on {dev}: {total:.3f} s ({total / weights * 1e9:.1f} ns/weight)")
    for k, v in tot.items():
        print(f"  {k:<14} {v:8.3f} s  {100 * v / total:5.1f} %")
    if args.out:
        args.out.write_text(json.dumps({"device": str(dev), "linears": len(layers), "weights": weights,
                                        "seconds": tot}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
