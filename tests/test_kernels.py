"""The Triton kernels (kernels/w4a8.py).

- Under Triton's CPU interpreter (TRITON_INTERPRET=1, tiny shapes): the kernels compute the
  reference numerics in every variant (dynamic activations through the quantize launch, static
  scales, no activation quantization; one or several rotation blocks and row tiles per prep
  program; x read through the permutation, gathered beforehand or transposed; split-K; swapped
  and unswapped dot operands; K tiles of 64/128/256, which also order the int8 codes' columns;
  the last tokens in a second launch of narrower tiles).
  Skipped when Triton is not installed (it is optional).
- On a CUDA GPU (skipped without): every x-load variant with and without programmatic dependent
  launch against the float reference.
- Everywhere: which GPUs run the kernels (sm_80+) and PDL (sm_90+).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from duquant_runtime.kernels import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton not installed")

SCRIPT = r"""
import torch
from duquant_runtime.kernels import w4a8 as K
from duquant_runtime.activation import fake_quantize_per_channel, fake_quantize_per_token
from duquant_runtime.quant import pack_int4
from duquant_runtime.transforms import input_transform, output_restore

g = torch.Generator().manual_seed(0)
orth = lambda nb, b: torch.linalg.qr(torch.randn(nb, b, b, generator=g, dtype=torch.float64))[0].float().contiguous()
cases = [  # m, n, k, B, Bo, mode, smooth, prep 64-wide blocks per program, swap, split-K
    (5, 128, 256, 64, 64, 2, False, 4, True, 1), (5, 128, 256, 64, 64, 2, True, 1, True, 2),
    (20, 64, 128, 32, 64, 2, False, 1, False, 1), (40, 64, 128, 32, 32, 1, True, 2, True, 1),
    (20, 128, 128, 32, 64, 1, False, 1, False, 2), (3, 128, 256, 64, None, 0, False, 4, True, 1),
    (5, 128, 256, 64, 64, 2, True, 1, True, 4), (40, 128, 256, 32, 64, 2, False, 2, False, 1),
    (20, 128, 256, 32, 64, 1, True, 1, True, 4)]
out, tm = [], []
for i, (m, n, k, b, bo, mode, smooth, G, swap, split) in enumerate(cases):
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    perm = torch.randperm(k, generator=g)
    r_in, r_out = orth(k // b, b), (orth(n // bo, bo) if bo else None)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01 + 0.001
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    sm = torch.rand(k, generator=g) + 0.5 if smooth else None
    xt = input_transform(x.float() / (sm if smooth else 1.0), perm, r_in)
    act = xt.abs().amax(0) / 127 * 0.8
    xq = fake_quantize_per_token(xt, 8) if mode == 2 else fake_quantize_per_channel(xt, act, 8) if mode == 1 else xt
    ref = output_restore((xq @ q.float().t()) * ws, r_out) + bias.float()
    cfg = dict(BN=128 if n % 128 == 0 and i % 4 >= 2 else 64, BMT=16, BK=(64, 128, 256)[i % 3], G=G, BMP=16, num_warps=4, num_stages=2, SWAP=swap, SPLIT=split,
               XLOAD=("gather", "index_select", "transpose")[i % 3],  # ways of reading x through perm
               TILES=1 + i % 2,  # row tiles per prep program
               BKQ=64, QCH=1 + i % 3,  # column chunks per quantize program
               RESTORE=i % 2,  # R_out restore: tf32 / bf16 operands
               PART_RESTORE=i % 3 == 1,  # split-K: each program restores its partial sums
               EPI_EARLY=i in (1, 3, 6),  # the epilogue's weight-side operands loaded before the main loop
               QFASTDIV=i % 2 == 1)  # the codes' quotients by one reciprocal per row
    y = K.w4_linear(x, qweight=pack_int4(q), w_scale=ws, r_in=r_in.half(), perm=perm,
                    r_out=None if r_out is None else r_out.half(), bias=bias, smooth=sm, mode=mode,
                    act_scale=act, config=cfg)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    out.append(float((y.float() - ref).norm() / ref.norm()))
    if cfg["XLOAD"] == "transpose":  # token-minor x (no transpose launch) and output: the same values
        y_tm = K.w4_linear(x.t().contiguous().t(), qweight=pack_int4(q), w_scale=ws, r_in=r_in.half(), perm=perm,
                           r_out=None if r_out is None else r_out.half(), bias=bias, smooth=sm, mode=mode,
                           act_scale=act, config=cfg, token_minor_out=True)
        tm.append(y_tm.stride() == (1, K.token_minor_row(m)) and torch.equal(y_tm, y))
print("ERR", *out)
print("TOKEN_MINOR", *tm)
rest = []  # the restore launch of the register-operand GEMM: y'^T (N, M) bf16 -> y' BD(R_out)^T + b
for m, bo, with_bias in ((40, 64, True), (130, 32, False)):
    yt = torch.randn(128, m, generator=g).to(torch.bfloat16)
    ro = orth(128 // bo, bo).half()
    b_ = torch.randn(128, generator=g).to(torch.bfloat16) if with_bias else None
    ref = output_restore(yt.float().t(), ro.bfloat16().float()) + (b_.float() if with_bias else 0.0)
    for out_t in (torch.empty(m, 128, dtype=torch.bfloat16), torch.empty(128, m, dtype=torch.bfloat16).t()):
        K.restore(yt, ro, b_, out_t)
        rest.append(float((out_t.float() - ref).norm() / ref.norm()))
print("RESTORE", *rest)
tail = []  # the last M % BMT tokens in a second launch of narrower tiles: the same values
tx = torch.randn(40, 256, generator=g).to(torch.bfloat16)
tq = torch.randint(-8, 8, (128, 256), generator=g, dtype=torch.int8)
tkw = dict(qweight=pack_int4(tq), w_scale=torch.rand(128, generator=g) * 0.01, r_in=orth(4, 64).half(),
           perm=torch.randperm(256, generator=g), r_out=orth(2, 64).half(),
           bias=torch.randn(128, generator=g).to(torch.bfloat16), smooth=None, mode=2)
tcfg = dict(G=1, BMP=16, BN=64, BMT=32, BK=128, SPLIT=1, SWAP=True, num_warps=4, num_stages=2, RESTORE=1, BMQ=4)
for tm_out in (False, True):
    y0 = K.w4_linear(tx, config=tcfg, token_minor_out=tm_out, **tkw)
    y1 = K.w4_linear(tx, config={**tcfg, "TAIL_BMT": 16}, token_minor_out=tm_out, **tkw)
    tail.append(K.tail_tokens(40, {**tcfg, "TAIL_BMT": 16}) == 8 and K.tail_tokens(40, {**tcfg, "TAIL_BMT": 16}, 2) == 0
                and y1.stride() == y0.stride()
                and torch.equal(y0, y1))
print("TAIL", *tail)
try:  # a strided (column-major) packed weight is refused, never read with the wrong strides
    K.w4_linear(x, qweight=pack_int4(q).t().contiguous().t(), w_scale=ws, r_in=r_in.half(), perm=perm, r_out=None,
                bias=None, smooth=None, mode=0)
except ValueError as err:
    print("REFUSED", "contiguous" in str(err))
try:  # packed columns that do not match x's width
    K.w4_linear(x[:, :128].contiguous(), qweight=pack_int4(q), w_scale=ws, r_in=r_in[:1].half(), perm=None,
                r_out=None, bias=None, smooth=None, mode=0)
except ValueError as err:
    print("REFUSED", "does not pack" in str(err))
"""


QUOTIENT_SCRIPT = r"""
import sys
import torch
from _util import halfway_row, natural_columns
from duquant_runtime.kernels import w4a8 as K
dev = sys.argv[1]
g = torch.Generator().manual_seed(5)
k, nb = 512, 8
m = 64 if dev == "cpu" else 4096
x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 4)  # row sizes over many octaves
x[0] = 0.0  # an all-zero row: scale 1
x[1] = torch.randn(k, generator=g) * 1e-37  # scales below 2^-128: the 2^64 operand scaling
x[2, :4] = 3.0e4  # an outlier row
x[3], halves = halfway_row(k)  # quotients exactly halfway between two codes
r_in = torch.eye(64).repeat(nb, 1, 1).half()  # identity rotations: the values reach the quantizer as given
x = x.to(dev, torch.bfloat16)
cfg = dict(G=1, BMP=16, prep_warps=4, BK=128, BMQ=4, QCH=1, BKQ=128)
# div.rn + rint/clamp first; then Markstein's quotient, the saturating conversion (SATCVT) and both
outs = [K.prepare_activation(x, r_in=r_in.to(dev), perm=None, smooth=None, mode=K.MODE_DYNAMIC,
                             cfg={**cfg, "QFASTDIV": fast, "SATCVT": sat})
        for fast, sat in ((False, False), (True, False), (False, True), (True, True))]
ties = natural_columns(outs[-1][0][3], 128)[2:2 + halves.numel()].float()
print("SAME", all(torch.equal(outs[0][0], o[0]) for o in outs), all(torch.equal(outs[0][1], o[1]) for o in outs),
      int((outs[0][0] != 0).sum()) > m * k // 2, torch.equal(ties, torch.round(halves)))
"""


def _quotient_check(dev: str) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
           "TRITON_INTERPRET": "1" if dev == "cpu" else "0"}
    res = subprocess.run([sys.executable, "-c", QUOTIENT_SCRIPT, dev], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.split("SAME")[1].split()


@needs_triton
def test_fast_quotient_gives_the_same_codes_in_interpreter():
    """The quantize launch's codes and scales with QFASTDIV (one reciprocal per row + Markstein's
    correction) and with SATCVT (rint and clamp as one saturating conversion) equal those with
    div.rn and rint/clamp, bit for bit: rows over many octaves, an all-zero row, a row whose scale
    is below 2^-128, an outlier row; quotients exactly halfway between codes round half to even."""
    assert _quotient_check("cpu") == ["True", "True", "True", "True"]


@pytest.mark.skipif(not triton_available() or not __import__("torch").cuda.is_available(), reason="needs CUDA and Triton")
def test_fast_quotient_gives_the_same_codes_on_gpu():
    assert _quotient_check("cuda") == ["True", "True", "True", "True"]


@needs_triton
def test_kernels_match_reference_in_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    errs = [float(v) for v in res.stdout.split("ERR")[1].split("TOKEN_MINOR")[0].split()]
    assert len(errs) == 9 and all(e < 1e-2 for e in errs), errs  # bf16 output, fp16 rotations, tf32
    assert res.stdout.split("TOKEN_MINOR")[1].split("RESTORE")[0].split() == ["True"] * 3, res.stdout
    rest = [float(v) for v in res.stdout.split("RESTORE")[1].split("TAIL")[0].split()]
    assert len(rest) == 4 and all(e < 1e-2 for e in rest), rest  # R_out transposed by mistake: ~1.4
    assert res.stdout.split("TAIL")[1].split("REFUSED")[0].split() == ["True"] * 2, res.stdout
    assert res.stdout.count("REFUSED True") == 2, res.stdout


@pytest.mark.skipif(not triton_available() or not __import__("torch").cuda.is_available(), reason="needs CUDA and Triton")
def test_tail_launch_gives_the_same_output_on_gpu():
    """M = 800 with 128-token tiles: the last 32 tokens in a second launch of 32-token tiles
    (TAIL_BMT, picked for the gate/up GEMMs) give the one-launch values bit for bit, row-major and
    token-minor."""
    import torch
    from duquant_runtime.kernels import w4a8 as K

    g = torch.Generator().manual_seed(12)
    m, n, k = 800, 2048, 2048
    x = torch.randn(m, k, generator=g).bfloat16().cuda()
    orth = lambda nb: torch.linalg.qr(torch.randn(nb, 64, 64, generator=g, dtype=torch.float64))[0]  # noqa: E731
    kw = dict(qweight=torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda(),
              w_scale=(torch.rand(n, generator=g) * 0.01 + 0.001).cuda(), r_in=orth(k // 64).half().contiguous().cuda(),
              perm=torch.randperm(k, generator=g).cuda(), r_out=orth(n // 64).half().contiguous().cuda(), bias=None,
              smooth=None, mode=K.MODE_DYNAMIC)
    cfg = dict(K.pick_config(m, 32768, k, K.MODE_DYNAMIC))  # the gate/up group's launch configuration
    assert K.tail_tokens(m, cfg) == 32
    for tm_out in (False, True):
        one = K.w4_linear(x, config={**cfg, "TAIL_BMT": 0}, token_minor_out=tm_out, **kw)
        two = K.w4_linear(x, config=cfg, token_minor_out=tm_out, **kw)
        assert two.stride() == one.stride() and torch.equal(two, one)


@pytest.mark.skipif(not triton_available() or not __import__("torch").cuda.is_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("xload", ["gather", "index_select", "transpose"])
@pytest.mark.parametrize("pdl", [False, True])
def test_launch_variants_match_reference_on_gpu(xload, pdl):
    """Every way of reading x through the permutation, with and without programmatic dependent
    launch, at prefix (M=800, split-K on a narrow layer too) and action-chunk sizes (M=50)."""
    import torch
    from duquant_runtime.activation import fake_quantize_per_channel, fake_quantize_per_token
    from duquant_runtime.kernels import w4a8 as K
    from duquant_runtime.quant import pack_int4
    from duquant_runtime.transforms import input_transform, output_restore

    g = torch.Generator().manual_seed(3)
    for m, n, k, split in ((800, 512, 1024, 1), (800, 256, 1024, 4), (50, 512, 2048, 4)):
        orth = lambda nb: torch.linalg.qr(torch.randn(nb, 64, 64, generator=g, dtype=torch.float64))[0].float().contiguous()  # noqa: E731
        r_in, r_out = orth(k // 64), orth(n // 64)
        perm = torch.randperm(k, generator=g)
        q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        ws = torch.rand(n, generator=g) * 0.01 + 0.001
        x = torch.randn(m, k, generator=g)
        x[:, :3] *= 40.0
        xt = input_transform(x, perm, r_in)
        act = xt.abs().amax(0) / 127 * 0.8
        for mode in (K.MODE_DYNAMIC, K.MODE_STATIC):
            xq = fake_quantize_per_token(xt, 8) if mode == K.MODE_DYNAMIC else fake_quantize_per_channel(xt, act, 8)
            ref = output_restore((xq @ q.float().t()) * ws, r_out)
            cfg = dict(XLOAD=xload, PDL=pdl, SPLIT=split, TILES=2)
            y = K.w4_linear(x.cuda().bfloat16(), qweight=pack_int4(q).cuda(), w_scale=ws.cuda(),
                            r_in=r_in.half().cuda(), perm=perm.cuda(), r_out=r_out.half().cuda(), bias=None,
                            smooth=None, mode=mode, act_scale=act.cuda(), config=cfg)
            err = float((y.float().cpu() - ref).norm() / ref.norm())
            assert err < 1e-2, (m, n, k, mode, xload, pdl, err)


@pytest.mark.skipif(not triton_available() or not __import__("torch").cuda.is_available(), reason="needs CUDA and Triton")
def test_token_minor_input_and_output_agree_on_gpu():
    """A token-minor x (strides (1, M): a gate/up output through the activation) read without the
    transpose launch, and a token-minor output, give the row-major path's values bit for bit on
    the pi0.5 down_proj / o_proj widths at M = 50 and 800, in both activation modes."""
    import torch
    from duquant_runtime.kernels import w4a8 as K

    g = torch.Generator().manual_seed(11)
    for m in (50, 800):
        for n, k in ((2048, 16384), (1024, 4096), (2048, 2048)):
            x = torch.randn(m, k, generator=g)
            x[:, :3] *= 40.0
            x = x.bfloat16().cuda()
            perm = torch.randperm(k, generator=g).cuda()
            orth = lambda nb: torch.linalg.qr(torch.randn(nb, 64, 64, generator=g, dtype=torch.float64))[0]  # noqa: E731
            r_in, r_out = orth(k // 64).half().contiguous().cuda(), orth(n // 64).half().contiguous().cuda()
            qw = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda()
            ws = (torch.rand(n, generator=g) * 0.01 + 0.001).cuda()
            act = (torch.rand(k, generator=g) * 0.05 + 0.01).cuda()
            for mode in (K.MODE_DYNAMIC, K.MODE_STATIC):
                kw = dict(qweight=qw, w_scale=ws, r_in=r_in, perm=perm, r_out=r_out, bias=None, smooth=None,
                          mode=mode, act_scale=act)
                rows = K.w4_linear(x, config=dict(XLOAD="transpose"), **kw)
                tm = K.w4_linear(x.t().contiguous().t(), token_minor_out=True, **kw)
                assert tm.stride() == (1, K.token_minor_row(m)) and torch.equal(tm, rows), (m, n, k, mode)


@pytest.mark.skipif(not triton_available() or not __import__("torch").cuda.is_available(), reason="needs CUDA and Triton")
def test_quantize_launch_store_orders_agree_on_gpu():
    """The quantize launch's vector stores (even and odd columns as two runs) write the codes of
    its per-element store, bit for bit, on the pi0.5 widths at M = 1, 50 and 800."""
    import torch
    from duquant_runtime.kernels import w4a8 as K

    g = torch.Generator().manual_seed(7)
    for m in (1, 50, 800):
        for k in (1024, 2048, 4096, 16384):
            x = torch.randn(m, k, generator=g)
            x[:, :3] *= 40.0
            x = x.bfloat16().cuda()
            perm = torch.randperm(k, generator=g).cuda()
            r_in = torch.linalg.qr(torch.randn(k // 64, 64, 64, generator=g, dtype=torch.float64))[0]
            r_in = r_in.half().contiguous().cuda()
            cfg = K.pick_config(m, 2048, k, K.MODE_DYNAMIC)
            runs = K.prepare_activation(x, r_in=r_in, perm=perm, smooth=None, mode=K.MODE_DYNAMIC, cfg=cfg)
            each = K.prepare_activation(x, r_in=r_in, perm=perm, smooth=None, mode=K.MODE_DYNAMIC,
                                        cfg=dict(cfg, QRUNS=False))
            assert torch.equal(runs[0], each[0]) and torch.equal(runs[1], each[1]), (m, k)


@needs_triton
def test_supports_refuses_geometries_the_kernels_cannot_run():
    from duquant_runtime.kernels.w4a8 import supports
    assert supports(16384, 2048, 64, 64) is None and supports(2048, 256, 64, None) is None
    assert "multiple of 128" in supports(1000, 2048, 8, 64)
    assert "exceeds 65536" in supports(1 << 17, 2048, 64, 64)  # int32 sums of the int8 path
    assert "input block" in supports(2048, 2048, 48, 64)
    assert "output block" in supports(2048, 2048, 64, 48)
    assert "out_features" in supports(2048, 2000, 64, None)


def test_kernels_need_sm80_and_pdl_needs_sm90():
    """Older GPUs run the reference path (no bf16 tensor cores / bf16x2 PTX before sm_80), and
    programmatic dependent launch (griddepcontrol) is only used from Hopper (sm_90) on."""
    from duquant_runtime.kernels import capability_ok, pdl_ok
    assert not capability_ok((7, 5)) and capability_ok((8, 0)) and capability_ok((8, 9)) and capability_ok((9, 0))
    assert not pdl_ok((8, 0)) and not pdl_ok((8, 9)) and pdl_ok((9, 0)) and pdl_ok((10, 0))


def _compile_tool():
    """benchmarks/compile_w4a8.py as a module."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compile_w4a8
    return compile_w4a8


def test_offline_compile_report_refuses_bad_tiles(capsys):
    """benchmarks/compile_w4a8.py: a malformed --tiles is one error line and exit status 2."""
    compile_w4a8 = _compile_tool()
    assert compile_w4a8.main(["--tiles", "64/128/128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BN/BMT/BK/warps/stages" in err


@needs_triton
def test_offline_compile_report_reads_the_generated_code():
    """benchmarks/compile_w4a8.py compiles the GEMM for sm_90 without a GPU: int8 codes give int8
    wgmma, ptxas reports the registers, and fewer pipeline stages never fit fewer programs."""
    compile_w4a8 = _compile_tool()
    four, three = (compile_w4a8.report(True, (64, 128, 128, 4, s), 2048) for s in (4, 3))
    assert any(".s32.s8.s8" in w for w in four["wgmma"]), four["wgmma"]
    assert four["registers"] and four["shared_bytes"] > three["shared_bytes"] > 0
    assert three["programs_per_sm"] >= four["programs_per_sm"] >= 1


@needs_triton
def test_offline_register_operand_gemm_keeps_its_wgmma_in_flight_with_the_restore():
    """benchmarks/compile_w4a8.py `rs_report`: the register-operand GEMM with its R_out restore in the
    epilogue (shared memory after the main loop) still keeps int8 wgmma in flight (wait depth 2) and
    ptxas does not serialize them (C7515), for row-major and token-minor outputs and both tile widths;
    the restore is one bf16 wgmma."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    compile_w4a8 = _compile_tool()
    for kw in ({}, {"token_minor": True}, {"bn": 64, "warps": 4}, {"restore": False},
               {"bn": 64, "bmt": 32, "warps": 4, "stages": 5, "split": 8, "pdl": True}):
        r = compile_w4a8.rs_report(**kw)
        assert not r["serialized"] and r["waits"] == [0, 2], (kw, r)
        assert any(".s32.s8.s8" in w for w in r["wgmma"]), (kw, r)
        assert any(".f32.bf16.bf16" in w for w in r["wgmma"]) == r["restore"], (kw, r)
        assert r["registers"] and r["registers"] <= 255 and r["shared_bytes"] <= 232448, (kw, r)


@needs_triton
def test_register_operand_tiles_apply_only_where_that_gemm_runs(monkeypatch):
    """`resolve_config`: the linked gate/up GEMM's RS_CONFIG (256-token tiles, 128-wide K steps, a
    32-token tail launch, PDL) replaces the Triton launches' keys only where the register-operand GEMM runs
    (sm_90 with Gluon, dynamic activations, GEMM "rs"); a config's keys (GEMM, PDL, RS_CONFIG) win,
    and the activation launches store their codes in the K tiles the GEMM then reads."""
    import torch
    from duquant_runtime.kernels import w4a8 as K
    picked = K.pick_config(800, 32768, 2048, K.MODE_DYNAMIC)
    assert picked["GEMM"] == "rs" and picked["RS_RESTORE"] and picked["RS_CONFIG"]["BMT"] == 256
    cpu = K.resolve_config(800, 32768, 2048, K.MODE_DYNAMIC, torch.device("cpu"))
    assert "RS_CONFIG" not in cpu and (cpu["BN"], cpu["BMT"], cpu["BK"]) == (64, 128, 256)  # the Triton GEMM's
    monkeypatch.setattr(K, "_rs_module", lambda device: object())  # as on an sm_90 GPU with Gluon
    rs = K.resolve_config(800, 32768, 2048, K.MODE_DYNAMIC, torch.device("cpu"))
    assert (rs["BN"], rs["BMT"], rs["BK"], rs["num_warps"], rs["RS_STAGES"], rs["TAIL_BMT"]) == (128, 256, 128, 8, 4, 32)
    assert rs["PDL"] and rs["RS_PDL"] and not cpu["PDL"]  # PDL measured faster with the rs GEMM only
    assert rs["RS_TAIL_OVERLAP"] and "RS_TAIL_OVERLAP" not in cpu  # its 32-token launch beside the last wave
    assert K.gemm_tiling(2048, rs) == (128, 1) and K.tail_tokens(800, rs) == 32
    assert K.resolve_config(800, 32768, 2048, K.MODE_DYNAMIC, torch.device("cpu"), {"GEMM": None})["BMT"] == 128
    assert not K.resolve_config(800, 32768, 2048, K.MODE_DYNAMIC, torch.device("cpu"), {"PDL": False})["PDL"]
    assert K.resolve_config(800, 32768, 2048, K.MODE_DYNAMIC, torch.device("cpu"),
                            {"RS_CONFIG": {"BMT": 128}})["BMT"] == 128
    static = K.pick_config(800, 32768, 2048, K.MODE_STATIC)  # the rs GEMM multiplies int8 codes only
    assert K.resolve_config(800, 32768, 2048, K.MODE_STATIC, torch.device("cpu")) == static and "RS_CONFIG" not in static
    down = K.resolve_config(800, 2048, 16384, K.MODE_DYNAMIC, torch.device("cpu"))
    assert down["GEMM"] == "rs" and down["RS_RESTORE"] and down["RS_PDL"] and not down["RS_TRIGGER"]
    # M = 1 down_proj: the rs GEMM's split-K over 32-token tiles, 5 stages; elsewhere the Triton GEMM's over 16
    one = K.resolve_config(1, 2048, 16384, K.MODE_DYNAMIC, torch.device("cpu"))
    assert (one["GEMM"], one["SPLIT"], one["BMT"], one["RS_STAGES"]) == ("rs", 4, 32, 5) and one["RS_PDL"]
    assert K.gemm_tiling(16384, one) == (256, 4)
    monkeypatch.setattr(K, "_rs_module", lambda device: None)  # no Gluon: the Triton split-K
    tri = K.resolve_config(1, 2048, 16384, K.MODE_DYNAMIC, torch.device("cpu"))
    assert (tri["SPLIT"], tri["BMT"]) == (4, 16) and "RS_STAGES" not in tri


@needs_triton
def test_mid_token_counts_pick_tiles_that_fill_the_gpu():
    """Between the workload's M = 1 and 800 (benchmarks/msweep_gpu.py): the LLM gate/up GEMMs take
    32- or 64-token tiles without split-K up to M = 64 and, above, 128- or 256-token tiles by the
    padding they leave; LLM down_proj splits K where its tiles are few (up to M = 256). The action
    expert's shapes keep their small-M launches up to `small_m_tokens` (a batch of chunks)."""
    from duquant_runtime.kernels import w4a8 as K
    assert K._padded_tokens(800, 256, 32) == 800 and K._padded_tokens(384, 256, 32) == 512
    assert K._padded_tokens(384, 128, 32) == 384 and K._padded_tokens(100, 256, 32) == 256
    assert K._padded_tokens(20, 128, 32) == 128 and K._padded_tokens(256, 256, 32) == 256
    assert [K._token_tile(m, 128, 256, 32) for m in (100, 128, 256, 384, 512, 640, 800, 1024)] == \
        [128, 128, 256, 128, 256, 128, 256, 256]
    assert [K._token_tile(m, 64, 128, 0) for m in (129, 192, 256, 320, 384)] == [64, 64, 128, 64, 128]
    dyn = K.MODE_DYNAMIC
    for m, bmt in ((17, 32), (32, 32), (33, 64), (64, 64)):
        gu = K.pick_config(m, 16384, 2048, dyn)
        assert (gu.get("GEMM"), gu["BMT"], gu["BK"], gu["SPLIT"]) == (None, bmt, 256, 1)
        down = K.pick_config(m, 2048, 16384, dyn)
        assert down["GEMM"] == "rs" and (down["RS_CONFIG"]["BMT"], down["RS_CONFIG"]["SPLIT"]) == (bmt, 4)
    assert K.pick_config(64, 32768, 2048, dyn)["RS_CONFIG"]["BMT"] == 64  # the linked group: rs tiles
    assert K.pick_config(32, 32768, 2048, dyn).get("GEMM") is None
    for m, bmt in ((100, 128), (256, 256), (384, 128), (800, 256)):
        assert K.pick_config(m, 32768, 2048, dyn)["RS_CONFIG"]["BMT"] == bmt
    for m, bn, bmt, split in ((128, 128, 64, 4), (192, 64, 64, 2), (256, 64, 128, 2), (384, 64, 128, 1),
                              (512, 64, 128, 1), (640, 128, 128, 1), (800, 128, 128, 1)):
        down = K.pick_config(m, 2048, 16384, dyn)
        assert (down["BN"], down["BMT"], down["SPLIT"]) == (bn, bmt, split), m
    one = K.pick_config(16, 16384, 2048, dyn)  # M <= 16 unchanged
    assert (one["BMT"], one["SPLIT"]) == (16, 2)
    # the action expert's shapes (a batch of 50-token chunks): the small-M launches, no x^T launch, up to
    # small_m_tokens(n, k)
    for n, k, bmt, top in ((1024, 4096, 32, 256), (8192, 1024, 128, 256), (4096, 1024, 64, 100), (2048, 1024, 32, 100),
                           (2560, 1024, 32, 100)):
        assert K.small_m_tokens(n, k) == top
        for m in (65, 100, top):
            cfg = K.pick_config(m, n, k, dyn)
            assert ("XLOAD" not in cfg, cfg.get("ACT"), cfg["BMT"]) == (True, None, bmt), (n, k, m)
            rs = ("GEMM", "RS_RESTORE", "RS_CONFIG") if (n, k) == (1024, 4096) and m > 128 else ()
            assert {key: v for key, v in cfg.items() if key not in ("BMT", *rs)} == \
                {key: v for key, v in K.pick_config(64, n, k, dyn).items() if key != "BMT"}, (n, k, m)
        assert K.pick_config(top + 1, n, k, dyn)["XLOAD"] == "transpose"
        assert K.pick_config(100, n, k, K.MODE_STATIC)["XLOAD"] == "transpose"  # measured in dynamic mode only
    # expert down_proj above 128 tokens: the register-operand GEMM split 2 over 32-token tiles (where it runs)
    for m in (128, 129, 200, 256):
        cfg = K.pick_config(m, 1024, 4096, dyn)
        assert (cfg.get("GEMM"), (cfg.get("RS_CONFIG") or {}).get("SPLIT")) == (("rs", 2) if m > 128 else (None, None))
        assert (cfg["BK"], cfg["SPLIT"]) == (128, 4)  # the Triton GEMM's, where the rs GEMM does not run
    # expert o and k/v, the LLM's q/o, q/k/v, k/v, gate/up and down: the large-M launches above 64 tokens
    for n, k in ((1024, 2048), (256, 1024), (2048, 2048), (2560, 2048), (256, 2048), (16384, 2048), (2048, 16384)):
        assert K.small_m_tokens(n, k) == 64
    # ... and past small_m_tokens, up to 256 tokens, expert q / o / gate/up / linked q/k/v: the large-M activation
    # launch with 32-token GEMM tiles
    for n, k in ((1024, 2048), (2048, 1024), (4096, 1024), (2560, 1024)):
        for m in (K.small_m_tokens(n, k) + 1, 200, 256):
            cfg = K.pick_config(m, n, k, dyn)
            assert (cfg["ACT"], cfg["BN"], cfg["BMT"], cfg["BK"], cfg["SPLIT"], cfg.get("GEMM")) == \
                ("cluster", 64, 32, 256, 1, None), (n, k, m)
        assert K.pick_config(257, n, k, dyn)["BMT"] > 32 and K.pick_config(200, n, k, K.MODE_STATIC)["BMT"] > 32
    for n, k in ((256, 1024), (2048, 2048), (2560, 2048), (256, 2048), (8192, 1024), (1024, 4096), (16384, 2048)):
        assert not K._mid_expert_tiles(200, n, k)


@pytest.mark.skipif(not triton_available() or not __import__("torch").cuda.is_available(), reason="needs CUDA and Triton")
def test_mid_token_counts_match_reference_on_gpu():
    """The picked launches at M between the workload's (LLM gate/up and down_proj shapes, the action
    expert's above 64 tokens, down_proj on the token-minor hidden) match the float32 reference; down_proj's split-K gives its unsplit values
    bit for bit, and so does a tail launch beside 128-token tiles (M = 160) against none."""
    import torch
    from duquant_runtime.activation import fake_quantize_per_token
    from duquant_runtime.kernels import w4a8 as K
    from duquant_runtime.quant import pack_int4
    from duquant_runtime.transforms import input_transform, output_restore

    g = torch.Generator().manual_seed(21)
    orth = lambda nb: torch.linalg.qr(torch.randn(nb, 64, 64, generator=g, dtype=torch.float64))[0].float().contiguous()  # noqa: E731,E501
    for m, n, k in ((32, 16384, 2048), (64, 32768, 2048), (128, 16384, 2048), (160, 16384, 2048), (384, 16384, 2048),
                    (64, 2048, 16384), (128, 2048, 16384), (192, 2048, 16384), (256, 2048, 16384),
                    (384, 2048, 16384),
                    # the action expert's shapes on the small-M launches (`small_m_tokens`)
                    (100, 1024, 4096), (200, 1024, 4096), (256, 8192, 1024), (100, 2560, 1024), (128, 4096, 1024)):
        r_in, r_out = orth(k // 64).cuda(), orth(n // 64).cuda()
        perm = torch.randperm(k, generator=g).cuda()
        q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8).cuda()
        ws = (torch.rand(n, generator=g) * 0.01 + 0.001).cuda()
        x = torch.randn(m, k, generator=g).cuda()
        x[:, :3] *= 40.0
        ref = output_restore((fake_quantize_per_token(input_transform(x, perm, r_in), 8) @ q.float().t()) * ws, r_out)
        xb = x.bfloat16()
        if k >= 4096:  # down_proj: as gate/up leave it (mlp_layout.py)
            xb = xb.t().contiguous().t()
        kw = dict(qweight=pack_int4(q), w_scale=ws, r_in=r_in.half(), perm=perm, r_out=r_out.half(), bias=None,
                  smooth=None, mode=K.MODE_DYNAMIC)
        y = K.w4_linear(xb, **kw)
        err = float((y.float() - ref).norm() / ref.norm())
        assert err < 2e-2, (m, n, k, err)  # tf32 rotation and bf16 restore move quantization ties (test_w4a8_rs)
        cfg = K.resolve_config(m, n, k, K.MODE_DYNAMIC, x.device, None, 64)
        if cfg["SPLIT"] > 1 and cfg.get("GEMM") == "rs":  # int32 partial sums (Triton's split-K adds float32)
            assert torch.equal(K.w4_linear(xb, config={"SPLIT": 1}, **kw), y), (m, n, k)
        if K.tail_tokens(m, cfg):  # M = 160: 128-token tiles, the last 32 tokens in the overlapping tail launch
            assert torch.equal(K.w4_linear(xb, config={"TAIL_BMT": 0}, **kw), y), (m, n, k)


@needs_triton
def test_tiles_fit_shapes_the_picks_were_not_measured_on(monkeypatch):
    """`resolve_config` for layers outside the pi0.5 shapes (`supports` only asks N to be a multiple
    of 64 and of the output block): a weight-row tile that does not divide N, or is not a multiple
    of the output block, shrinks; the rs GEMM gives way to the Triton GEMM where its tiles do not fit."""
    import torch
    from duquant_runtime.kernels import w4a8 as K
    cpu = torch.device("cpu")
    down = K.resolve_config(800, 2112, 16384, K.MODE_DYNAMIC, cpu, None, 64)  # picked BN 128, N = 33 x 64
    assert down["BN"] == 64 and 2112 % down["BN"] == 0
    assert K.resolve_config(800, 2048, 16384, K.MODE_DYNAMIC, cpu, None, 64)["BN"] == 128  # the pick, where it fits
    monkeypatch.setattr(K, "_rs_module", lambda device: object())  # as on an sm_90 GPU with Gluon
    gu = K.resolve_config(800, 8256, 2048, K.MODE_DYNAMIC, cpu, None, 64)  # rs tiles: BN 128 does not divide N
    assert gu["GEMM"] is None and gu["BN"] == 64 and gu["BMT"] == 128  # the Triton pick
    assert gu["PDL"] == K.pick_config(800, 8256, 2048, K.MODE_DYNAMIC)["PDL"] and "RS_PDL" not in gu
    kv = K.resolve_config(800, 256, 2048, K.MODE_DYNAMIC, cpu, None, 128)  # rs BN 64 < an output block of 128
    assert kv["GEMM"] is None and kv["BN"] == 128
    assert K.resolve_config(800, 256, 2048, K.MODE_DYNAMIC, cpu, None, 64)["GEMM"] == "rs"
    # split-K: each program's K chunk must hold an even number of K steps, else the Triton GEMM
    assert K.resolve_config(1, 2048, 16384, K.MODE_DYNAMIC, cpu, None, 64)["GEMM"] == "rs"
    odd = K.resolve_config(1, 2048, 5120, K.MODE_DYNAMIC, cpu, None, 64)  # (256, 4): 5 steps of 256 per chunk
    assert odd["GEMM"] is None and (odd["SPLIT"], odd["BMT"]) == (4, 16)
    # tiles the rs GEMM does not compile for (a `config` override): the Triton GEMM, not a compiler crash
    for over in ({"BMT": 16}, {"BN": 32}, {"TAIL_BMT": 16}):
        assert K.resolve_config(1, 2048, 16384, K.MODE_DYNAMIC, cpu, over, 64)["GEMM"] is None, over
    assert K.resolve_config(1, 2048, 16384, K.MODE_DYNAMIC, cpu, {"BMT": 64}, 64)["GEMM"] == "rs"
    assert K.rs_tiles_fit({"BN": 128, "BMT": 256, "TAIL_BMT": 32}) and not K.rs_tiles_fit({"BN": 64, "BMT": 16})


def test_token_minor_rows_are_padded_only_above_256_tokens_and_stores_stay_inside():
    """`token_minor_row`: M up to 256 tokens as it is, above padded to a multiple of 16; `_store_tokens`:
    a launch's store bound is its token count, rounded up to 16 only inside the padding of a
    token-minor out (never past a row's end, never for row-major or one-token outputs)."""
    pytest.importorskip("triton")
    import torch

    from duquant_runtime.kernels import w4a8 as K
    assert [K.token_minor_row(m) for m in (1, 50, 255, 256, 257, 700, 760, 800)] == [1, 50, 255, 256, 272, 704, 768,
                                                                                      800]
    for m in (2, 50, 65, 256, 257, 300, 700, 800):
        s = K.token_minor_row(m)
        out = torch.empty((64, s)).t()[:m]
        assert K.is_token_minor(out) and out.stride() == (1, s)
        for start, stop in ((0, m), (0, m - m % 32), (m - m % 32, m)):
            if stop <= start:
                continue
            bound = K._store_tokens(out, start, stop)
            assert stop - start <= bound and start + bound <= s  # inside the allocated rows
            assert bound == stop - start or (bound % 16 == 0 and s > m)
        assert K._store_tokens(torch.empty(m, 64), 0, m) == m  # row-major: exact
    assert K._store_tokens(torch.empty((64, 1)).t(), 0, 1) == 1


@needs_triton
def test_padded_token_minor_output_in_interpreter():
    """Above 256 tokens (M % 16 != 0) the GEMM's token-minor output has rows padded to 16 tokens and
    the row-major output's values, bit for bit, for the Triton GEMM (the stores past M land in the
    padding); the Triton prep reads such a padded x^T back (down_proj's case) with the same result."""
    script = r'''
import torch
from duquant_runtime.kernels import w4a8 as K
from duquant_runtime.quant import pack_int4
g = torch.Generator().manual_seed(1)
orth = lambda nb: torch.linalg.qr(torch.randn(nb, 64, 64, generator=g, dtype=torch.float64))[0].half().contiguous()
m, n, k = 300, 128, 128
kw = dict(qweight=pack_int4(torch.randint(-8, 8, (n, k), generator=g)), w_scale=torch.rand(n, generator=g) * 0.01 + 0.001,
          r_in=orth(k // 64), perm=torch.randperm(k, generator=g), r_out=orth(n // 64),
          bias=torch.randn(n, generator=g).bfloat16(), smooth=None, mode=K.MODE_DYNAMIC)
x = (torch.randn(m, k, generator=g) * 2).bfloat16()
rows = K.w4_linear(x, **kw)
tm = K.w4_linear(x, token_minor_out=True, **kw)
print("STRIDE", tm.stride() == (1, 304), torch.equal(tm, rows))
kw2 = dict(kw, qweight=pack_int4(torch.randint(-8, 8, (64, n), generator=g)), w_scale=torch.rand(64, generator=g) * 0.01,
           r_in=orth(n // 64), perm=torch.randperm(n, generator=g), r_out=orth(1), bias=None)
print("READ", torch.equal(K.w4_linear(tm, **kw2), K.w4_linear(rows, **kw2)))
'''
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "STRIDE True True" in res.stdout and "READ True" in res.stdout, res.stdout
