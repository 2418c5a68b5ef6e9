"""The GEMM launch alone at M = 768 / 800, and token-tile variants at 800 (development probe).

    PYTHONPATH=. python3 benchmarks/probe_tail.py [--only llm:gate_up:800,...] [--repeats 9] [--ab ALT;...]

For each shape: w4_gemm over ready int8 codes (R instances, weights past L2) with the picked
configuration at M = 768 and 800, and at M = 800 with each --ab alternative (KEY=INT,...;...), with
its largest difference from the picked configuration's output. Prints us per layer.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime_gpu import graph_time  # noqa: E402
from sweep_w4a8 import make_layers  # noqa: E402
from w4a8_cases import instances, select  # noqa: E402
from duquant_runtime.kernels import w4a8 as K  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="llm:gate_up:800,llm:q/o:800,llm:qkv:800")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--ab", default="TAIL_BMT=32")
    args = ap.parse_args()
    dev = torch.device("cuda")
    for tower, name, n, k, m in select(args.only):
        count = instances(n, k, 256 << 20)
        layers = make_layers(n, k, count, dev)
        base = K.pick_config(m, n, k, K.MODE_DYNAMIC)
        base.pop("GEMM", None)

        def t(mm, cfg, tm=True):
            a = torch.randint(-127, 128, (mm, k), device=dev, dtype=torch.int8)
            ts = torch.rand(mm, device=dev) * 0.01 + 1e-3
            fns = [lambda a, lay=lay: K.w4_gemm(a, ts, qweight=lay["qweight"], w_scale=lay["w_scale"],
                                                r_out=lay["r_out"], bias=None, out_dtype=torch.bfloat16, cfg=cfg,
                                                token_minor=tm) for lay in layers]
            return graph_time(fns, a, args.repeats, min_ms=1.0) * 1e6

        line = [f"{tower}:{name} N={n} K={k}"]
        for mm in (768, 800):
            line.append(f"M{mm} {t(mm, base):.1f}")
        a800 = torch.randint(-127, 128, (800, k), device=dev, dtype=torch.int8)
        ts800 = torch.rand(800, device=dev) * 0.01 + 1e-3
        lay = layers[0]

        def run(cfg):
            return K.w4_gemm(a800, ts800, qweight=lay["qweight"], w_scale=lay["w_scale"], r_out=lay["r_out"],
                             bias=None, out_dtype=torch.bfloat16, cfg=cfg, token_minor=True).float()
        ref = run(base)
        for alt in filter(None, args.ab.split(";")):
            cfg = {**base, **{kv.split("=")[0]: int(kv.split("=")[1]) for kv in alt.split(",")}}
            diff = (run(cfg) - ref).abs().max().item()
            line.append(f"M800[{alt}] {t(800, cfg):.1f} (diff {diff:.1e})")
        print(" | ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
