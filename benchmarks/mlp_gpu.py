"""Benchmark: the pi0.5 gated MLP block against bf16, with and without the fused activation.

    PYTHONPATH=. python3 benchmarks/mlp_gpu.py [--out FILE] [--repeats N] [--cases expert:50,llm:800,...]
                                               [--down-ab KEY=VALUE,...]

A Gemma MLP block is ``down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))``: besides the three
linears, torch runs the activation and the product as two elementwise launches. Per case (tower,
M tokens), CUDA-graph replays of R block instances (their bf16 weights together over --l2-bytes,
so that a replay streams weights from memory as the model does; time per block = replay / R),
all in the same run: the median of --repeats replays per capture, the median over --captures fresh
captures (interleaved: bf16, unfused, fused each round; the same chain captured twice can differ by
~1.5 us at 50 tokens):
- bf16: the block with bf16 `nn.Linear` layers;
- bf16 compiled: the same with the activation and the product as one `torch.compile`d function
  (Inductor fuses them into one elementwise kernel, as it would in a compiled model);
- ours (unfused): `DuQuantLinear` W4A8 with dynamic per-token activation scales, gate/up linked
  (one input transform and GEMM) writing the hidden token-minor: what `apply_pack` gave before
  `fuse_mlp_activations`;
- ours (fused): the same modules after `duquant_runtime.mlp_activation.fuse_mlp_activations`:
  down_proj's prep launch computes gelu_tanh(gate) * up from the loaded tiles (kernels/hidden.py),
  or, where its first launch does not read x itself (the Gluon activation passes of the language
  model's down_proj above 64 tokens), one elementwise launch does (`hidden.hidden_launch`);
- with --down-ab: the fused block with those keys over down_proj's launch picks (an A/B).
Numerics: the fused block's output against the unfused one (bit-identical or not, relative
Frobenius difference) and against the float32 reference path of the same modules (use_fast=False).
Total: the workload's blocks, the language model's at M = 800 once plus the action expert's at
M = 50 ten times (one `sample_actions` call), over 18 layers each.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from w4a8_cases import parse_overrides  # noqa: E402
from runtime_gpu import (EXPERT, LLM, LAYERS_PER_TOWER, activations, graph_time, instance_count, random_layer,  # noqa: E402
                         rel)
from duquant_runtime import DuQuantLinear  # noqa: E402
from duquant_runtime.input_group import link_input_group  # noqa: E402
from duquant_runtime.kernels import w4a8  # noqa: E402
from duquant_runtime.mlp_activation import fuse_mlp_activations, unfuse_mlp_activations  # noqa: E402
from duquant_runtime.mlp_layout import mark_token_minor  # noqa: E402
from duquant_runtime.transforms import n_blocks  # noqa: E402

DEFAULT_CASES = "expert:50,llm:800,llm:1,expert:1,expert:100,expert:256,llm:64,llm:256"
WORKLOAD = {("llm", 800): 1, ("expert", 50): 10}


def gelu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(gate, approximate="tanh") * up


class GatedMLP(nn.Module):
    """A Gemma MLP block (transformers' GemmaMLP with gelu_pytorch_tanh); act_fn: a function of (gate,
    up) used for the hidden instead (the compiled baseline)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn=None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x):
        if self.act_fn is not None:
            return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(nn.functional.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


@contextlib.contextmanager
def down_picks(over: dict, n: int, k: int):
    """Within: `over`'s keys over `pick_config`'s picks for (N, K) = (n, k) layers (down_proj's)."""
    picks = w4a8.pick_config

    def patched(m_, n_, k_, mode):
        cfg = picks(m_, n_, k_, mode)
        return {**cfg, **over} if (n_, k_) == (n, k) else cfg

    w4a8.pick_config = patched
    try:
        yield
    finally:
        w4a8.pick_config = picks


def mlp_shape(tower: str) -> tuple[int, int]:
    """(intermediate, width) of one tower's MLP: gate_proj's (out, in)."""
    return next((o, i) for n, o, i in (LLM if tower == "llm" else EXPERT) if n == "gate_proj")


def build_blocks(tower: str, reps: int, dev) -> tuple[list, list]:
    """`reps` (bf16 block, quantized block) pairs of one tower's MLP shapes, random weights with
    outlier columns; gate/up share one input transform (a --share-inputs pack) and are linked."""
    (inter, width), bf16, ours = mlp_shape(tower), [], []
    for r in range(reps):
        g = torch.Generator(device="cpu").manual_seed(500 + r)
        side = (torch.randperm(width, generator=g),
                torch.linalg.qr(torch.randn(n_blocks(width, 64), 64, 64, generator=g, dtype=torch.float64))[0]
                .to(torch.float32).contiguous())
        made = [random_layer(inter, width, 3000 * r + 1, dev, input_side=side),
                random_layer(inter, width, 3000 * r + 2, dev, input_side=side),
                random_layer(width, inter, 3000 * r + 3, dev)]
        bf16.append(GatedMLP(*(lin for lin, _, _ in made)).eval())
        q = [DuQuantLinear.from_linear(nn.Linear(lp.in_features, lp.out_features, bias=False, device="meta",
                                                 dtype=torch.bfloat16), lp, abits=8, act_mode="dynamic", device=dev,
                                       rot_dtype=torch.float16) for _, lp, _ in made]
        link_input_group(q[:2])
        block = GatedMLP(*q).eval()
        mark_token_minor(block)
        ours.append(block)
    return bf16, ours


def bench_case(tower: str, m: int, args, dev) -> dict:
    inter, width = mlp_shape(tower)
    reps = instance_count(3 * inter * width * 2, args)  # the block's three bf16 weights
    bf16, ours = build_blocks(tower, reps, dev)
    compiled_act = torch.compile(gelu_product, dynamic=False)
    bf16c = [GatedMLP(b.gate_proj, b.up_proj, b.down_proj, act_fn=compiled_act).eval() for b in bf16]
    x = activations(m, width, 11, dev)
    with torch.no_grad():
        samples = {"bf16": [], "bf16_compiled": [], "unfused": [], "fused": []}
        if args.down_ab:
            samples["fused_ab"] = []
        for _ in range(args.captures):  # the variants interleaved, a fresh capture each round
            samples["bf16"].append(graph_time(bf16, x, args.repeats))
            samples["bf16_compiled"].append(graph_time(bf16c, x, args.repeats))
            samples["unfused"].append(graph_time(ours, x, args.repeats))
            for b in ours:
                fuse_mlp_activations(b)
            samples["fused"].append(graph_time(ours, x, args.repeats))
            if args.down_ab:
                with down_picks(args.down_ab, width, inter):
                    samples["fused_ab"].append(graph_time(ours, x, args.repeats))
            for b in ours:
                unfuse_mlp_activations(b)
        t = {k: statistics.median(v) for k, v in samples.items()}
        t_bf16, t_unfused, t_fused = t["bf16"], t["unfused"], t["fused"]
        diffs = []
        for seed in (21, 22, 23):
            xs = activations(m, width, seed, dev)
            unfused = ours[0](xs)
            fused_map = fuse_mlp_activations(ours[0])
            fused = ours[0](xs)
            unfuse_mlp_activations(ours[0])
            diffs.append((torch.equal(fused, unfused), rel(fused, unfused)))
        assert fused_map == {"": "gelu_tanh"}, fused_map
        fuse_mlp_activations(ours[0])
        errs = []
        for seed in (21, 22, 23):
            xs = activations(m, width, seed, dev)
            fast = ours[0](xs)
            for lay in (ours[0].gate_proj, ours[0].up_proj, ours[0].down_proj):
                lay.use_fast = False
            ref = ours[0](xs)
            for lay in (ours[0].gate_proj, ours[0].up_proj, ours[0].down_proj):
                lay.use_fast = True
            errs.append(rel(fast, ref))
    res = {"tower": tower, "M": m, "instances": reps, "bf16_block_s": t_bf16, "ours_unfused_s": t_unfused,
           "ours_fused_s": t_fused, "ratio_unfused": t_unfused / t_bf16, "ratio_fused": t_fused / t_bf16,
           "bf16_compiled_block_s": t["bf16_compiled"], "ratio_fused_vs_compiled": t_fused / t["bf16_compiled"],
           "captures_s": samples,
           "fused_equals_unfused": all(d[0] for d in diffs), "rel_diff_fused_vs_unfused": max(d[1] for d in diffs),
           "rel_err_fused_vs_reference": max(errs)}
    if args.down_ab:
        res.update(down_ab={k: str(v) for k, v in args.down_ab.items()}, ours_fused_ab_s=t["fused_ab"],
                   ratio_fused_ab=t["fused_ab"] / t_bf16)
    spread = " | fused per capture " + "/".join(f"{v * 1e6:.1f}" for v in samples["fused"])
    ab = f" | down-ab {t['fused_ab'] * 1e6:8.1f} ({res['ratio_fused_ab']:.2f}x)" if args.down_ab else ""
    print(f"{tower:6s} MLP M={m:4d} bf16 {t_bf16 * 1e6:8.1f} us | bf16 compiled {t['bf16_compiled'] * 1e6:8.1f} | unfused "
          f"{t_unfused * 1e6:8.1f} ({res['ratio_unfused']:.2f}x) | fused {t_fused * 1e6:8.1f} ({res['ratio_fused']:.2f}x, "
          f"{res['ratio_fused_vs_compiled']:.2f}x compiled){ab}{spread} | fused == unfused "
          f"{res['fused_equals_unfused']} (rel {res['rel_diff_fused_vs_unfused']:.1e}) | err vs ref "
          f"{res['rel_err_fused_vs_reference']:.1e}", flush=True)
    return res


def parse_cases(text: str) -> list[tuple[str, int]]:
    """[(tower, M)] of "tower:M[,...]" (tower llm or expert); ValueError naming a bad entry."""
    out = []
    for item in filter(None, text.split(",")):
        tower, _, m = item.partition(":")
        if tower not in ("llm", "expert") or not m.isdigit() or int(m) < 1:
            raise ValueError(f"bad case {item!r}: expected llm:M or expert:M with M >= 1")
        out.append((tower, int(m)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mlp_gpu.json"))
    ap.add_argument("--repeats", type=int, default=15, help="timed replays per capture (median taken)")
    ap.add_argument("--captures", type=int, default=3, help="fresh CUDA-graph captures per variant, interleaved; "
                    "the median of their medians is reported (captures of one chain differ by up to ~1.5 us)")
    ap.add_argument("--l2-bytes", type=int, default=256 << 20, help="bf16 weight bytes per timed replay")
    ap.add_argument("--max-instances", type=int, default=16)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated tower:M (tower: llm or expert)")
    ap.add_argument("--down-ab", default="", help="also time the fused block with KEY=VALUE[,...] (Python literals, "
                    "launch-configuration keys) over down_proj's picks, e.g. ACT=None (the Triton activation "
                    "launches instead of the Gluon passes)")
    args = ap.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
        args.down_ab = parse_overrides(args.down_ab)
    except ValueError as err:
        ap.error(str(err))
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = []
    for tower, m in cases:
        rows.append(bench_case(tower, m, args, dev))
        torch.cuda.empty_cache()
    result = {"benchmark": "mlp_gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "settings": {k: str(v) for k, v in vars(args).items()}, "cases": rows}
    timed = {(r["tower"], r["M"]): r for r in rows}
    if all(key in timed for key in WORKLOAD):
        total = {k: sum(w * timed[key][k] for key, w in WORKLOAD.items()) * LAYERS_PER_TOWER
                 for k in ("bf16_block_s", "bf16_compiled_block_s", "ours_unfused_s", "ours_fused_s")}
        total["ratio_unfused"] = total["ours_unfused_s"] / total["bf16_block_s"]
        total["ratio_fused"] = total["ours_fused_s"] / total["bf16_block_s"]
        total["ratio_fused_vs_compiled"] = total["ours_fused_s"] / total["bf16_compiled_block_s"]
        result["total_sample_actions_mlp_blocks"] = total
        print(f"TOTAL MLP blocks (18 x (LLM M=800 + 10 x expert M=50)): bf16 {total['bf16_block_s'] * 1e6:.0f} us, "
              f"bf16 compiled {total['bf16_compiled_block_s'] * 1e6:.0f} us, "
              f"unfused {total['ours_unfused_s'] * 1e6:.0f} us ({total['ratio_unfused']:.3f}x), fused "
              f"{total['ours_fused_s'] * 1e6:.0f} us ({total['ratio_fused']:.3f}x bf16, "
              f"{total['ratio_fused_vs_compiled']:.3f}x bf16 compiled)", flush=True)
    write_results(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
