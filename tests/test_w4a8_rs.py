"""The register-operand Gluon GEMM + restore launch (kernels/w4a8_rs.py) on an sm_90 GPU: the same
values as the Triton GEMM with its bf16 restore, and the float32 reference within bf16 rounding
(skipped without an sm_90 GPU and Gluon; the restore launch alone runs in the interpreter test
of tests/test_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from duquant_runtime.kernels import device_capability, fast_path_available


def _rs_ready() -> bool:
    if not (torch.cuda.is_available() and fast_path_available("cuda")):
        return False
    from duquant_runtime.kernels import w4a8 as K
    return tuple(device_capability("cuda")) == (9, 0) and K._rs_module(torch.device("cuda")) is not None


pytestmark = pytest.mark.skipif(not _rs_ready(), reason="needs an sm_90 GPU, Triton and Gluon")


@pytest.mark.parametrize("in_epilogue", [False, True])
@pytest.mark.parametrize(("m", "n", "k", "bias", "token_minor"),
                         [(800, 2048, 16384, False, False), (300, 512, 8192, True, False),
                          (130, 256, 8192, True, True), (800, 2048, 2048, True, True), (300, 512, 8192, True, True)])
def test_register_operand_gemm_matches_triton_gemm_and_reference(m, n, k, bias, token_minor, in_epilogue):
    """in_epilogue: the restore in the GEMM's epilogue (RS_RESTORE) instead of its own launch."""
    from duquant_runtime.activation import fake_quantize_per_token
    from duquant_runtime.kernels import w4a8 as K
    from duquant_runtime.quant import pack_int4
    from duquant_runtime.transforms import input_transform, output_restore

    g = torch.Generator().manual_seed(m + n)
    orth = lambda nb: torch.linalg.qr(torch.randn(nb, 64, 64, generator=g, dtype=torch.float64))[0].float().contiguous()  # noqa: E731
    r_in, r_out = orth(k // 64), orth(n // 64)
    perm = torch.randperm(k, generator=g)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01 + 0.001
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(m, k, generator=g)
    x[:, :3] *= 40.0
    x = x.bfloat16().float()  # the kernels' input
    ref = output_restore((fake_quantize_per_token(input_transform(x, perm, r_in), 8) @ q.float().t()) * ws, r_out)
    if bias:
        ref = ref + b.float()
    cfg = {**K.pick_config(m, n, k, K.MODE_DYNAMIC), "RS_RESTORE": in_epilogue}
    if cfg.get("GEMM") != "rs":  # the q/k/v/o and MLP-input shapes, and (130, 256, 8192) (the action expert's
        # down_proj picks up to 256 tokens, `small_m_tokens`), run the Triton GEMM by default
        cfg.update(GEMM="rs", BN=128, BMT=128, BK=256, num_warps=8, RS_STAGES=4)
    assert cfg.get("GEMM") == "rs"
    kw = dict(qweight=pack_int4(q).cuda(), w_scale=ws.cuda(), r_in=r_in.half().cuda(), perm=perm.cuda(),  # noqa: C408
              r_out=r_out.half().cuda(), bias=b.cuda() if bias else None, smooth=None, mode=K.MODE_DYNAMIC,
              token_minor_out=token_minor)
    xc = x.cuda().bfloat16()
    rs = K.w4_linear(xc, config=cfg, **kw)
    # the Triton GEMM with the same roundings: unsplit, its restore dot on bf16 operands (its split-K restores in
    # float32; the rs GEMM's split-K gives its unsplit values bit for bit, test_split_k_gives_the_same_values)
    tri = K.w4_linear(xc, config={**cfg, "GEMM": None, "SPLIT": 1, "RESTORE": 1}, **kw)
    for _ in range(3):  # back to back (the restore launch may start during the GEMM: RS_TRIGGER with PDL)
        assert torch.equal(K.w4_linear(xc, config=cfg, **kw), rs)
    assert rs.shape == (m, n) and rs.dtype == torch.bfloat16
    assert rs.stride() == ((1, K.token_minor_row(m)) if token_minor else (n, 1))
    err_tri = float((rs.float() - tri.float()).norm() / tri.float().norm())
    err_ref = float((rs.float().cpu() - ref).norm() / ref.norm())
    print(f"M={m} N={n} K={k}: vs Triton GEMM {err_tri:.2e}, vs float32 reference {err_ref:.2e}")
    assert err_tri < 2e-3, (err_tri, err_ref)  # the same roundings; only the order of float32 sums differs
    assert err_ref < 2e-2, (err_tri, err_ref)  # tf32 rotation and bf16 restore move quantization ties
    if in_epilogue:  # the restore launch's numbers: y' rounded to bf16, bf16 R_out, float32 sums
        sep = K.w4_linear(xc, config={**cfg, "RS_RESTORE": False}, **kw)
        err_sep = float((rs.float() - sep.float()).norm() / sep.float().norm())
        assert err_sep < 5e-4, err_sep  # only the order of the float32 sums differs
    # (the same bound as tests/test_linear_gpu.py; at K = 16384 with outliers the Triton GEMM is at 1.4e-2)


@pytest.mark.parametrize(("tail", "token_minor"), [(32, True), (64, False), (0, True)])
def test_wide_token_tiles_with_a_tail_launch(tail, token_minor):
    """256-token tiles (two N = 128 wgmma per weight operand) over the first 768 of 800 tokens, the
    last 32 in a second launch of `tail`-token tiles (TAIL_BMT; 0: none, a quarter-full last tile),
    restore in the epilogue: the same values as 128-token tiles up to the order of float32 sums, and
    within the Triton GEMM's roundings."""
    from duquant_runtime.kernels import w4a8 as K
    from duquant_runtime.quant import pack_int4

    g = torch.Generator().manual_seed(tail + 7)
    m, n, k = 800, 1024, 2048
    orth = lambda nb: torch.linalg.qr(torch.randn(nb, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()  # noqa: E731
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    kw = dict(qweight=pack_int4(q).cuda(), w_scale=(torch.rand(n, generator=g) * 0.01 + 0.001).cuda(),  # noqa: C408
              r_in=orth(k // 64), perm=torch.randperm(k, generator=g).cuda(), r_out=orth(n // 64),
              bias=torch.randn(n, generator=g).bfloat16().cuda(), smooth=None, mode=K.MODE_DYNAMIC,
              token_minor_out=token_minor)
    x = (torch.randn(m, k, generator=g) * torch.linspace(0.1, 3.0, k)).bfloat16().cuda()
    base = {**K.pick_config(m, n, k, K.MODE_DYNAMIC), "GEMM": "rs", "RS_RESTORE": True, "BN": 128, "BK": 256,
            "num_warps": 8}
    wide = K.w4_linear(x, config={**base, "BMT": 256, "RS_STAGES": 2, "TAIL_BMT": tail}, **kw)
    narrow = K.w4_linear(x, config={**base, "BMT": 128, "RS_STAGES": 4, "TAIL_BMT": 0}, **kw)
    tri = K.w4_linear(x, config={**base, "GEMM": None}, **kw)
    assert wide.stride() == ((1, K.token_minor_row(m)) if token_minor else (n, 1)) and torch.isfinite(wide).all()
    assert K.tail_tokens(m, {"BMT": 256, "TAIL_BMT": tail}) == (32 if tail else 0)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    assert rel(wide, narrow) < 5e-4, rel(wide, narrow)  # only the order of float32 sums differs
    assert rel(wide, tri) < 2e-3, rel(wide, tri)
    assert torch.equal(K.w4_linear(x, config={**base, "BMT": 256, "RS_STAGES": 2, "TAIL_BMT": tail}, **kw), wide)


@pytest.mark.parametrize(("m", "n", "k", "token_minor"), [(1, 2048, 16384, False), (50, 1024, 4096, True),
                                                          (130, 512, 2048, False)])
def test_split_k_gives_the_same_values(m, n, k, token_minor):
    """Split-K in the register-operand GEMM (SPLIT 2-8: each program sums K / SPLIT, the tile's last
    program adds the int32 partial sums and runs the epilogue): bit-identical to one program per
    tile whatever the split (integer sums are exact in any order), the same on every call (the
    tile counters reset), within the Triton GEMM's roundings, and the picked M = 1 down_proj runs it."""
    from duquant_runtime.kernels import w4a8 as K
    from duquant_runtime.quant import pack_int4

    g = torch.Generator().manual_seed(m + k)
    orth = lambda nb: torch.linalg.qr(torch.randn(nb, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()  # noqa: E731
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    kw = dict(qweight=pack_int4(q).cuda(), w_scale=(torch.rand(n, generator=g) * 0.01 + 0.001).cuda(),  # noqa: C408
              r_in=orth(k // 64), perm=torch.randperm(k, generator=g).cuda(), r_out=orth(n // 64),
              bias=torch.randn(n, generator=g).bfloat16().cuda(), smooth=None, mode=K.MODE_DYNAMIC)
    x = torch.randn(m, k, generator=g)
    x[:, :5] *= 30.0
    x = x.bfloat16().cuda()
    if token_minor:
        x = x.t().contiguous().t()
    base = {**K.pick_config(m, n, k, K.MODE_DYNAMIC), "GEMM": "rs", "RS_RESTORE": True, "BN": 64, "BMT": 32,
            "BK": 256, "num_warps": 4, "RS_STAGES": 3, "TAIL_BMT": 0}
    one = K.w4_linear(x, config={**base, "SPLIT": 1}, **kw)
    for split in (2, 4, 8):
        if k % (2 * 256 * split):
            continue
        out = K.w4_linear(x, config={**base, "SPLIT": split}, **kw)
        assert torch.equal(out, one), split
        assert torch.equal(K.w4_linear(x, config={**base, "SPLIT": split}, **kw), one), split
    tri = K.w4_linear(x, config={**base, "GEMM": None, "SPLIT": 1, "RESTORE": 1}, **kw)  # its bf16 restore too
    rel = float((one.float() - tri.float()).norm() / tri.float().norm())
    assert rel < 2e-3, rel  # the same roundings; only the order of float32 sums differs
    if m == 1:  # the pick: rs with 4-way split-K (5 stages) where it runs, the same values
        cfg = K.resolve_config(m, n, k, K.MODE_DYNAMIC, x.device, None, 64)
        assert (cfg["GEMM"], cfg["SPLIT"], cfg["BMT"], cfg["BN"], cfg["BK"]) == ("rs", 4, 32, 64, 256)
        assert torch.equal(K.w4_linear(x, **kw), one)


@pytest.mark.parametrize("token_minor", [False, True])
def test_tail_launch_overlapping_the_main_one(token_minor):
    """RS_TAIL_OVERLAP: the launch of the last 32 tokens starts while the 256-token tiles' launch
    still runs (it released it after its wait for the codes) and waits for it only before exiting.
    A chain of layers, each reading the previous one's output, eager and as CUDA-graph replays: bit
    for bit the output of the launches one after the other (no layer reads an unfinished output)."""
    from duquant_runtime.kernels import w4a8 as K
    from duquant_runtime.quant import pack_int4

    g = torch.Generator().manual_seed(11 + token_minor)
    m, n = 800, 2048
    orth = lambda nb: torch.linalg.qr(torch.randn(nb, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous().cuda()  # noqa: E731
    layers = []
    for _ in range(4):
        q = torch.randint(-8, 8, (n, n), generator=g, dtype=torch.int8)
        layers.append(dict(qweight=pack_int4(q).cuda(), w_scale=(torch.rand(n, generator=g) * 0.004 + 0.001).cuda(),  # noqa: C408
                           r_in=orth(n // 64), perm=torch.randperm(n, generator=g).cuda(), r_out=orth(n // 64),
                           bias=torch.randn(n, generator=g).bfloat16().cuda(), smooth=None, mode=K.MODE_DYNAMIC,
                           token_minor_out=token_minor))
    base = {**K.pick_config(m, n, n, K.MODE_DYNAMIC), "GEMM": "rs", "RS_RESTORE": True, "BN": 128, "BMT": 256,
            "BK": 128, "num_warps": 8, "RS_STAGES": 4, "TAIL_BMT": 32, "PDL": True, "RS_PDL": True}
    x = torch.randn(m, n, generator=g).bfloat16().cuda()

    def chain(overlap):
        y = x
        for lay in layers:
            y = K.w4_linear(y, config={**base, "RS_TAIL_OVERLAP": overlap}, **lay)
        return y
    ref = chain(False)
    assert torch.isfinite(ref).all() and float(ref.float().abs().mean()) > 0
    assert torch.equal(chain(True), ref)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(True)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
