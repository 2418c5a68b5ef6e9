"""The GEMM launch alone at M = 768 / 800, and launch-configuration variants at 800 (development probe).

    PYTHONPATH=. python3 benchmarks/probe_tail.py [--only llm:gate_up:800,...] [--repeats 9] [--ab ALT;...]

For each shape: `w4_gemm` over ready int8 codes (R instances, weights past L2, token-minor output)
with the picked configuration at M = 768 and 800, and at M = 800 with each --ab alternative
(KEY=VALUE,...;...), with its largest difference from the picked configuration's output. Prints us
per layer and writes JSON (--out).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results_file import write_results  # noqa: E402
from runtime_gpu import graph_time  # noqa: E402
from sweep_w4a8 import make_layers  # noqa: E402
from w4a8_cases import add_common_args, instances, parse_overrides, selected_shapes  # noqa: E402
from duquant_runtime.kernels import w4a8 as K  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "benchmarks/results/probe_tail.json", 9)
    ap.add_argument("--ab", default="TAIL_BMT=0", help="alternatives to the picked configuration at M = 800, "
                    "KEY=VALUE[,...] separated by ';'")
    args = ap.parse_args(argv)
    if not args.only:
        args.only = "llm:gate_up:800,llm:q/o:800,llm:qkv:800"
    try:
        alts = [parse_overrides(alt) for alt in filter(None, args.ab.split(";"))]
    except ValueError as err:
        ap.error(f"--ab: {err}")
    shapes = selected_shapes(ap, args.only)
    dev = torch.device("cuda")
    result = {"benchmark": "probe_tail", "device": torch.cuda.get_device_name(), "shapes": []}
    for tower, name, n, k, m in shapes:
        layers = make_layers(n, k, instances(n, k, args.l2_bytes), dev)
        base = K.pick_config(m, n, k, K.MODE_DYNAMIC)
        base.pop("GEMM", None)  # the Triton GEMM (the Gluon one is picked for down_proj only)

        def gemm(a, ts, lay, cfg):
            return K.w4_gemm(a, ts, qweight=lay["qweight"], w_scale=lay["w_scale"], r_out=lay["r_out"], bias=None,
                             out_dtype=torch.bfloat16, cfg=cfg, token_minor=True)

        def us(mm, cfg):
            a = torch.randint(-127, 128, (mm, k), device=dev, dtype=torch.int8)
            ts = torch.rand(mm, device=dev) * 0.01 + 1e-3
            fns = [lambda a, lay=lay: gemm(a, ts, lay, cfg) for lay in layers]
            return graph_time(fns, a, args.repeats, min_ms=1.0) * 1e6

        row = {"tower": tower, "name": name, "N": n, "K": k, "picked": {f"M{mm}_us": us(mm, base) for mm in (768, 800)}}
        a800 = torch.randint(-127, 128, (800, k), device=dev, dtype=torch.int8)
        ts800 = torch.rand(800, device=dev) * 0.01 + 1e-3
        ref = gemm(a800, ts800, layers[0], base).float()
        row["alternatives"] = [{"config": alt, "M800_us": us(800, {**base, **alt}),
                                "max_abs_diff": (gemm(a800, ts800, layers[0], {**base, **alt}).float() - ref)
                                .abs().max().item()} for alt in alts]
        result["shapes"].append(row)
        print(f"{tower}:{name} N={n} K={k} | " + " | ".join(
            [f"{key} {v:.1f}" for key, v in row["picked"].items()]
            + [f"M800 {r['config']} {r['M800_us']:.1f} (diff {r['max_abs_diff']:.1e})" for r in row["alternatives"]]),
            flush=True)
        write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
