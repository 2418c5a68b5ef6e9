"""Launch-configuration sweep of the fused W4 GPU kernels (kernels/w4a8.py) on the pi0.5 shapes.

    PYTHONPATH=. python3 benchmarks/sweep_w4a8.py [--out FILE] [--only llm:gate:800,...] [--repeats N]
                                                  [--mode dynamic|static|both] [--ab KEY=VALUE,...[;...]]

For every pi0.5 linear shape (N out, K in) and token count M of one `sample_actions` call
(language model at M = 800 and M = 1, action expert at M = 50), timed as CUDA-graph replays over
enough layer instances that the weights exceed the L2 cache:
- bf16 `nn.Linear` (the baseline, same run);
- the prep launch alone for each prep variant (blocks per program G, rows per program BMP);
- the GEMM launch alone for each tile configuration, per activation operand kind;
- the best prep + best GEMM together (`w4_linear`), with its relative error against the float32
  reference computed with torch on the same data.
Writes JSON (all timings, the best configuration per shape and mode); `pick_config` in
kernels/w4a8.py encodes the winners.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from w4a8_cases import add_common_args, instances, parse_overrides, selected_shapes  # noqa: E402
from runtime_gpu import graph_time  # noqa: E402
from duquant_runtime.activation import fake_quantize_per_channel, fake_quantize_per_token  # noqa: E402
from duquant_runtime.kernels import w4a8 as K  # noqa: E402
from duquant_runtime.transforms import input_transform, output_restore  # noqa: E402

def configs(m: int, n: int, k: int, mode: str) -> list[dict]:
    """Whole launch configurations to time for M tokens: `pick_config`'s choice first, then
    alternatives (prep blocks and rows per program, tiles, split-K)."""
    keys = ("BN", "BMT", "BK", "num_warps", "num_stages", "SWAP", "SPLIT")
    out = [K.pick_config(m, n, k, K.MODE_DYNAMIC if mode == "dynamic" else K.MODE_STATIC)]

    def add(prep, rows):
        for r in rows:
            out.append({**dict(zip(keys, r)), "GROUP": 8, "EPI_EARLY": out[0].get("EPI_EARLY", False), **prep})

    picked_prep = {key: v for key, v in out[0].items()
                   if key in ("G", "BMP", "TILES", "XLOAD", "prep_warps", "prep_stages", "BMQ", "QCH", "PDL",
                            "PREP_PDL", "QRUNS", "QFASTDIV")}
    if m > 64:  # the picked activation launches, GEMM tile variants
        if mode == "dynamic":
            add(picked_prep, [(64, 128, 128, 4, 4, True, 1), (128, 128, 128, 8, 4, True, 1),
                              (128, 256, 128, 8, 3, True, 1), (128, 256, 64, 8, 4, True, 1),
                              (256, 128, 128, 8, 3, True, 1), (128, 128, 256, 8, 3, True, 1),
                              # fewer stages / smaller tiles: more programs per SM (offline ptxas: 127 registers
                              # and 56 KB at BN64/BMT128/BK128/3 stages -> 4 per SM instead of 2; compile_w4a8.py)
                              (64, 128, 128, 4, 3, True, 1), (64, 128, 64, 4, 4, True, 1),
                              (64, 64, 128, 4, 4, True, 1), (64, 128, 64, 4, 5, True, 1),
                              (64, 128, 256, 4, 2, True, 1)])
        else:
            add(picked_prep, [(128, 256, 64, 8, 3, True, 1), (128, 128, 64, 8, 3, True, 1),
                              (128, 64, 64, 4, 4, True, 1), (128, 256, 64, 8, 4, True, 1),
                              (256, 128, 64, 8, 3, True, 1), (128, 128, 128, 8, 3, True, 1),
                              (64, 128, 64, 4, 3, True, 1), (64, 128, 64, 4, 4, True, 1),
                              (64, 128, 128, 4, 3, True, 1), (128, 128, 64, 4, 3, True, 1)])
        return out
    bmt = 64 if m > 16 else 16
    for bmp in (16,):
        prep = {**picked_prep, "BMP": bmp}
        rows = [(64, bmt, 128, 4, 3, True, 1), (64, bmt, 128, 4, 3, True, 2), (64, bmt, 128, 4, 3, True, 4),
                (64, bmt, 256, 4, 3, True, 2), (64, bmt, 128, 4, 4, True, 2), (128, bmt, 128, 8, 3, True, 2),
                (128, bmt, 128, 4, 3, True, 8), (32, bmt, 128, 4, 3, False, 1), (32, bmt, 128, 4, 3, False, 2),
                # deeper weight pipelines without split-K (more bytes in flight per program)
                (64, bmt, 128, 4, 5, True, 1), (64, bmt, 256, 4, 3, True, 1), (64, bmt, 256, 4, 4, True, 1),
                (64, bmt, 512, 4, 2, True, 1), (64, bmt, 128, 8, 5, True, 1),
                # token tiles below M: more programs without a split-K reduction (the weight tile is
                # read by each token tile, from L2 after the first)
                (64, 16, 256, 4, 3, True, 1), (64, 32, 256, 4, 3, True, 1), (64, 16, 128, 4, 4, True, 1),
                (64, 32, 128, 4, 3, True, 1), (64, 16, 128, 4, 3, True, 2), (64, 32, 128, 4, 3, True, 2)]
        if mode == "dynamic":
            rows.append((64, bmt, 256, 4, 3, False, 4))
        add(prep, rows)
        for pdl in (False, True):  # the picked GEMM, PDL toggled
            out.append({**out[0], "BMP": bmp, "PDL": pdl})
    return out


def make_layers(n: int, k: int, count: int, dev, seed: int = 0) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    layers = []
    for _ in range(count):
        r_in = torch.linalg.qr(torch.randn(k // 64, 64, 64, generator=g, dtype=torch.float64))[0]
        r_out = torch.linalg.qr(torch.randn(n // 64, 64, 64, generator=g, dtype=torch.float64))[0]
        layers.append(dict(qweight=torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(dev),
                           w_scale=(torch.rand(n, generator=g) * 0.01 + 0.001).to(dev),
                           r_in=r_in.to(dev, torch.float16).contiguous(), r_out=r_out.to(dev, torch.float16).contiguous(),
                           perm=torch.randperm(k, generator=g).to(dev),
                           act_scale=(torch.rand(k, generator=g) * 0.05 + 0.01).to(dev)))
    return layers


def make_input(m: int, k: int, dev) -> torch.Tensor:
    """bf16 activations (M, K) with outlier channels (~0.5% of them 31x larger), seeded."""
    g = torch.Generator(device="cpu").manual_seed(1)
    return (torch.randn(m, k, generator=g) * (1 + 30 * (torch.rand(k, generator=g) > 0.995))).to(dev, torch.bfloat16)


def reference(x: torch.Tensor, lay: dict, mode: int) -> torch.Tensor:
    """float32 torch reference of the same function (what DuQuantLinear's reference path computes)."""
    from duquant_runtime.quant import unpack_int4
    xt = input_transform(x.float(), lay["perm"], lay["r_in"].float())
    xq = fake_quantize_per_token(xt, 8) if mode == K.MODE_DYNAMIC else fake_quantize_per_channel(xt, lay["act_scale"], 8)
    q = unpack_int4(lay["qweight"], x.shape[1]).float()
    return output_restore((xq @ q.t()) * lay["w_scale"], lay["r_out"].float())


def safe_time(fns, x, repeats):
    try:
        return graph_time(fns, x, repeats, min_ms=1.0)
    except Exception as err:  # a configuration that does not compile or launch is skipped
        print(f"    skipped: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)
        return None


def bench(tower, name, n, k, m, args, dev) -> dict:
    count = instances(n, k, args.l2_bytes)
    layers = make_layers(n, k, count, dev)
    x = make_input(m, k, dev)
    if args.token_minor:  # as a gate/up GEMM with token_minor_out leaves it (mlp_layout.py)
        x = x.t().contiguous().t()
    lins = [nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16) for _ in range(count)]
    res = {"tower": tower, "name": name, "N": n, "K": k, "M": m, "instances": count}
    res["bf16_s"] = t_bf16 = graph_time(lins, x, args.repeats)
    del lins
    print(f"{tower:6s} {name:8s} N={n:5d} K={k:5d} M={m:3d}: bf16 {t_bf16 * 1e6:7.1f} us", flush=True)
    for mode_name, mode in (("dynamic", K.MODE_DYNAMIC), ("static", K.MODE_STATIC)):
        if args.mode not in ("both", mode_name):
            continue
        with torch.no_grad():
            ref = reference(x, layers[0], mode)
        rows = []
        cands = configs(m, n, k, mode_name)
        if args.ab:  # A/B: the picked configuration (`resolve_config`) against the same with the given keys changed
            cands = [ab_config(m, n, k, mode, dev, alt) for alt in [{}] + args.ab]
        for cfg in cands:
            fns = [lambda a, lay=lay, cfg=cfg: K.w4_linear(a, qweight=lay["qweight"], w_scale=lay["w_scale"],
                                                           r_in=lay["r_in"], perm=lay["perm"], r_out=lay["r_out"],
                                                           bias=None, smooth=None, mode=mode,
                                                           act_scale=lay["act_scale"], config=cfg)
                   for lay in layers]
            t = safe_time(fns, x, args.repeats)
            if t is None:
                continue
            with torch.no_grad():
                err = float((fns[0](x).float() - ref).norm() / ref.norm())
            rows.append({"config": cfg, "s": t, "ratio_vs_bf16": t / t_bf16, "rel_err": err})
            flag = "  <-- ERROR" if not err < 2e-2 else ""
            print(f"    {mode_name:7s} {t * 1e6:7.1f} us ({t / t_bf16:.2f}x) err {err:.1e} "
                  f"G{cfg['G']}/BMP{cfg['BMP']} "
                  f"BN{cfg['BN']} BMT{cfg['BMT']} BK{cfg['BK']} w{cfg['num_warps']} s{cfg['num_stages']} "
                  f"{'swap' if cfg['SWAP'] else 'noswap'} split{cfg['SPLIT']} pdl{int(bool(cfg.get('PDL')))} restore{cfg.get('RESTORE', 0)}{flag}", flush=True)
        ok = [r for r in rows if r["rel_err"] < 2e-2]
        best = min(ok, key=lambda r: r["s"]) if ok else None
        res[mode_name] = {"configs": rows, "best": best, "picked": rows[0] if rows else None}
        if best:
            print(f"    {mode_name:7s} BEST {best['s'] * 1e6:7.1f} us ({best['ratio_vs_bf16']:.2f}x bf16)", flush=True)
    return res


def ab_config(m: int, n: int, k: int, mode: int, dev, alt: dict) -> dict:
    """The whole configuration an --ab alternative runs at M = m (what `w4_linear(config=...)` gets):
    `resolve_config` with alt's keys over the picks; with PICK_M (a token count) over the picks for
    that many tokens, which it keeps, so that the launch does not merge M's picks back in."""
    cfg = K.resolve_config(m, n, k, mode, dev, alt)
    return {**cfg, "PICK_M": alt["PICK_M"]} if "PICK_M" in alt else cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "benchmarks/results/sweep_w4a8.json", 5)
    ap.add_argument("--mode", default="both", choices=("both", "dynamic", "static"), help="activation modes to sweep")
    ap.add_argument("--ab", default="", help="only the picked configuration and it with KEY=VALUE[,...] "
                    "changed (Python literals), e.g. num_stages=4,BMT=64; several alternatives separated "
                    "by ';', e.g. 'RESTORE=0;PART_RESTORE=True'; PICK_M=64: the picks made for 64 tokens")
    ap.add_argument("--token-minor", action="store_true", help="give the layers x token-minor (strides (1, M)), "
                    "as a gate/up with token_minor_out leaves down_proj's input")
    args = ap.parse_args(argv)
    try:
        args.ab = [parse_overrides(alt) for alt in filter(None, args.ab.split(";"))]
    except ValueError as err:
        ap.error(f"--ab: {err}")
    shapes = selected_shapes(ap, args.only)
    dev = torch.device("cuda")
    import triton
    result = {"benchmark": "sweep_w4a8", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "shapes": []}
    for tower, name, n, k, m in shapes:
        result["shapes"].append(bench(tower, name, n, k, m, args, dev))
        torch.cuda.empty_cache()
        write_results(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
