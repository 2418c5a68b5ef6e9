"""Per-launch device times of the W4 GPU kernels on the pi0.5 shapes (development aid).

    PYTHONPATH=. python3 benchmarks/profile_w4a8.py [--only llm:down:800,...] [--mode dynamic|static]
                                                    [--config KEY=VALUE,...] [--out FILE]

For each shape (w4a8_cases.SHAPES) and activation mode: R layer instances (enough that their
weights exceed the L2 cache, as in sweep_w4a8.py), one CUDA graph of `w4_linear` over all of
them, timed per layer (median of --repeats replays), then replayed once under torch.profiler.
Each launch of a layer (transpose, prep, quantize, GEMM) is reported with the median, min and
max of its device time over the R instances. Launches that start early under programmatic
dependent launch (PDL) count their wait for the previous launch, so with PDL the launch times
overlap and add up to more than the layer; --config PDL=False separates them. Writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from w4a8_cases import add_common_args, instances, parse_overrides, selected_shapes  # noqa: E402


def kernel_times(fns, x) -> list[tuple[str, float]]:
    """(kernel name, device us) of every kernel one CUDA-graph replay of [f(x) for f in fns] runs,
    in start order."""
    from runtime_gpu import capture
    from torch.profiler import ProfilerActivity, profile
    graph = capture(fns, x)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA" and e.name.endswith("_kernel")]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.device_time) for e in events]


def per_launch(times: list[tuple[str, float]], layers: int) -> list[dict]:
    """Launch i of every layer together: [{kernel, median_us, min_us, max_us}], from the kernels of
    `layers` identical layers run one after another (ValueError if they do not line up)."""
    if not times or len(times) % layers:
        raise ValueError(f"{len(times)} kernels do not split into {layers} identical layers")
    per = len(times) // layers
    out = []
    for i in range(per):
        names = {times[j * per + i][0] for j in range(layers)}
        if len(names) != 1:
            raise ValueError(f"launch {i} differs between layers: {sorted(names)}")
        us = [times[j * per + i][1] for j in range(layers)]
        out.append({"kernel": names.pop(), "median_us": statistics.median(us), "min_us": min(us), "max_us": max(us)})
    return out


def profile_shape(tower, name, n, k, m, mode_name, over, args, dev) -> dict:
    from runtime_gpu import graph_time
    from sweep_w4a8 import ab_config, make_input, make_layers

    from duquant_runtime.kernels import w4a8 as K
    mode = K.MODE_DYNAMIC if mode_name == "dynamic" else K.MODE_STATIC
    count = instances(n, k, args.l2_bytes)
    layers = make_layers(n, k, count, dev)
    x = make_input(m, k, dev)
    if args.token_minor:  # as a gate/up GEMM with token_minor_out leaves it (mlp_layout.py)
        x = x.t().contiguous().t()
    # the whole configuration the runtime resolves (RS_CONFIG applied where the rs GEMM runs), --config's
    # keys over it (PICK_M: another token count's picks)
    cfg = ab_config(m, n, k, mode, dev, over)
    fns = [lambda a, lay=lay: K.w4_linear(a, qweight=lay["qweight"], w_scale=lay["w_scale"], r_in=lay["r_in"],
                                          perm=lay["perm"], r_out=lay["r_out"], bias=None, smooth=None, mode=mode,
                                          act_scale=lay["act_scale"], config=cfg)
           for lay in layers]
    layer_s = graph_time(fns, x, args.repeats)
    launches = per_launch(kernel_times(fns, x), count)
    res = {"tower": tower, "name": name, "N": n, "K": k, "M": m, "mode": mode_name, "config": cfg,
           "token_minor": args.token_minor,
           "instances": count, "layer_us": layer_s * 1e6, "launches": launches}
    print(f"{tower:6s} {name:8s} N={n:5d} K={k:5d} M={m:3d} {mode_name:7s} {layer_s * 1e6:7.1f} us/layer | "
          + " | ".join(f"{ln['kernel']} {ln['median_us']:.1f}" for ln in launches), flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "benchmarks/results/profile_w4a8.json", 5)
    ap.add_argument("--mode", default="dynamic", choices=("both", "dynamic", "static"))
    ap.add_argument("--config", default="", help="KEY=VALUE[,...] overriding pick_config (Python literals), "
                    "e.g. PDL=False")
    ap.add_argument("--token-minor", action="store_true", help="give the layers x token-minor (strides (1, M)), "
                    "as a gate/up with token_minor_out leaves down_proj's input")
    args = ap.parse_args(argv)
    try:
        over = parse_overrides(args.config)
    except ValueError as err:
        ap.error(f"--config: {err}")
    shapes = selected_shapes(ap, args.only)
    if not torch.cuda.is_available():
        print("profile_w4a8: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    result = {"benchmark": "profile_w4a8", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shapes": []}
    for tower, name, n, k, m in shapes:
        for mode_name in ("dynamic", "static"):
            if args.mode in ("both", mode_name):
                result["shapes"].append(profile_shape(tower, name, n, k, m, mode_name, over, args, dev))
                torch.cuda.empty_cache()
                write_results(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
