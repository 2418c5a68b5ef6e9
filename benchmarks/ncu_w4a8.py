"""Nsight Compute view of the W4 kernels on three pi0.5 shapes (development aid; run under ncu).

    ncu --clock-control none --section SpeedOfLight --section LaunchStats --section WarpStateStats \
        python3 benchmarks/ncu_w4a8.py
"""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sweep_w4a8 import make_layers  # noqa: E402
from duquant_runtime.kernels import w4a8 as K  # noqa: E402

CASES = [("expert q static", 2048, 1024, 50, K.MODE_STATIC, dict(G=1, BMP=64, BN=64, BMT=64, BK=128, SPLIT=1)),
         ("llm gate M=1 dynamic", 16384, 2048, 1, K.MODE_DYNAMIC, dict(G=1, BMP=16, BN=64, BMT=16, BK=256, SPLIT=4)),
         ("llm gate M=800 dynamic", 16384, 2048, 800, K.MODE_DYNAMIC, dict(G=1, BMP=64, BN=64, BMT=128, BK=128, num_warps=4, num_stages=4))]
for label, n, k, m, mode, cfg in CASES:
    lay = make_layers(n, k, 1, "cuda")[0]
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # warm-up compiles; ncu profiles every launch, the last ones are steady state
        with torch.no_grad():
            lin(x)
            K.w4_linear(x, qweight=lay["qweight"], w_scale=lay["w_scale"], r_in=lay["r_in"], perm=lay["perm"],
                        r_out=lay["r_out"], bias=None, smooth=None, mode=mode, act_scale=lay["act_scale"], config=cfg)
    torch.cuda.synchronize()
    print("CASE", label, flush=True)
