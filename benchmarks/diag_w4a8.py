"""Per-kernel timings and compiler facts of kernels/w4a8.py on a few pi0.5 shapes (development aid).

    PYTHONPATH=. python3 benchmarks/diag_w4a8.py
"""
import re
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_gpu import graph_time  # noqa: E402

from duquant_runtime.kernels import w4a8 as K  # noqa: E402


def facts(k):
    ptx = k.asm.get("ptx", "")
    return (f"regs {k.n_regs} spills {k.n_spills} wgmma {len(re.findall('wgmma.mma_async', ptx))} "
            f"mma.sync {len(re.findall('mma.sync', ptx))} ld.v4 {len(re.findall(r'ld.global(.nc)?.v4', ptx))} "
            f"ld.u8/16 {len(re.findall(r'ld.global(.nc)?.(u8|b8|u16|b16) ', ptx))} "
            f"cp.async {len(re.findall('cp.async', ptx))}")


def run(m, n, k, label):
    dev = "cuda"
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    perm = torch.randperm(k, device=dev)
    r = torch.linalg.qr(torch.randn(k // 64, 64, 64, device=dev))[0].contiguous().half()
    ro = torch.linalg.qr(torch.randn(n // 64, 64, 64, device=dev))[0].contiguous().half()
    qw = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
    ws = torch.rand(n, device=dev) * 0.01
    act = torch.rand(k, device=dev) * 0.05 + 0.01
    nb = k // 64
    bmp = 16 if m <= 16 else (32 if m <= 64 else 64)
    part = torch.empty(m, nb, device=dev)
    tok = torch.empty(m, device=dev)
    a8 = torch.empty(m, k, device=dev, dtype=torch.int8)
    a16 = torch.empty(m, k, device=dev, dtype=torch.bfloat16)
    grid = (triton.cdiv(m, bmp), nb)
    print(f"== {label}: M={m} N={n} K={k}")
    for hp in (True, False):
        for prec in ("tf32", "ieee"):
            f = lambda _x, hp=hp, prec=prec: K._quantize_kernel[grid](
                _x, _x.stride(0), m, k, perm, perm, r, part, nb, act, a16, tok, QMIN=-128, QMAX=127, MODE=1,
                NB_P2=triton.next_power_of_2(nb), BMP=bmp, B=64, HAS_PERM=hp, HAS_SMOOTH=False, PREC=prec, num_warps=4)
            ck = f(x)
            print(f"  quantize static perm={hp} {prec}: {graph_time([f], x, 5) * 1e6:7.1f} us  {facts(ck)}")
    f = lambda _x: K._absmax_kernel[grid](_x, _x.stride(0), m, perm, perm, r, part, nb, BMP=bmp, B=64,
                                          HAS_PERM=True, HAS_SMOOTH=False, PREC="tf32", num_warps=4)
    ck = f(x)
    print(f"  absmax: {graph_time([f], x, 5) * 1e6:7.1f} us  {facts(ck)}")
    for int8 in (True, False):
        cfg = K.pick_config(m, n, k, 64, int8)
        for c in [cfg, {**cfg, "num_stages": 2}, {**cfg, "BN": 64}]:
            c = dict(c)
            split = c.pop("SPLIT_K")
            a = a8 if int8 else a16
            out = torch.empty(m, n, device=dev, dtype=torch.float32 if split > 1 else torch.bfloat16)
            g = (triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"]), split)
            f = lambda _x, c=c, split=split, a=a, out=out, g=g: K._gemm_kernel[g](
                a, tok, qw, ws, ro, ws, out, m, n, k, out.stride(0), K_SPLIT=k // split, BM=c["BM"], BN=c["BN"],
                BK=c["BK"], SPLIT_K=split, GROUP_M=8, INT8=int8, BO=64, HAS_ROUT=True, HAS_BIAS=False,
                ATOMIC=split > 1, F32_DOT=False, num_warps=c["num_warps"], num_stages=c["num_stages"])
            ck = f(x)
            print(f"  gemm int8={int8} {c} split {split}: {graph_time([f], x, 5) * 1e6:7.1f} us  {facts(ck)}")
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    print(f"  bf16 F.linear: {graph_time([lambda _x: torch.nn.functional.linear(_x, w)], x, 5) * 1e6:7.1f} us")


if __name__ == "__main__":
    run(800, 256, 2048, "llm k_proj")
    run(800, 16384, 2048, "llm gate")
    run(50, 4096, 1024, "expert gate")
    run(1, 16384, 2048, "llm gate M=1")
