"""Maintained W4A8 GEMM kernels against ours and bf16 at the pi0.5 shapes (GPU; issue 6: "use what
exists before writing kernels").

    PYTHONPATH=.:LIBS python3 benchmarks/library_gemm.py [--only tower:name:M,...] [--repeats N]

LIBS: a folder holding the libraries, e.g. unpacked wheels (`pip download --no-deps torchao==0.15.0
gemlite`, then unzip / untar): neither is a dependency of duquant. For each shape, CUDA-graph
replays over enough weight instances to exceed L2 (`w4a8_cases.instances`), all in one run, medians:
- `bf16`: `F.linear` on bf16 weights (cuBLAS), the baseline;
- `int_mm`: cuBLAS int8 `torch._int_mm` on int8 codes and int8 weights (2x the int4 bytes; M padded
  to a multiple of 8 above 16, as it requires), no scales;
- `torchao_s8s4`: torchao's `rowwise_scaled_linear_cutlass_s8s4` (CUTLASS 2.x, int8 codes x packed
  int4 weights, per-token and per-row scales, bf16 out; shipped up to torchao 0.15);
- `gemlite_a8w4`: gemlite's `A8W4_HQQ_INT_dynamic` with int8 activations (Triton; its forward
  quantizes x per token, then runs its GEMM), and `gemlite_quant` its per-token quantize alone;
- `ours_gemm`: `w4_gemm` on int8 codes with scales, without the R_out restore; `ours_gemm_restore`
  with it (the launch `w4_linear` ends with);
- `ours_layer`: the whole dynamic W4A8 layer (`DuQuantLinear`: permutation, rotation, per-token
  quantize, GEMM, restore), on a row-major input and, for down_proj, a token-minor one (the MLP
  hidden `mlp_layout` gives it).
The libraries' GEMMs do no rotation, permutation or restore: what they would replace is
`ours_gemm_restore` at best (`ours_gemm` plus a restore launch). A library that does not import or
fails on a shape is reported with its reason. Writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from runtime_gpu import activations, graph_time, random_layer  # noqa: E402
from w4a8_cases import add_common_args, instances, selected_shapes  # noqa: E402
from duquant_runtime import DuQuantLinear  # noqa: E402

LIBS = ("torchao", "gemlite")

DEFAULT_ONLY = ("expert:down:50,expert:gate/up:50,expert:o:50,llm:down:64,llm:down:128,llm:down:256,"
                "llm:down:700,llm:down:800,llm:gate/up:65,llm:gate/up:192,llm:gate/up:800")


def _reason(err: Exception) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def _torchao_op(so: Path | None = None):
    """torchao's s8s4 operator, or the reason it is not there (one line). so: load this extension
    file of torchao's after its Python package (torchao skips its extensions for torch versions it
    was not built with; loading one anyway may fail or crash: run it in a process of its own)."""
    try:
        import torchao.ops  # noqa: F401
        if so is not None:
            torch.ops.load_library(str(so))
        op = torch.ops.torchao.rowwise_scaled_linear_cutlass_s8s4
        return op, None
    except Exception as err:  # not installed, built for another torch, or without the operator
        return None, _reason(err)


def _gemlite():
    """gemlite's A8W4 layer builder (int8 activations, 4-bit weights), or the reason it is not there."""
    try:
        import gemlite  # noqa: F401
        from gemlite.helper import A8W4_HQQ_INT_dynamic
        return A8W4_HQQ_INT_dynamic, None
    except Exception as err:
        return None, _reason(err)


def parse_libs(text: str) -> tuple[str, ...]:
    """The libraries a --libs value names (comma-separated, in LIBS order); ValueError naming unknown ones."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    if names - set(LIBS):
        raise ValueError(f"unknown {sorted(names - set(LIBS))}; known: {', '.join(LIBS)}")
    return tuple(n for n in LIBS if n in names)


def _try(times: dict, errors: dict, key: str, fn) -> None:
    try:
        times[key] = fn()
    except Exception as err:  # a kernel that does not support the shape: its reason, the run goes on
        errors[key] = _reason(err)
        print(f"    {key}: {errors[key]}", flush=True)


def bench(tower: str, name: str, n: int, k: int, m: int, repeats: int, l2_bytes: int, dev,
          torchao_so: Path | None = None, libs: tuple = LIBS) -> dict:
    from duquant_runtime.kernels import w4a8 as K  # needs Triton: imported where a GPU run needs it
    count = instances(n, k, l2_bytes)
    g = torch.Generator(device="cpu").manual_seed(n + k + m)
    x = activations(m, k, 11, dev)
    codes = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(dev)
    tok_scale = (torch.rand(m, generator=g) * 1e-2 + 1e-3).to(dev)
    w_scale = (torch.rand(n, generator=g) * 1e-2 + 1e-3).to(dev)
    t, errors = {}, {}
    lins = [nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16) for _ in range(count)]
    t["bf16"] = graph_time([lambda v, lin=lin: F.linear(v, lin.weight) for lin in lins], x, repeats)
    del lins
    w8 = [torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8).to(dev) for _ in range(count)]
    m8 = max(24, -(-m // 8) * 8)
    codes8 = torch.randint(-127, 128, (m8, k), generator=g, dtype=torch.int8).to(dev)
    _try(t, errors, "int_mm", lambda: graph_time([lambda v, w=w: torch._int_mm(v, w.t()) for w in w8], codes8, repeats))
    del w8
    packed = [torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(dev) for _ in range(count)]
    op, why = _torchao_op(torchao_so) if "torchao" in libs else (None, "not asked for (--libs)")
    if op is None:
        errors["torchao_s8s4"] = why
    else:
        sc = tok_scale.to(torch.bfloat16)
        ws = w_scale.to(torch.bfloat16)
        _try(t, errors, "torchao_s8s4", lambda: graph_time(
            [lambda v, w=w.view(torch.int8): op(v, sc, w, ws, None, torch.bfloat16) for w in packed], codes, repeats))
    cls, why = _gemlite() if "gemlite" in libs else (None, "not asked for (--libs)")
    if cls is None:
        errors["gemlite_a8w4"] = why
    else:
        def gemlite_layers():
            out = []
            for i in range(count):
                wq = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8).to(dev)
                scales = (torch.rand(n, 1, generator=g) * 1e-2 + 1e-3).to(dev, torch.bfloat16)
                zeros = torch.full((n, 1), 8.0, device=dev, dtype=torch.bfloat16)
                out.append(cls(device=str(dev), dtype=torch.bfloat16, fp8=torch.int8).from_weights(wq, scales, zeros))
            return out

        def gemlite_time():
            layers = gemlite_layers()
            with torch.no_grad():
                for lay in layers[:1]:  # autotune outside the capture
                    lay(x)
                    torch.cuda.synchronize()
            return graph_time([lambda v, lay=lay: lay(v) for lay in layers], x, repeats)

        _try(t, errors, "gemlite_a8w4", gemlite_time)

        def gemlite_quant():
            from gemlite.quant_utils import scale_activations_per_token
            return graph_time([lambda v: scale_activations_per_token(v, w_dtype=torch.int8)] * count, x, repeats)

        _try(t, errors, "gemlite_quant", gemlite_quant)
    cfg = K.resolve_config(m, n, k, K.MODE_DYNAMIC, dev, None, None)
    t["ours_gemm"] = graph_time([lambda v, w=w: K.w4_gemm(v, tok_scale, qweight=w, w_scale=w_scale, r_out=None,
                                                          bias=None, out_dtype=torch.bfloat16, cfg=cfg)
                                 for w in packed], codes, repeats)
    r_out = torch.linalg.qr(torch.randn(n // 64, 64, 64, generator=g))[0].to(dev, torch.float16).contiguous()
    cfg_r = K.resolve_config(m, n, k, K.MODE_DYNAMIC, dev, None, 64)
    t["ours_gemm_restore"] = graph_time([lambda v, w=w: K.w4_gemm(v, tok_scale, qweight=w, w_scale=w_scale,
                                                                  r_out=r_out, bias=None, out_dtype=torch.bfloat16,
                                                                  cfg=cfg_r) for w in packed], codes, repeats)
    del packed
    layers = []
    for i in range(count):
        _, lp, _ = random_layer(n, k, 1000 * i + n + k, dev)
        meta = nn.Linear(k, n, bias=False, device="meta", dtype=torch.bfloat16)
        layers.append(DuQuantLinear.from_linear(meta, lp, abits=8, act_mode="dynamic", device=dev,
                                                rot_dtype=torch.float16))
    t["ours_layer"] = graph_time(layers, x, repeats)
    if name == "down" and K.token_minor_pays(m):
        t["ours_layer_token_minor"] = graph_time(layers, x.t().contiguous().t(), repeats)
    del layers
    torch.cuda.empty_cache()
    row = {"tower": tower, "name": name, "N": n, "K": k, "M": m, "instances": count,
           "times_s": t, "ratio_to_bf16": {key: v / t["bf16"] for key, v in t.items()}, "errors": errors}
    print(f"{tower:6s} {name:8s} M={m:4d} " + " | ".join(f"{key} {v * 1e6:6.1f}" for key, v in t.items()), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "benchmarks/results/library_gemm.json", 7)
    ap.add_argument("--torchao-so", type=Path, default=None,
                    help="load this torchao extension file (e.g. LIBS/torchao/_C.abi3.so) even where torchao skips it")
    ap.add_argument("--libs", default=",".join(LIBS), help="comma-separated libraries to time (torchao, gemlite; "
                    "empty: none, only bf16, cuBLAS int8 and ours)")
    args = ap.parse_args(argv)
    try:
        libs = parse_libs(args.libs)
    except ValueError as err:
        ap.error(f"--libs: {err}")
    shapes = selected_shapes(ap, args.only or DEFAULT_ONLY)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    dev = torch.device("cuda")
    import triton
    res = {"benchmark": "library_gemm", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "torchao": _version("torchao"), "gemlite": _version("gemlite"),
           "shapes": []}
    for tower, name, n, k, m in shapes:
        res["shapes"].append(bench(tower, name, n, k, m, args.repeats, args.l2_bytes, dev, args.torchao_so, libs))
        write_results(args.out, res, indent=1)
    return 0


def _version(mod: str) -> str | None:
    try:
        return getattr(__import__(mod), "__version__", "unknown")
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
