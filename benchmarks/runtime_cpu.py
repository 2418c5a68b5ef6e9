"""Benchmark: the runtime on CPU for full-size pi0.5 language-model decoder layers.

    python benchmarks/runtime_cpu.py [--layers 1] [--repeats 7] [--load-repeats 3] [--tokens 1,64] [--groups] [--out FILE]

With --layers 18 the load+apply part covers the whole pi05-llm set (126 linears); forward timings
always use decoder layer 0. The description below is for the default, one layer:

Synthesizes (in a temporary directory) exactly the 7 linears of decoder layer 0 of the pi0.5 language
model at full size (q/k/v/o 2048 wide, gate/up/down 2048 <-> 16384; 110,100,480 weights, bf16) and
builds their pack with the `pi05-llm` preset (W4A8, block 64, zigzag, row rotation restore). Then:

- load + apply: the checkpoint is loaded into an `nn.Module` tree holding bf16 `nn.Linear` modules
  with the checkpoint's names (what the policy factory has after `load_model`), then timed:
  `load_pack` + `apply_pack` (fingerprints, layer-file checks, W_t and its int codes). Median of
  --load-repeats fresh trees. Resident bytes: the report's bytes_before / bytes_after (weights of the
  replaced modules vs everything the DuQuantLinear modules keep) and the process RSS around it.
- forward: per layer and per token count M (--tokens), the median wall time of one call (repeated
  calls per sample so that each sample lasts >= 20 ms) of: bf16 `nn.Linear` with bf16 input and
  float32 `nn.Linear` with float32 input (baselines, same run), and `DuQuantLinear` W4A8 with bf16
  input in static (calibrated) and dynamic activation mode, and static with float32 input.
  Also a breakdown of the DuQuantLinear forward of the largest layers (the int8 -> float conversion
  of the cached codes, the input transform, the matmul, the output restore).

Writes JSON to --out (and prints it). This is the CPU reference path (fake-quantized matmul in
float); fast low-bit GPU kernels are a separate backend.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from machine import machine_info
from results_file import write_results

from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_pack.synth import write_synth
from duquant_runtime import DuQuantLinear, apply_pack, load_pack
from duquant_runtime.activation import fake_quantize_per_channel
from duquant_runtime.transforms import input_transform, output_restore

LAYER0 = r"language_model\.layers\.0\.(self_attn|mlp)\."
LLM_LAYERS = r"language_model\.layers\.\d+\.(self_attn|mlp)\."
PRESET = "pi05-llm"


def rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def build_tree(state: dict, dtype: torch.dtype) -> nn.Module:
    """An nn.Module tree whose module names are the checkpoint keys minus '.weight', holding nn.Linear."""
    root = nn.Module()
    for key, w in state.items():
        parts = key[: -len(".weight")].split(".")
        mod = root
        for p in parts[:-1]:
            if p not in mod._modules:
                mod.add_module(p, nn.Module())
            mod = mod._modules[p]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(w.to(dtype, copy=True), requires_grad=False)  # resident, not file-mapped
        mod.add_module(parts[-1], lin)
    return root


def timed(fn, x, repeats: int, min_sample_s: float = 0.02) -> float:
    """Median seconds of one call fn(x), over `repeats` samples of n calls each (n sized to >= min_sample_s)."""
    with torch.no_grad():
        fn(x)  # warm-up
        t0 = time.perf_counter()
        fn(x)
        one = max(time.perf_counter() - t0, 1e-7)
        n = max(1, int(min_sample_s / one))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                fn(x)
            samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def activations(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g)
    x[:, torch.randperm(n, generator=g)[:3]] *= torch.tensor([100.0, 300.0, 1000.0])  # massive channels
    return x


def breakdown(q: DuQuantLinear, x: torch.Tensor, repeats: int) -> dict:
    """Seconds of the parts of a calibrated static DuQuantLinear forward (float32 compute)."""
    xf = x.float()
    r_in = q.r_in
    r_out = q.r_out
    wq = q.int_codes().to(torch.float32)
    xt = input_transform(xf, q.perm, r_in)
    xq = fake_quantize_per_channel(xt, q.act_scale, q.abits)
    yt = (xq @ wq.t()) * q.w_scale
    return {
        "dequantize_codes_s": timed(lambda _: q.int_codes().to(torch.float32), x, repeats),
        "input_transform_s": timed(lambda a: input_transform(a, q.perm, r_in), xf, repeats),
        "act_quant_s": timed(lambda a: fake_quantize_per_channel(a, q.act_scale, q.abits), xt, repeats),
        "matmul_s": timed(lambda a: (a @ wq.t()) * q.w_scale, xq, repeats),
        "output_restore_s": timed(lambda a: output_restore(a, r_out), yt, repeats),
        "total_s": timed(q, x, repeats),
    }


GROUPS = {"q/k/v": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "gate/up": ("mlp.gate_proj", "mlp.up_proj")}


def linked_groups(tmp: Path, ckpt: Path, tokens: list, repeats: int) -> dict:
    """Decoder layer 0 built with --share-inputs, applied with dynamic activations twice (linked
    and share_inputs=False): the members of each group called one after the other on one input
    (as attention and the MLP do), timed; the same for bf16 nn.Linear."""
    cfg, _ = resolve(PRESET, share_inputs=True)
    t0 = time.perf_counter()
    build_pack(tmp / "ckpt", tmp / "pack-shared", cfg, preset=PRESET, progress=False)
    out = {"build_seconds": round(time.perf_counter() - t0, 3)}
    state = {k: v for k, v in load_file(str(ckpt)).items() if re.search(LAYER0, k)}
    models = {}
    for label, share in (("linked", True), ("unlinked", False)):
        model = build_tree(state, torch.bfloat16)
        report = apply_pack(model, tmp / "pack-shared", act_mode="dynamic", share_inputs=share)
        models[label] = dict(model.named_modules())
        out[f"input_groups_{label}"] = len(report.input_groups)
    bf16 = dict(build_tree(state, torch.bfloat16).named_modules())
    prefix = next(k for k in state if "layers.0." in k).split("layers.0.")[0] + "layers.0."
    for gname, members in GROUPS.items():
        names = [prefix + m for m in members]
        for m in tokens:
            x = activations(m, bf16[names[0]].in_features, 1).to(torch.bfloat16)
            t = {f"{label}_s": timed(lambda a, mods=[mods[n] for n in names]: [q(a) for q in mods], x, repeats)
                 for label, mods in (("bf16", bf16), ("dynamic_unlinked", models["unlinked"]),
                                     ("dynamic_linked", models["linked"]))}
            t["ratio_linked_vs_unlinked"] = t["dynamic_linked_s"] / t["dynamic_unlinked_s"]
            t["ratio_linked_vs_bf16"] = t["dynamic_linked_s"] / t["bf16_s"]
            out[f"{gname} M={m}"] = t
            print(f"group {gname:8s} M={m:3d}: bf16 {t['bf16_s'] * 1e3:8.3f} ms, dynamic unlinked "
                  f"{t['dynamic_unlinked_s'] * 1e3:8.3f} ms, linked {t['dynamic_linked_s'] * 1e3:8.3f} ms "
                  f"({t['ratio_linked_vs_unlinked']:.2f}x)", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="timing samples per forward measurement")
    ap.add_argument("--load-repeats", type=int, default=3, help="fresh load+apply runs")
    ap.add_argument("--tokens", default="1,64", help="comma-separated token counts M")
    ap.add_argument("--layers", type=int, default=1,
                    help="LLM decoder layers for load+apply (18 = the whole pi05-llm set, 126 linears); "
                         "forward timings use layer 0")
    ap.add_argument("--groups", action="store_true",
                    help="also build the layer with --share-inputs and time its linked q/k/v and gate/up groups "
                         "(dynamic activations, the CPU integer GEMM) against the same members unlinked")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime_cpu.json"))
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]

    result: dict = {
        "benchmark": "runtime_cpu", "machine": machine_info(),
        "settings": {"preset": PRESET, "layer_set": f"pi0.5 LLM decoder layers 0..{args.layers - 1} "
                                                    f"({7 * args.layers} linears, bf16)",
                     "repeats": args.repeats, "load_repeats": args.load_repeats, "tokens": tokens},
    }
    with tempfile.TemporaryDirectory(prefix="duquant-rt-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ckpt = write_synth(tmp / "ckpt", "pi05", layers=args.layers, include=LLM_LAYERS)
        synth_s = time.perf_counter() - t0
        cfg, _ = resolve(PRESET)
        t0 = time.perf_counter()
        summary = build_pack(tmp / "ckpt", tmp / "pack", cfg, preset=PRESET, progress=False)
        result["pack"] = {"synth_seconds": round(synth_s, 3), "build_seconds": round(time.perf_counter() - t0, 3),
                          "layers": summary.layers, "weights": summary.weights, "pack_bytes": summary.pack_bytes}

        # --- load + apply -------------------------------------------------------------------------
        runs = []
        for i in range(args.load_repeats):
            gc.collect()
            rss0 = rss_bytes()
            t0 = time.perf_counter()
            state = load_file(str(ckpt))
            model = build_tree(state, torch.bfloat16)
            del state
            t_ckpt = time.perf_counter() - t0
            gc.collect()
            rss_loaded = rss_bytes()
            t0 = time.perf_counter()
            pack = load_pack(tmp / "pack")
            t_load_pack = time.perf_counter() - t0
            report = apply_pack(model, pack)
            t_apply = time.perf_counter() - t0 - t_load_pack
            gc.collect()
            rss_applied = rss_bytes()
            runs.append({"checkpoint_to_modules_s": t_ckpt, "load_pack_s": t_load_pack, "apply_pack_s": t_apply,
                         "load_plus_apply_s": t_load_pack + t_apply,
                         "rss_model_loaded_bytes": rss_loaded - rss0, "rss_after_apply_bytes": rss_applied - rss0})
            if i < args.load_repeats - 1:
                del model, report, pack
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_s")}
        result["load_apply"] = {
            "median": {k: round(v, 4) for k, v in med.items()},
            "rss_note": "process RSS deltas per run (allocator reuse between runs blurs them); "
                        "bytes_before/bytes_after are the exact tensor bytes",
            "runs": [{k: (round(v, 4) if k.endswith("_s") else int(v)) for k, v in r.items()} for r in runs],
            "replaced": len(report.replaced),
            "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
            "bytes_ratio": round(report.bytes_after / report.bytes_before, 4),
            "per_layer_bytes": report.per_layer_bytes,
        }
        print(f"load+apply {med['load_plus_apply_s']:.2f} s; bytes {report.bytes_before / 2**20:.1f} MiB -> "
              f"{report.bytes_after / 2**20:.1f} MiB", file=sys.stderr)

        # --- forward --------------------------------------------------------------------------------
        state = load_file(str(ckpt))
        modules = dict(model.named_modules())
        layers = []
        state = {k: v for k, v in state.items() if re.search(LAYER0, k)}
        for key in sorted(state, key=lambda k: state[k].numel()):
            name = key[: -len(".weight")]
            w = state[key]
            lin_bf16 = build_tree({"l.weight": w}, torch.bfloat16).l
            lin_f32 = build_tree({"l.weight": w}, torch.float32).l
            lp = pack.layer(name)
            static = modules[name]  # the applied module (static mode, pack's percentile)
            calib = DuQuantLinear.from_linear(lin_bf16, lp, abits=8, act_mode="static", calib_steps=1)
            with torch.no_grad():
                calib(activations(64, w.shape[1], 0).to(torch.bfloat16))
            static.set_act_scale(calib.act_scale)
            dynamic = DuQuantLinear.from_linear(lin_bf16, lp, abits=8, act_mode="dynamic")
            del calib
            entry = {"name": name, "out": w.shape[0], "in": w.shape[1], "bytes_bf16": w.numel() * 2,
                     "bytes_duquant": static.nbytes, "forward": {}}
            for m in tokens:
                x = activations(m, w.shape[1], 1)
                xb = x.to(torch.bfloat16)
                t = {"linear_bf16_s": timed(lin_bf16, xb, args.repeats),
                     "linear_f32_s": timed(lin_f32, x, args.repeats),
                     "duquant_static_bf16in_s": timed(static, xb, args.repeats),
                     "duquant_dynamic_bf16in_s": timed(dynamic, xb, args.repeats),
                     "duquant_static_f32in_s": timed(static, x, args.repeats)}
                t["ratio_static_vs_bf16"] = t["duquant_static_bf16in_s"] / t["linear_bf16_s"]
                t["ratio_static_vs_f32"] = t["duquant_static_bf16in_s"] / t["linear_f32_s"]
                entry["forward"][f"M={m}"] = t
                print(f"{name.split('layers.0.')[1]:18s} M={m:3d}: bf16 {t['linear_bf16_s'] * 1e3:8.3f} ms, "
                      f"f32 {t['linear_f32_s'] * 1e3:8.3f} ms, duquant static {t['duquant_static_bf16in_s'] * 1e3:8.3f} ms, "
                      f"dynamic {t['duquant_dynamic_bf16in_s'] * 1e3:8.3f} ms", file=sys.stderr)
                if w.numel() == max(v.numel() for v in state.values()) and name.endswith(("down_proj", "gate_proj")):
                    entry.setdefault("breakdown", {})[f"M={m}"] = breakdown(static, xb, args.repeats)
            layers.append(entry)
            del lin_bf16, lin_f32, dynamic
        result["forward_layers"] = layers
        totals = {}
        for m in tokens:
            k = f"M={m}"
            tot = {v: sum(e["forward"][k][v] for e in layers) for v in
                   ("linear_bf16_s", "linear_f32_s", "duquant_static_bf16in_s", "duquant_dynamic_bf16in_s",
                    "duquant_static_f32in_s")}
            tot["ratio_static_vs_bf16"] = tot["duquant_static_bf16in_s"] / tot["linear_bf16_s"]
            tot["ratio_static_vs_f32"] = tot["duquant_static_bf16in_s"] / tot["linear_f32_s"]
            totals[k] = tot
        result["forward_decoder_layer_totals"] = totals
        if args.groups:
            result["linked_groups"] = linked_groups(tmp, ckpt, tokens, args.repeats)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    default = (lambda o: list(o) if isinstance(o, tuple) else str(o))
    if args.out:
        print(write_results(args.out, result, default=default))
    else:
        print(json.dumps(result, indent=2, default=default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
