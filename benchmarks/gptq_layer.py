"""Benchmark: GPTQ rounding of one full-size pi0.5 LLM down_proj (2048 x 16384) on the CPU and a GPU.

    python benchmarks/gptq_layer.py --devices cpu,cuda [--tokens 4096] [--out FILE]

A synthetic weight (Gaussian, 0.02, with 16 outlier input columns at 20x) and heavy-tailed
activations (Student-t, 4 dof, 1% outlier channels at 20-60x) of --tokens tokens give X^T X
(float64, accumulated on the first device). Per device, timed separately: the transformed Hessian
H_t = BD(R)^T X^T X BD(R) with block-64 Hadamard rotations, and `gptq_quantize` (W4, per-row MSE
scales; three float64 16384^2 factorisations and the column loop). Reports seconds and the
proxy loss (relative to the unquantized output energy) of GPTQ and of round-to-nearest with the
same scales, so devices can be compared for quality too. Writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402
from results_file import write_results  # noqa: E402

from duquant_pack.gptq import gptq_quantize, proxy_loss, transformed_hessian  # noqa: E402
from duquant_pack.hadamard import hadamard_rotations  # noqa: E402
from duquant_runtime.quant import quantize_rows  # noqa: E402
from duquant_runtime.transforms import transform_weight  # noqa: E402


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--out-features", type=int, default=2048)
    ap.add_argument("--in-features", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gptq_layer.json"))
    args = ap.parse_args(argv)
    devices = args.devices.split(",")
    g = torch.Generator().manual_seed(0)
    out_f, in_f = args.out_features, args.in_features
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, torch.randperm(in_f, generator=g)[:16]] *= 20.0
    z = torch.randn(args.tokens, in_f, generator=g)
    u = torch.rand(args.tokens, in_f, generator=g) * torch.rand(args.tokens, in_f, generator=g)
    x = z / (-2.0 * torch.log(u.clamp_min(1e-30)) / 4.0).sqrt()
    idx = torch.randperm(in_f, generator=g)[:max(2, in_f // 100)]
    x[:, idx] *= 20.0 + 40.0 * torch.rand(idx.numel(), generator=g)
    t0 = time.perf_counter()
    xd = x.to(devices[0], torch.float64)
    xtx = (xd.t() @ xd).cpu()
    _sync(devices[0])
    report = {"benchmark": "gptq_layer", "machine": machine_info(), "shape": [out_f, in_f], "tokens": args.tokens,
              "xtx_seconds": time.perf_counter() - t0, "xtx_device": devices[0], "runs": {}}
    if torch.cuda.is_available():
        report["machine"]["gpu"] = torch.cuda.get_device_name(0)
    del xd, x, z, u
    r_in = hadamard_rotations(in_f, 64).to(torch.float32)
    for dev in devices:
        wd, rd = w.to(dev), r_in.to(dev)
        w_t = transform_weight(wd, None, rd, None)
        _sync(dev)
        t0 = time.perf_counter()
        h_t = transformed_hessian(xtx.to(dev), None, None, rd)
        _sync(dev)
        t_h = time.perf_counter() - t0
        t0 = time.perf_counter()
        q, s = gptq_quantize(w_t, h_t, 4, "mse")
        _sync(dev)
        t_g = time.perf_counter() - t0
        ref = proxy_loss(torch.zeros_like(w_t), w_t, h_t)
        gptq = proxy_loss(q.to(torch.float32) * s[:, None], w_t, h_t) / ref
        rtn = proxy_loss(quantize_rows(w_t, s, 4).to(torch.float32) * s[:, None], w_t, h_t) / ref
        report["runs"][dev] = {"hessian_seconds": t_h, "gptq_seconds": t_g, "proxy_rel_gptq": gptq,
                               "proxy_rel_rtn_same_scales": rtn}
        print(f"{dev}: H_t {t_h:.1f} s, GPTQ {t_g:.1f} s, proxy loss GPTQ {gptq:.4g} vs RTN {rtn:.4g}", flush=True)
        del h_t, w_t, q
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    write_results(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
