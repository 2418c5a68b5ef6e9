"""Nsight Compute view of the W4 kernels on pi0.5 shapes (development aid; run under ncu).

    ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis python3 benchmarks/ncu_w4a8.py [CASE ...]

Each case runs three times (the first compiles); ncu profiles every launch, the last ones are the
steady state. CASE names select cases (default: all).
"""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sweep_w4a8 import make_layers  # noqa: E402
from duquant_runtime.kernels import w4a8 as K  # noqa: E402

CASES = {  # name: (N, K, M, mode, config overrides, prep only)
    "expert-q-static": (2048, 1024, 50, K.MODE_STATIC, {}, False),
    "expert-gate-static": (4096, 1024, 50, K.MODE_STATIC, {}, False),
    "llm-gate-m1-dynamic": (16384, 2048, 1, K.MODE_DYNAMIC, {}, False),
    "llm-gate-m800-dynamic": (16384, 2048, 800, K.MODE_DYNAMIC, {}, False),
    "llm-q-m800-static-prep": (2048, 2048, 800, K.MODE_STATIC, dict(XLOAD="index_select", BMP=128, prep_warps=8), True),
    "llm-down-m800-static-prep": (2048, 16384, 800, K.MODE_STATIC, dict(BMP=64, TILES=13, prep_stages=3), True),
    "llm-down-m800-dynamic-prep": (2048, 16384, 800, K.MODE_DYNAMIC, {}, True),  # sm_90: w4a8_act's two passes
    "expert-down-m50-dynamic": (1024, 4096, 50, K.MODE_DYNAMIC, {}, False),  # against cuBLAS bf16, same loop
    "expert-o-m50-dynamic": (1024, 2048, 50, K.MODE_DYNAMIC, {}, False),
}
for label in sys.argv[1:] or list(CASES):
    n, k, m, mode, over, prep_only = CASES[label]
    cfg = K.resolve_config(m, n, k, mode, torch.device("cuda"), over)
    lay = make_layers(n, k, 1, "cuda")[0]
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        with torch.no_grad():
            lin(x)
            if prep_only:
                K.prepare_activation(x, r_in=lay["r_in"], perm=lay["perm"], smooth=None, mode=mode,
                                     act_scale=lay["act_scale"], cfg=cfg)
            else:
                K.w4_linear(x, qweight=lay["qweight"], w_scale=lay["w_scale"], r_in=lay["r_in"], perm=lay["perm"],
                            r_out=lay["r_out"], bias=None, smooth=None, mode=mode, act_scale=lay["act_scale"],
                            config=over)
    torch.cuda.synchronize()
    print("CASE", label, flush=True)
