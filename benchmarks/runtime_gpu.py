"""Benchmark: the W4 GPU kernels against bf16 `nn.Linear` on the pi0.5 linear shapes.

    PYTHONPATH=. python3 benchmarks/runtime_gpu.py [--out FILE] [--pack DIR --ckpt DIR]

Workload (the shape of one `sample_actions` call): the language model's q/k/v/o/gate/up/down
(2048 wide, MLP 16384) at M = 800 tokens (prefix pass) and M = 1, the action expert's
q/k/v/o/gate/up/down (1024 wide, MLP 4096) at M = 50 (one flow-matching step); total = LLM set
once at M = 800 + expert set ten times at M = 50.

Per shape and M, all timed as CUDA-graph replays in the same run (median of --repeats samples;
each replay calls R distinct layer instances so that the weights of a sample exceed the L2
cache, time per call = replay / R):
- bf16 `nn.Linear` (bf16 input);
- old-style fake quantization: the existing implementation's scheme (bf16 fake-quantized W_t
  kept in float, transforms as unfused torch ops: gather, block bmm, per-channel fake quant,
  matmul, block bmm restore, bias);
- ours: `DuQuantLinear` W4A8 on the Triton path, dynamic per-token and static
  per-channel activation scales (rotations float16, packed int4 weights).
Numerics: each shape's fast output is compared with the float32 reference path of the same
module (use_fast=False) on fresh random inputs: relative Frobenius error.

Memory: analytic bytes of the 252-layer pi0.5 set (int4 + scales + rotations + permutations +
activation scales), checked against the measured `nbytes` of the modules built here.
--pack/--ckpt: apply a real pack (built with --store-qweights) to a module tree with the
checkpoint's pi0.5 names and shapes, weights on the meta device for layers whose integers the
pack stores: apply time (load_pack + apply_pack to CUDA) and resident bytes (report and
torch.cuda.memory_allocated, and the bytes the tensors requested from the allocator).
Launch configurations per shape: benchmarks/sweep_w4a8.py (what kernels/w4a8.pick_config encodes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from duquant_runtime import DuQuantLinear  # noqa: E402
from duquant_runtime.mlp_layout import MLP_CONSUMERS  # noqa: E402
from duquant_runtime.pack import LayerPack  # noqa: E402
from duquant_runtime.quant import absmax_scales, pack_int4, quantize_rows  # noqa: E402
from duquant_runtime.transforms import input_transform, n_blocks  # noqa: E402

LLM = [("q_proj", 2048, 2048), ("k_proj", 256, 2048), ("v_proj", 256, 2048), ("o_proj", 2048, 2048),
       ("gate_proj", 16384, 2048), ("up_proj", 16384, 2048), ("down_proj", 2048, 16384)]
EXPERT = [("q_proj", 2048, 1024), ("k_proj", 256, 1024), ("v_proj", 256, 1024), ("o_proj", 1024, 2048),
          ("gate_proj", 4096, 1024), ("up_proj", 4096, 1024), ("down_proj", 1024, 4096)]
LAYERS_PER_TOWER = 18
BLOCK = 64


def random_layer(out_f: int, in_f: int, seed: int, dev, input_side=None) -> tuple[nn.Linear, LayerPack, torch.Tensor]:
    """bf16 nn.Linear and a LayerPack with stored int4 integers of its transformed weight.
    input_side: (perm, r_in) to use instead of the layer's own (a shared input group)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.02)
    w[:, torch.randperm(in_f, generator=g)[:4]] *= 20.0
    lin = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w.to(dev, torch.bfloat16))

    def orth(n):
        return torch.linalg.qr(torch.randn(n_blocks(n, BLOCK), BLOCK, BLOCK, generator=g, dtype=torch.float64))[0] \
            .to(torch.float32).contiguous()
    perm = torch.randperm(in_f, generator=g)
    r_in, r_out = orth(in_f), orth(out_f)
    if input_side is not None:
        perm, r_in = input_side
    from duquant_runtime.transforms import transform_weight
    w_t = transform_weight(w.to(dev), perm.to(dev), r_in.to(dev), r_out.to(dev))
    scale = absmax_scales(w_t, 4)
    q = quantize_rows(w_t, scale, 4)
    w_fq = (q.to(torch.float32) * scale[:, None]).to(torch.bfloat16)  # the old scheme's fake-quantized W_t
    lp = LayerPack(name="l", in_features=in_f, out_features=out_f, wbits=4, block_in=BLOCK, block_out=BLOCK,
                   perm=perm, r_in=r_in, r_out=r_out, weight_scale=scale.cpu(), meta={},
                   qweight=pack_int4(q).cpu())
    return lin, lp, w_fq


def activations(m: int, n: int, seed: int, dev) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, n, generator=g)
    x[:, torch.randperm(n, generator=g)[:3]] *= torch.tensor([30.0, 60.0, 100.0])
    return x.to(dev, torch.bfloat16)


class OldFakeQuant(nn.Module):
    """The existing implementation's forward: fake-quantized bf16 W_t, unfused torch transforms."""

    def __init__(self, q: DuQuantLinear, w_fq: torch.Tensor):
        super().__init__()
        self.perm, self.w = q.perm, w_fq
        self.r_in, self.r_out = q.r_in.to(torch.bfloat16), q.r_out.to(torch.bfloat16)
        self.act_scale = q.act_scale.to(torch.bfloat16)

    def forward(self, x):
        xt = x[..., self.perm]
        nb, b, _ = self.r_in.shape
        xt = torch.bmm(xt.reshape(-1, nb, b).transpose(0, 1), self.r_in).transpose(0, 1).reshape(x.shape)
        xt = torch.clamp(torch.round(xt / self.act_scale), -128, 127) * self.act_scale
        y = xt @ self.w.t()
        nbo, bo, _ = self.r_out.shape
        return torch.bmm(y.reshape(-1, nbo, bo).transpose(0, 1), self.r_out.transpose(1, 2)).transpose(0, 1) \
            .reshape(y.shape)


def capture(fns, x) -> torch.cuda.CUDAGraph:
    """A CUDA graph of [f(x) for f in fns], after two warm-up rounds on a side stream (compilation
    and allocations happen outside the capture)."""
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                for f in fns:
                    f(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f(x)
    return g


def graph_time(fns, x, repeats: int, min_ms: float = 2.0) -> float:
    """Median seconds of one call, from CUDA-graph replays of [f(x) for f in fns] (time / len(fns))."""
    g = capture(fns, x)
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(min_ms / 1e3 / one))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(n):
            g.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / n / len(fns))
    del g
    return statistics.median(samples)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_shape(tower: str, name: str, out_f: int, in_f: int, m: int, args, dev) -> dict:
    bf16_bytes = out_f * in_f * 2
    reps = instance_count(bf16_bytes, args)
    lins, dyns, stats, olds = [], [], [], []
    for i in range(reps):
        lin, lp, w_fq = random_layer(out_f, in_f, 1000 * i + in_f + out_f, dev)
        meta = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=torch.bfloat16)
        d = DuQuantLinear.from_linear(meta, lp, abits=8, act_mode="dynamic", device=dev, rot_dtype=torch.float16)
        st = DuQuantLinear.from_linear(meta, lp, abits=8, act_mode="static", device=dev, rot_dtype=torch.float16)
        xc = activations(256, in_f, 7, dev).float()
        xt = input_transform(xc, st.perm, st.r_in.float())
        st.set_act_scale(xt.abs().amax(0).clamp_min(1e-6) / 127 * 0.9)
        lins.append(lin)
        dyns.append(d)
        stats.append(st)
        if i == 0 or args.old_all:
            olds.append(OldFakeQuant(st, w_fq))
        del w_fq
    x = activations(m, in_f, 11, dev)
    err = {}
    with torch.no_grad():
        for label, q in (("dynamic", dyns[0]), ("static", stats[0])):
            worst = 0.0
            for seed in (21, 22, 23):
                xs = activations(m, in_f, seed, dev)
                fast = q(xs)
                assert q.fast_path_reason(xs) is None, q.fast_path_reason(xs)
                q.use_fast = False
                ref = q(xs)
                q.use_fast = True
                assert torch.isfinite(fast).all()
                worst = max(worst, rel(fast, ref))
            err[label] = worst
    t = {"bf16_linear_s": graph_time(lins, x, args.repeats),
         "old_fakequant_s": graph_time(olds, x, args.repeats),
         "ours_dynamic_s": graph_time(dyns, x, args.repeats),
         "ours_static_s": graph_time(stats, x, args.repeats)}
    if name in MLP_CONSUMERS and token_minor_pays(m):  # x as a token-minor MLP hidden (mlp_layout.py)
        xtm = x.t().contiguous().t()
        t["ours_dynamic_tm_s"] = graph_time(dyns, xtm, args.repeats)
        t["ours_static_tm_s"] = graph_time(stats, xtm, args.repeats)
        print(f"{tower:6s} {name:10s} M={m:4d} token-minor input: dyn {t['ours_dynamic_tm_s'] * 1e6:8.1f} us | "
              f"static {t['ours_static_tm_s'] * 1e6:8.1f} us", flush=True)
    t["ratio_dynamic"] = t["ours_dynamic_s"] / t["bf16_linear_s"]
    t["ratio_static"] = t["ours_static_s"] / t["bf16_linear_s"]
    t["ratio_old"] = t["old_fakequant_s"] / t["bf16_linear_s"]
    res = {"tower": tower, "name": name, "out": out_f, "in": in_f, "M": m, "instances": reps, **t,
           "rel_err_vs_reference": err, "nbytes_module": stats[0].nbytes, "nbytes_bf16": bf16_bytes}
    print(f"{tower:6s} {name:10s} M={m:4d} bf16 {t['bf16_linear_s'] * 1e6:8.1f} us | old {t['old_fakequant_s'] * 1e6:8.1f} | "
          f"dyn {t['ours_dynamic_s'] * 1e6:8.1f} ({t['ratio_dynamic']:.2f}x) | static {t['ours_static_s'] * 1e6:8.1f} "
          f"({t['ratio_static']:.2f}x) | err dyn {err['dynamic']:.1e} st {err['static']:.1e}", flush=True)
    return res


# input groups of a --share-inputs pack: (group label, member names); o_proj and down_proj stay alone
GROUPS = [("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj"))]
MLP_PRODUCERS = {p for producers in MLP_CONSUMERS.values() for p in producers}  # gate_proj, up_proj, ...


def token_minor_pays(m: int) -> bool:
    from duquant_runtime.kernels.w4a8 import token_minor_pays as pays  # Triton: imported on the GPU machine
    return pays(m)


def add_ratios(t: dict, bf16_key: str, concatenated_key: str) -> None:
    """ratio_<mode> (ours / bf16 layer by layer) and ratio_<mode>_vs_concatenated, in place."""
    for mode in ("dynamic", "static"):
        t[f"ratio_{mode}"] = t[f"ours_{mode}_s"] / t[bf16_key]
        t[f"ratio_{mode}_vs_concatenated"] = t[f"ours_{mode}_s"] / t[concatenated_key]


def build_group(tower: str, names: tuple, reps: int, dev, modes=("dynamic", "static")) -> tuple[list, list, dict]:
    """`reps` instances of one input group sharing one (perm, R_in): the bf16 members called one by
    one (callables), one bf16 nn.Linear over their concatenated rows each, and per activation mode
    the linked `DuQuantLinear` members (callables whose default argument `mods` holds them)."""
    from duquant_runtime.input_group import link_input_group
    shapes = {n: (o, i) for n, o, i in (LLM if tower == "llm" else EXPERT)}
    members = [(n, *shapes[n]) for n in names]
    in_f = members[0][2]
    out_tot = sum(o for _, o, _ in members)
    groups = {mode: [] for mode in modes}
    bf16, bf16_cat = [], []
    for r in range(reps):
        g = torch.Generator(device="cpu").manual_seed(77 + r)
        perm = torch.randperm(in_f, generator=g)
        r_in = torch.linalg.qr(torch.randn(n_blocks(in_f, BLOCK), BLOCK, BLOCK, generator=g,
                                           dtype=torch.float64))[0].to(torch.float32).contiguous()
        lins, lps = [], []
        for j, (_, o, i) in enumerate(members):
            lin, lp, _ = random_layer(o, i, 1000 * r + 17 * j + o + i, dev, input_side=(perm, r_in))
            lins.append(lin)
            lps.append(lp)
        bf16.append(lambda x, lins=lins: [lin(x) for lin in lins])
        cat = nn.Linear(in_f, out_tot, bias=False, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            cat.weight.copy_(torch.cat([lin.weight for lin in lins]))
        bf16_cat.append(cat)
        for mode in groups:
            mods = [DuQuantLinear.from_linear(nn.Linear(i, o, bias=False, device="meta", dtype=torch.bfloat16), lp,
                                              abits=8, act_mode=mode, device=dev, rot_dtype=torch.float16)
                    for lp, (_, o, i) in zip(lps, members)]
            if mode == "static":
                xt = input_transform(activations(256, in_f, 7, dev).float(), mods[0].perm, mods[0].r_in.float())
                for q in mods:
                    q.set_act_scale(xt.abs().amax(0).clamp_min(1e-6) / 127 * 0.9)
            link_input_group(mods)
            groups[mode].append(lambda x, mods=mods: [q(x) for q in mods])
    return bf16, bf16_cat, groups


def instance_count(bf16_bytes: int, args) -> int:
    """Layer instances per timed replay whose bf16 weights of `bf16_bytes` each together exceed
    args.l2_bytes (1..args.max_instances): a replay then streams its weights from memory."""
    return max(1, min(args.max_instances, -(-args.l2_bytes // bf16_bytes)))


def group_instances(tower: str, names: tuple, args) -> int:
    """`instance_count` of an input group (its members' bf16 weights together)."""
    shapes = {n: (o, i) for n, o, i in (LLM if tower == "llm" else EXPERT)}
    return instance_count(sum(shapes[n][0] * shapes[n][1] * 2 for n in names), args)


def bench_group(tower: str, label: str, names: tuple, m: int, args, dev) -> dict:
    """One input group linked (duquant_runtime.input_group): the members' calls on one activation
    (one fused launch pair) against the bf16 members called one by one, and against one bf16
    nn.Linear over the concatenated rows (what a model with fused q/k/v weights would run)."""
    reps = group_instances(tower, names, args)
    bf16, bf16_cat, groups = build_group(tower, names, reps, dev)
    in_f = {n: i for n, _, i in (LLM if tower == "llm" else EXPERT)}[names[0]]
    x = activations(m, in_f, 11, dev)
    err = {}
    with torch.no_grad():
        for mode, fns in groups.items():
            mods = fns[0].__defaults__[0]
            worst = 0.0
            for seed in (21, 22, 23):
                xs = activations(m, in_f, seed, dev)
                fast = [q(xs) for q in mods]
                for q, y in zip(mods, fast):
                    q.use_fast = False
                    worst = max(worst, rel(y, q(xs)))
                    q.use_fast = True
            err[mode] = worst
    t = {"bf16_members_s": graph_time(bf16, x, args.repeats), "bf16_concatenated_s": graph_time(bf16_cat, x, args.repeats),
         "ours_dynamic_s": graph_time(groups["dynamic"], x, args.repeats),
         "ours_static_s": graph_time(groups["static"], x, args.repeats)}
    if set(names) <= MLP_PRODUCERS and token_minor_pays(m):  # gate/up writing a token-minor hidden
        for mode, fns in groups.items():
            for f in fns:
                for q in f.__defaults__[0]:
                    q.token_minor_output = True
            t[f"ours_{mode}_tm_s"] = graph_time(fns, x, args.repeats)
        print(f"{tower:6s} {label:10s} M={m:4d} token-minor output: dyn {t['ours_dynamic_tm_s'] * 1e6:8.1f} us | "
              f"static {t['ours_static_tm_s'] * 1e6:8.1f} us", flush=True)
    add_ratios(t, "bf16_members_s", "bf16_concatenated_s")
    print(f"{tower:6s} {label:10s} M={m:4d} bf16 {t['bf16_members_s'] * 1e6:8.1f} us (one concatenated "
          f"{t['bf16_concatenated_s'] * 1e6:.1f}) | linked dyn {t['ours_dynamic_s'] * 1e6:8.1f} ({t['ratio_dynamic']:.2f}x) "
          f"| static {t['ours_static_s'] * 1e6:8.1f} ({t['ratio_static']:.2f}x) | err dyn {err['dynamic']:.1e} "
          f"st {err['static']:.1e}", flush=True)
    return {"tower": tower, "group": label, "members": list(names), "M": m, "instances": reps, **t,
            "rel_err_vs_reference": err}


def memory_252(rot_bytes: int = 2) -> dict:
    """Analytic resident bytes of the 252-layer pi0.5 set (18 LLM + 18 expert decoder layers)."""
    tot = {"int4_weights": 0, "weight_scales": 0, "rotations": 0, "permutations": 0, "act_scales": 0, "bf16": 0}
    weights = 0
    for _, o, i in LLM + EXPERT:
        tot["int4_weights"] += o * ((i + 1) // 2)
        tot["weight_scales"] += 4 * o
        tot["rotations"] += rot_bytes * BLOCK * BLOCK * (n_blocks(i, BLOCK) + n_blocks(o, BLOCK))
        tot["permutations"] += 8 * i
        tot["act_scales"] += 4 * i
        tot["bf16"] += 2 * o * i
        weights += o * i
    tot = {k: v * LAYERS_PER_TOWER for k, v in tot.items()}
    total = sum(v for k, v in tot.items() if k != "bf16")
    return {**tot, "weights": weights * LAYERS_PER_TOWER, "total": total, "total_gib": total / 2**30,
            "bf16_gib": tot["bf16"] / 2**30, "ratio_vs_bf16": total / tot["bf16"]}


def shared_total(rows: list[dict], args, dev) -> dict:
    """Total of one sample_actions call with a --share-inputs pack: the linked q/k/v and gate/up
    groups (timed here) plus o_proj and down_proj (from `rows`), against the same bf16 total."""
    groups = []
    for tower, m in (("llm", 800), ("expert", 50), ("llm", 1)):
        for label, names in GROUPS:
            groups.append(bench_group(tower, label, names, m, args, dev))
            torch.cuda.empty_cache()
    total = {"bf16_linear_s": 0.0, "bf16_concatenated_groups_s": 0.0, "ours_dynamic_s": 0.0, "ours_static_s": 0.0,
             "ours_dynamic_tm_s": 0.0, "ours_static_tm_s": 0.0}
    weight = {("llm", 800): 1, ("expert", 50): 10}
    timed = [r for r in rows if r["name"] in ("o_proj", "down_proj")] + groups
    for r in rows:
        total["bf16_linear_s"] += weight.get((r["tower"], r["M"]), 0) * r["bf16_linear_s"]
    for r in timed:  # ours_<mode>_tm_s: with apply_pack's token-minor MLP hidden (mlp_layout.py)
        w = weight.get((r["tower"], r["M"]), 0)
        total["bf16_concatenated_groups_s"] += w * r.get("bf16_concatenated_s", r.get("bf16_linear_s"))
        for mode in ("dynamic", "static"):
            total[f"ours_{mode}_s"] += w * r[f"ours_{mode}_s"]
            total[f"ours_{mode}_tm_s"] += w * r.get(f"ours_{mode}_tm_s", r[f"ours_{mode}_s"])
    add_ratios(total, "bf16_linear_s", "bf16_concatenated_groups_s")
    for mode in ("dynamic", "static"):
        total[f"ratio_{mode}_tm"] = total[f"ours_{mode}_tm_s"] / total["bf16_linear_s"]
    print(f"TOTAL with linked input groups: bf16 {total['bf16_linear_s'] * 1e6:.0f} us (q/k/v and gate/up as one "
          f"bf16 linear each: {total['bf16_concatenated_groups_s'] * 1e6:.0f} us), ours dynamic "
          f"{total['ours_dynamic_s'] * 1e6:.0f} us ({total['ratio_dynamic']:.2f}x), static "
          f"{total['ours_static_s'] * 1e6:.0f} us ({total['ratio_static']:.2f}x); with the token-minor MLP hidden: "
          f"dynamic {total['ours_dynamic_tm_s'] * 1e6:.0f} us ({total['ratio_dynamic_tm']:.2f}x), static "
          f"{total['ours_static_tm_s'] * 1e6:.0f} us ({total['ratio_static_tm']:.2f}x)", flush=True)
    return {**total, "groups": groups}


def apply_real_pack(pack_dir: Path, ckpt_dir: Path, dev, act_mode: str) -> dict:
    """Apply a real pack to a tree of bf16 nn.Linear modules named after the checkpoint's keys
    (weights on the meta device where the pack stores integers); time and resident bytes."""
    from safetensors import safe_open
    from duquant_runtime import apply_pack, load_pack
    from duquant_runtime.pack import READ_WORKERS
    pack = load_pack(pack_dir)
    stored = {e["name"] for e in pack.manifest["layers"] if e.get("qweight")}
    ckpt = ckpt_dir / "model.safetensors" if ckpt_dir.is_dir() else ckpt_dir
    root = nn.Module()
    loaded = 0
    with safe_open(str(ckpt), "pt") as f:
        for key in f.keys():
            if not key.endswith(".weight"):
                continue
            name = key[: -len(".weight")]
            if name not in pack.layer_names:
                continue
            shape = f.get_slice(key).get_shape()
            if len(shape) != 2:
                continue
            lin = nn.Linear(shape[1], shape[0], bias=False, device="meta", dtype=torch.bfloat16)
            if name not in stored:
                lin.weight = nn.Parameter(f.get_tensor(key).to(dev), requires_grad=False)
                loaded += 1
            mod = root
            parts = name.split(".")
            for p in parts[:-1]:
                if p not in mod._modules:
                    mod.add_module(p, nn.Module())
                mod = mod._modules[p]
            mod.add_module(parts[-1], lin)
    cuda = dev.type == "cuda"
    # The first DuQuantLinear marks its eager-only methods with torch.compiler.disable, which
    # imports torch._dynamo (and with it Triton's kernel wrappers): a once-per-process cost that a
    # process using torch.compile has already paid. Timed apart from loading and applying.
    t_imp = time.perf_counter()
    importlib.import_module("torch._dynamo")
    t_import = time.perf_counter() - t_imp
    if cuda:
        torch.cuda.synchronize()
    mem0 = torch.cuda.memory_allocated() if cuda else 0
    req0 = torch.cuda.memory_stats()["requested_bytes.all.current"] if cuda else 0
    t0 = time.perf_counter()
    pack = load_pack(pack_dir)
    report = apply_pack(root, pack, device=dev, act_mode=act_mode)
    if cuda:
        torch.cuda.synchronize()
    t_apply = time.perf_counter() - t0
    mem1 = torch.cuda.memory_allocated() if cuda else 0
    req1 = torch.cuda.memory_stats()["requested_bytes.all.current"] if cuda else 0
    # reading and checking the layer files alone (page cache warm now), by one thread and by the
    # threads apply_pack uses (`Pack.read_layers`), alternated, medians of 3
    reads = {1: [], READ_WORKERS: []}
    for _ in range(3):
        for w in reads:
            t = time.perf_counter()
            pack.read_layers(pack.layer_names, workers=w)
            reads[w].append(time.perf_counter() - t)
    return {"pack": str(pack_dir), "layers": len(report.replaced), "stored_integer_layers": len(stored),
            "read_layers_1_thread_s": statistics.median(reads[1]), "read_workers": READ_WORKERS,
            "read_layers_threads_s": statistics.median(reads[READ_WORKERS]),
            "float_weights_loaded": loaded, "unchecked": len(report.unchecked),
            "input_groups_linked": len(report.input_groups),
            "load_plus_apply_s": t_apply, "import_torch_dynamo_s": t_import,
            "cold_process_total_s": t_apply + t_import, "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
            "bytes_after_gib": report.bytes_after / 2**30, "ratio": report.bytes_after / report.bytes_before,
            "cuda_allocated_delta_bytes": mem1 - mem0,  # allocator blocks, incl. unsplit remainders of reused ones
            "cuda_requested_delta_bytes": req1 - req0,  # the bytes the tensors asked for
            "summary": report.summary()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime_gpu.json"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--l2-bytes", type=int, default=256 << 20, help="bf16 weight bytes per timed replay")
    ap.add_argument("--max-instances", type=int, default=32)
    ap.add_argument("--old-all", action="store_true", help="R instances for the old scheme too (memory)")
    ap.add_argument("--only", default="", help="comma-separated tower:name:M filters (debugging)")
    ap.add_argument("--pack", type=Path)
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--act-mode", default="dynamic", choices=("dynamic", "static"))
    ap.add_argument("--pack-only", action="store_true", help="only the --pack measurement (any device)")
    ap.add_argument("--device", default="cuda", help="device for --pack-only (cpu for a dry check)")
    ap.add_argument("--no-groups", action="store_true", help="skip the linked input groups (--share-inputs)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    result = {"benchmark": "runtime_gpu", "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
              "torch": torch.__version__,
              "settings": {k: str(v) for k, v in vars(args).items()}}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    result["memory_252_analytic"] = memory_252()
    if args.pack:
        if not args.ckpt:
            ap.error("--pack needs --ckpt")
        result["real_pack"] = apply_real_pack(args.pack, args.ckpt, dev, args.act_mode)
        print(json.dumps(result["real_pack"], indent=1), flush=True)
        if args.pack_only:
            if args.out:
                write_results(args.out, result, indent=1)
            return 0
    work = [("llm", n, o, i, 800) for n, o, i in LLM] + [("llm", n, o, i, 1) for n, o, i in LLM] + \
           [("expert", n, o, i, 50) for n, o, i in EXPERT]
    if args.only:
        keep = set(args.only.split(","))
        work = [w for w in work if f"{w[0]}:{w[1]}:{w[4]}" in keep]
    rows = []
    for tower, name, o, i, m in work:
        rows.append(bench_shape(tower, name, o, i, m, args, dev))
        torch.cuda.empty_cache()
    result["shapes"] = rows
    keys = ("bf16_linear_s", "old_fakequant_s", "ours_dynamic_s", "ours_static_s")
    total = {k: 0.0 for k in keys}
    for r in rows:
        w = 1 if (r["tower"], r["M"]) == ("llm", 800) else 10 if (r["tower"], r["M"]) == ("expert", 50) else 0
        for k in keys:
            total[k] += w * r[k]
    if total["bf16_linear_s"]:
        for k, label in (("old_fakequant_s", "old"), ("ours_dynamic_s", "dynamic"), ("ours_static_s", "static")):
            total["ratio_" + label] = total[k] / total["bf16_linear_s"]
    result["total_sample_actions"] = total
    if not args.no_groups and not args.only:
        result["total_sample_actions_shared_inputs"] = shared_total(rows, args, dev)
    mem = result["memory_252_analytic"]
    measured = sum(r["nbytes_module"] for r in rows if (r["tower"], r["M"]) in (("llm", 800), ("expert", 50)))
    result["memory_252_measured_modules"] = {"bytes": measured * LAYERS_PER_TOWER,
                                             "gib": measured * LAYERS_PER_TOWER / 2**30}
    print(f"TOTAL (LLM M=800 + 10 x expert M=50): bf16 {total['bf16_linear_s'] * 1e6:.0f} us, old "
          f"{total['old_fakequant_s'] * 1e6:.0f} us, ours dynamic {total['ours_dynamic_s'] * 1e6:.0f} us "
          f"({total.get('ratio_dynamic', 0):.2f}x), static {total['ours_static_s'] * 1e6:.0f} us "
          f"({total.get('ratio_static', 0):.2f}x)")
    print(f"MEMORY 252 layers: analytic {mem['total_gib']:.3f} GiB ({mem['ratio_vs_bf16']:.3f}x of {mem['bf16_gib']:.2f} GiB"
          f" bf16); measured module bytes x18 {result['memory_252_measured_modules']['gib']:.3f} GiB")
    if args.out:
        write_results(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
