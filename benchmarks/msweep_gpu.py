"""M sweep: the large pi0.5 layers at every token count, W4A8 dynamic against bf16 `nn.Linear`.

    PYTHONPATH=. python3 benchmarks/msweep_gpu.py [--llm-ms 1,2,4,...] [--expert-ms 1,10,50,...]
                                                  [--out FILE] [--repeats N]

runtime_gpu.py times the token counts of one `sample_actions` call (language model at M = 800
and 1, action expert at 50). Issue 6 asks every large layer (language model gate/up/down at any
M, expert MLP at M = 50) to be no slower than bf16, and the kernels pick their launch
configuration by M ranges (kernels/w4a8.pick_config), so this sweeps M across those ranges.

Per layer and M, timed as CUDA-graph replays in the same run (median of --repeats samples, R
layer instances per replay so that the weights exceed the L2 cache, runtime_gpu.graph_time):
- bf16 `nn.Linear` on a row-major x (the baseline);
- ours: `DuQuantLinear` W4A8, dynamic per-token activation scales, as a model with `apply_pack`
  runs it: gate/up write the token-minor MLP hidden and down_proj reads it, from M > 16
  (mlp_layout.py, kernels/w4a8.token_minor_pays); rotations float16.
Layers (--layers): by default gate_proj, up_proj and down_proj of each tower and the linked
gate/up group of a --share-inputs pack (against its two bf16 members called one by one); also
q_proj, k_proj (= v_proj), o_proj and the linked q/k/v group. The fast output of one
instance is compared with its float32 reference path (use_fast=False) at every M.
Writes JSON: one row per (tower, layer, M) with both times, the ratio and the error, and the
rows whose ratio is above 1.0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime_gpu as rg  # noqa: E402
from results_file import write_results  # noqa: E402

LLM_MS = "1,2,4,8,16,17,24,32,48,64,65,96,128,192,256,384,512,640,800,1024"
EXPERT_MS = "1,10,25,50,64,100,200"
# (name, out, in) of each tower's layers, from runtime_gpu's pi0.5 shapes
TOWERS = {"llm": rg.LLM, "expert": rg.EXPERT}
# linked input groups of a --share-inputs pack: their members
GROUPS = {"gate_up_group": ("gate_proj", "up_proj"), "qkv_group": ("q_proj", "k_proj", "v_proj")}
LAYERS = "gate_proj,up_proj,down_proj,gate_up_group"  # the default: the MLP, the layers issue 6 names
PRODUCERS = ("gate_proj", "up_proj")  # they write the token-minor MLP hidden (from M > 16)


def parse_ms(text: str) -> list[int]:
    """Sorted distinct token counts of "M[,M...]" (each 1..65536); ValueError naming the bad item."""
    out = set()
    for item in filter(None, (t.strip() for t in text.split(","))):
        if not item.isdigit() or not 1 <= int(item) <= 65536:
            raise ValueError(f"expected token counts 1..65536 separated by commas, got {item!r}")
        out.add(int(item))
    if not out:
        raise ValueError("no token count given")
    return sorted(out)


def over_bf16(rows: list[dict], limit: float = 1.0) -> list[dict]:
    """The rows slower than `limit` x bf16, worst first: {tower, layer, M, ratio}."""
    bad = [{k: r[k] for k in ("tower", "layer", "M", "ratio")} for r in rows if r["ratio"] > limit]
    return sorted(bad, key=lambda r: -r["ratio"])


def worst_per_layer(rows: list[dict]) -> dict:
    """{"tower:layer": {"M": m, "ratio": r}} of each layer's highest ratio over the sweep."""
    out = {}
    for r in rows:
        key = f"{r['tower']}:{r['layer']}"
        if key not in out or r["ratio"] > out[key]["ratio"]:
            out[key] = {"M": r["M"], "ratio": r["ratio"]}
    return out


def known_layers() -> list[str]:
    """What --layers takes: each tower's layer names (k_proj and v_proj are one shape), then GROUPS."""
    return list(dict.fromkeys(n for n, _, _ in rg.LLM)) + list(GROUPS)


def _layer(out_f: int, in_f: int, args, dev, producer: bool) -> tuple[list, list]:
    """R bf16 nn.Linear instances and R dynamic DuQuantLinear instances of one shape."""
    from duquant_runtime import DuQuantLinear
    reps = rg.instance_count(out_f * in_f * 2, args)
    lins, mods = [], []
    for i in range(reps):
        lin, lp, _ = rg.random_layer(out_f, in_f, 1000 * i + in_f + out_f, dev)
        meta = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=torch.bfloat16)
        q = DuQuantLinear.from_linear(meta, lp, abits=8, act_mode="dynamic", device=dev, rot_dtype=torch.float16)
        q.token_minor_output = producer  # the module applies it from M > 16 only (token_minor_pays)
        lins.append(lin)
        mods.append(q)
    return lins, mods


def _error(mods: list, x: torch.Tensor) -> float:
    """Worst relative error of the fast outputs of `mods` (called in order on x, as a linked group's
    members are) against their reference paths."""
    with torch.no_grad():
        for q in mods:
            assert q.fast_path_reason(x) is None, q.fast_path_reason(x)
        fast = [q(x) for q in mods]
        worst = 0.0
        for q, y in zip(mods, fast):
            assert torch.isfinite(y).all()
            q.use_fast = False
            worst = max(worst, rg.rel(y, q(x)))
            q.use_fast = True
    return worst


def sweep_layer(tower: str, name: str, out_f: int, in_f: int, ms: list[int], args, dev) -> list[dict]:
    lins, mods = _layer(out_f, in_f, args, dev, producer=name in PRODUCERS)
    rows = []
    for m in ms:
        tm_in = name == "down_proj" and rg.token_minor_pays(m)

        def layout(t, tm_in=tm_in):  # down_proj reads the token-minor hidden
            return t.t().contiguous().t() if tm_in else t
        x = rg.activations(m, in_f, 11, dev)
        t_bf16 = rg.graph_time(lins, x, args.repeats)
        t_ours = rg.graph_time(mods, layout(x), args.repeats)
        err = _error(mods[:1], layout(rg.activations(m, in_f, 21, dev)))
        rows.append({"tower": tower, "layer": name, "M": m, "N": out_f, "K": in_f, "instances": len(lins),
                     "bf16_s": t_bf16, "ours_s": t_ours, "ratio": t_ours / t_bf16, "rel_err": err,
                     "token_minor_input": tm_in,
                     "token_minor_output": name in PRODUCERS and rg.token_minor_pays(m)})
        _print(rows[-1])
    del lins, mods
    torch.cuda.empty_cache()
    return rows


def sweep_group(tower: str, label: str, ms: list[int], args, dev) -> list[dict]:
    """A linked input group (GROUPS[label]: one activation launch pair, one GEMM over all members'
    rows) against its bf16 members called one by one."""
    names = GROUPS[label]
    producer = set(names) <= set(PRODUCERS)
    reps = rg.group_instances(tower, names, args)
    bf16, _, groups = rg.build_group(tower, names, reps, dev, modes=("dynamic",))
    fns = groups["dynamic"]
    for f in fns:
        for q in f.__defaults__[0]:
            q.token_minor_output = producer
    in_f = {n: i for n, _, i in TOWERS[tower]}[names[0]]
    rows = []
    for m in ms:
        x = rg.activations(m, in_f, 11, dev)
        t_bf16 = rg.graph_time(bf16, x, args.repeats)
        t_ours = rg.graph_time(fns, x, args.repeats)
        err = _error(fns[0].__defaults__[0], rg.activations(m, in_f, 21, dev))
        rows.append({"tower": tower, "layer": label, "M": m, "instances": reps, "bf16_s": t_bf16,
                     "ours_s": t_ours, "ratio": t_ours / t_bf16, "rel_err": err, "token_minor_input": False,
                     "token_minor_output": producer and rg.token_minor_pays(m)})
        _print(rows[-1])
    del bf16, groups, fns
    torch.cuda.empty_cache()
    return rows


def _print(r: dict) -> None:
    flag = "  > bf16" if r["ratio"] > 1.0 else ""
    print(f"{r['tower']:6s} {r['layer']:13s} M={r['M']:5d}: bf16 {r['bf16_s'] * 1e6:8.1f} us | ours "
          f"{r['ours_s'] * 1e6:8.1f} us ({r['ratio']:.2f}x) err {r['rel_err']:.1e}{flag}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/msweep_gpu.json"))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--l2-bytes", type=int, default=256 << 20, help="bf16 weight bytes per timed replay")
    ap.add_argument("--max-instances", type=int, default=32)
    ap.add_argument("--llm-ms", default=LLM_MS, help=f"language-model token counts (default {LLM_MS})")
    ap.add_argument("--expert-ms", default=EXPERT_MS, help=f"action-expert token counts (default {EXPERT_MS}; "
                    "'' skips the expert)")
    ap.add_argument("--layers", default=LAYERS, help=f"which layers to sweep, of {', '.join(known_layers())} "
                    f"(default {LAYERS})")
    args = ap.parse_args(argv)
    try:
        ms = {"llm": parse_ms(args.llm_ms) if args.llm_ms else [],
              "expert": parse_ms(args.expert_ms) if args.expert_ms else []}
    except ValueError as err:
        ap.error(str(err))
    layers = set(filter(None, args.layers.split(",")))
    known = set(known_layers())
    if not layers or layers - known:
        ap.error(f"--layers: unknown {sorted(layers - known)}; known: {known_layers()}")
    if not torch.cuda.is_available():
        print("msweep_gpu.py needs a CUDA GPU (this machine has none)", file=sys.stderr)
        return 2
    import triton
    dev = torch.device("cuda")
    result = {"benchmark": "msweep_gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "settings": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    for tower in ("llm", "expert"):
        if not ms[tower]:
            continue
        for name, out_f, in_f in TOWERS[tower]:
            if name in layers:
                result["rows"] += sweep_layer(tower, name, out_f, in_f, ms[tower], args, dev)
                write_results(args.out, result, indent=1)
        for label in GROUPS:
            if label in layers:
                result["rows"] += sweep_group(tower, label, ms[tower], args, dev)
    result["worst_per_layer"] = worst_per_layer(result["rows"])
    result["over_bf16"] = over_bf16(result["rows"])
    for key, w in result["worst_per_layer"].items():
        print(f"WORST {key:22s} {w['ratio']:.2f}x at M = {w['M']}")
    print(f"OVER bf16: {len(result['over_bf16'])} of {len(result['rows'])} rows", flush=True)
    write_results(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
