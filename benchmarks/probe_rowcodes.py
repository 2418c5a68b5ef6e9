"""Probe (GPU): the dynamic activation codes of a small token count in ONE launch whose programs own
whole token rows (rotation of every block, the row maximum, then the codes), against the prep +
quantize launches `prepare_activation` runs, each followed by the layer's GEMM.

    PYTHONPATH=. python3 benchmarks/probe_rowcodes.py [--only expert:gate_up:50,...] [--repeats N]

No cross-program dependency: a program rotates its BMP rows block by block (the prep's
`_rotation_block` and tf32 dot, so the same float32 values), keeps the rows' absmax, writes the
rotated values to a scratch buffer, then (after a CTA barrier) reads them back and writes the codes
in the GEMM's column order. Checks that codes and scales equal the two-launch path's bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from runtime_gpu import activations, graph_time  # noqa: E402
from w4a8_cases import add_common_args, instances, selected_shapes  # noqa: E402
from duquant_runtime.kernels import w4a8 as K  # noqa: E402
from duquant_runtime.kernels.w4a8 import (_codes, _rotation_block, _scale_of_max,  # noqa: E402
                                          _store_code_runs)


@triton.jit
def _row_codes_kernel(x_ptr, stride_xm, M, perm_ptr, r_ptr, v_ptr, out_ptr, tok_scale_ptr, K: tl.constexpr,
                      NB: tl.constexpr, B: tl.constexpr, BMP: tl.constexpr, BKQ: tl.constexpr, BKD: tl.constexpr,
                      QMIN: tl.constexpr, QMAX: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
                      PDL: tl.constexpr, PDL_WAIT: tl.constexpr):
    if PDL_WAIT:
        gdc_wait()
    if PDL:
        gdc_launch_dependents()
    offs_m = tl.program_id(0) * BMP + tl.arange(0, BMP)
    row_ok = offs_m < M
    mx = tl.zeros((BMP,), tl.float32)
    for kb in tl.range(0, NB, num_stages=STAGES):
        offs_c, src, r, smooth = _rotation_block(kb, perm_ptr, r_ptr, perm_ptr, B, True, False)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :], mask=row_ok[:, None], other=0.0)
        xt = tl.dot(x.to(tl.float32), r, input_precision=PREC)
        tl.store(v_ptr + offs_m[:, None] * K + offs_c[None, :], xt, mask=row_ok[:, None])
        mx = tl.maximum(mx, tl.max(tl.abs(xt), axis=1))
    tl.debug_barrier()  # this program's stores above are visible to all its threads
    s = _scale_of_max(mx, QMAX)
    tl.store(tok_scale_ptr + offs_m, s, mask=row_ok)
    for c in tl.range(0, K // BKQ):
        offs_k = c * BKQ + tl.arange(0, BKQ)
        v = tl.load(v_ptr + offs_m[:, None] * K + offs_k[None, :], mask=row_ok[:, None], other=0.0)
        q = _codes(v, s, QMIN, QMAX, False, True)
        _store_code_runs(out_ptr, offs_m, row_ok, q, c * BKQ, K, BKD)


def row_codes(x, perm, r_in, cfg, bmp=16, warps=4, stages=2, bkq=256, pdl=True):
    m, k = x.shape
    b = r_in.shape[-1]
    bkd = K.gemm_tiling(k, cfg)[0]
    bkq = min(bkq, bkd)
    v = torch.empty((m, k), device=x.device, dtype=torch.float32)
    codes = torch.empty((m, k), device=x.device, dtype=torch.int8)
    tok = torch.empty((m,), device=x.device, dtype=torch.float32)
    _row_codes_kernel[(triton.cdiv(m, bmp),)](x, x.stride(0), m, perm, r_in, v, codes, tok, K=k, NB=k // b, B=b,
                                              BMP=bmp, BKQ=bkq, BKD=bkd, QMIN=-128, QMAX=127, PREC="tf32",
                                              STAGES=stages, PDL=pdl, PDL_WAIT=pdl, num_warps=warps,
                                              **K._pdl(pdl))
    return codes, tok


VARIANTS = [dict(bmp=16, warps=4, stages=2), dict(bmp=16, warps=4, stages=3), dict(bmp=16, warps=2, stages=2),
            dict(bmp=16, warps=8, stages=2), dict(bmp=16, warps=4, stages=1), dict(bmp=32, warps=4, stages=2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "benchmarks/results/probe_rowcodes.json", 7)
    args = ap.parse_args(argv)
    shapes = selected_shapes(ap, args.only or "expert:gate_up:50,expert:qkv:50,expert:o:50,expert:down:50")
    dev = torch.device("cuda")
    res = {"benchmark": "probe_rowcodes", "device": torch.cuda.get_device_name(), "shapes": []}
    for tower, name, n, k, m in shapes:
        g = torch.Generator(device="cpu").manual_seed(k + m)
        x = activations(m, k, 5, dev)
        perm = torch.randperm(k, generator=g).to(dev)
        r_in = torch.linalg.qr(torch.randn(k // 64, 64, 64, generator=g, dtype=torch.float64))[0] \
            .to(dev, torch.float16).contiguous()
        cfg = K.resolve_config(m, n, k, K.MODE_DYNAMIC, dev, None, 64)
        count = instances(n, k, args.l2_bytes)
        qw = [torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(dev) for _ in range(count)]
        ws = (torch.rand(n, generator=g) * 1e-2 + 1e-3).to(dev)
        r_out = torch.linalg.qr(torch.randn(n // 64, 64, 64, generator=g))[0].to(dev, torch.float16).contiguous()

        def two(v):  # the runtime's activation launches: (codes, token scales)
            return K.prepare_activation(v, r_in=r_in, perm=perm, smooth=None, mode=K.MODE_DYNAMIC, cfg=cfg)

        def gemm(act, w):  # the layer's GEMM on (codes, token scales)
            return K.w4_gemm(*act, qweight=w, w_scale=ws, r_out=r_out, bias=None, out_dtype=torch.bfloat16, cfg=cfg)

        ref_codes, ref_tok = two(x)
        row = {"tower": tower, "name": name, "N": n, "K": k, "M": m, "act": cfg.get("ACT"), "times_s": {}}
        row["times_s"]["two_launches_act"] = graph_time([two] * count, x, args.repeats)
        row["times_s"]["two_launches_layer"] = graph_time([lambda v, w=w: gemm(two(v), w) for w in qw], x,
                                                          args.repeats)
        for var in VARIANTS:
            key = "row_b{bmp}_w{warps}_s{stages}".format(**var)
            try:
                def one(v, var=var):  # the probed launch: (codes, token scales)
                    return row_codes(v, perm, r_in, cfg, **var)

                c, t = one(x)
                torch.cuda.synchronize()
                row.setdefault("equal", {})[key] = bool(torch.equal(c, ref_codes) and torch.equal(t, ref_tok))
                row["times_s"][key + "_act"] = graph_time([one] * count, x, args.repeats)
                row["times_s"][key + "_layer"] = graph_time([lambda v, w=w, one=one: gemm(one(v), w) for w in qw], x,
                                                            args.repeats)
            except Exception as err:
                row.setdefault("errors", {})[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        print(f"{tower} {name} M={m} K={k} ACT={cfg.get('ACT')} " + " | ".join(
            f"{key} {v * 1e6:.1f}" for key, v in row["times_s"].items()), row.get("equal"), row.get("errors", ""),
            flush=True)
        res["shapes"].append(row)
        write_results(args.out, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
