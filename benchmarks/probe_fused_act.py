"""Probe: dynamic activations in one launch (`_prepq_kernel`, cfg FUSED) against prep + quantize.

    PYTHONPATH=. python3 benchmarks/probe_fused_act.py [--out FILE] [--repeats N]

Per pi0.5 shape and token count (x token-minor where the runtime gives it so): the activation
launches alone and the whole `w4_linear`, both ways, CUDA-graph replays over enough layer
instances to exceed L2; codes and scales compared (bit-identical when the fused tile has the
prep's rows). Writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from runtime_gpu import graph_time  # noqa: E402
from sweep_w4a8 import make_input, make_layers  # noqa: E402
from w4a8_cases import instances  # noqa: E402
from duquant_runtime.kernels import w4a8 as W  # noqa: E402

SHAPES = (("llm down", 2048, 16384, 800, True), ("llm o", 2048, 2048, 800, False),
          ("llm gate/up linked", 32768, 2048, 800, False), ("llm q/k/v linked", 2560, 2048, 800, False),
          ("expert down", 1024, 4096, 50, True), ("expert o", 1024, 2048, 50, False),
          ("expert gate/up linked", 8192, 1024, 50, False), ("expert q/k/v linked", 2560, 1024, 50, False),
          ("llm down M=1", 2048, 16384, 1, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/probe_fused_act.json")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--l2-bytes", type=int, default=120 << 20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name, n, k, m, tm in SHAPES:
        count = instances(n, k, args.l2_bytes)
        lays = make_layers(n, k, count, dev)
        x0 = make_input(m, k, dev)
        x = x0.t().contiguous().t() if tm else x0
        base = W.pick_config(m, n, k, W.MODE_DYNAMIC)
        row = {"name": name, "N": n, "K": k, "M": m, "token_minor": tm, "instances": count}

        def act(cfg):
            return [lambda xx, lay=lay: W.prepare_activation(xx, r_in=lay["r_in"], perm=lay["perm"], smooth=None,
                                                            mode=W.MODE_DYNAMIC, cfg=cfg) for lay in lays]

        def lin(cfg):
            return [lambda xx, lay=lay: W.w4_linear(xx, qweight=lay["qweight"], w_scale=lay["w_scale"],
                                                   r_in=lay["r_in"], perm=lay["perm"], r_out=lay["r_out"], bias=None,
                                                   smooth=None, mode=W.MODE_DYNAMIC, config=cfg,
                                                   token_minor_out=False) for lay in lays]
        ref_c, ref_s = act(base)[0](x)
        row["two_launch_act_s"] = graph_time(act(base), x, args.repeats)
        row["two_launch_linear_s"] = graph_time(lin(base), x, args.repeats)
        line = f"{name} M={m}: two launches act {row['two_launch_act_s'] * 1e6:.1f} lin {row['two_launch_linear_s'] * 1e6:.1f}"
        row["fused"] = []
        for fbmp in (16, 32, 64, 128):
            if fbmp > max(16, 2 * m):
                continue
            cfg = dict(base, FUSED=True, FBMP=fbmp)
            try:
                c, s = act(cfg)[0](x)
                torch.cuda.synchronize()
                W.check_fused_errors(dev)
                diff = int((c.int() - ref_c.int()).abs().max())
                same = bool(torch.equal(c, ref_c) and torch.equal(s, ref_s))
                ta = graph_time(act(cfg), x, args.repeats)
                tl_ = graph_time(lin(cfg), x, args.repeats)
                W.check_fused_errors(dev)
            except Exception as err:  # noqa: BLE001
                line += f"\n  FBMP {fbmp}: {type(err).__name__}: {str(err).splitlines()[0][:150]}"
                continue
            row["fused"].append({"FBMP": fbmp, "act_s": ta, "linear_s": tl_, "bit_identical": same,
                                 "max_code_diff": diff})
            line += f"\n  FBMP {fbmp}: act {ta * 1e6:.1f} lin {tl_ * 1e6:.1f} identical={same} maxdiff={diff}"
        print(line, flush=True)
        rows.append(row)
    write_results(Path(args.out), {"probe": "fused_act", "rows": rows})


if __name__ == "__main__":
    main()
