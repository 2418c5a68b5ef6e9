import sys, torch
sys.path.insert(0, 'benchmarks'); sys.path.insert(0, '.')
from runtime_gpu import graph_time
from duquant_runtime.kernels import w4a8 as K
g = torch.Generator().manual_seed(0)
for m, n, k in ((800, 2048, 16384), (800, 32768, 2048), (800, 2048, 2048), (800, 2560, 2048), (50, 1024, 4096), (50, 8192, 1024), (50, 1024, 2048)):
    x = torch.randn(m, k, generator=g).bfloat16().cuda()
    r_in = torch.linalg.qr(torch.randn(k // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()
    r_out = torch.linalg.qr(torch.randn(n // 64, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()
    qws = [torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda() for _ in range(max(1, min(16, (200 << 20) // (n * k // 2))))]
    ws = (torch.rand(n, generator=g) * 0.01 + 0.001).cuda()
    cfg = K.pick_config(m, n, k, K.MODE_DYNAMIC)
    codes, ts = K.prepare_activation(x, r_in=r_in, perm=None, smooth=None, mode=K.MODE_DYNAMIC, cfg=cfg)
    res = []
    for ro in (r_out, None):
        fns = [lambda a, q=q, ro=ro: K.w4_gemm(a, ts, qweight=q, w_scale=ws, r_out=ro, bias=None, out_dtype=torch.bfloat16, cfg=cfg) for q in qws]
        res.append(graph_time(fns, codes, 7))
    print(f"M={m} N={n} K={k}: GEMM with R_out {res[0]*1e6:.1f} us, without {res[1]*1e6:.1f} us", flush=True)
