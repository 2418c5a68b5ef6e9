"""kernels/hidden.py: the MLP hidden act(gate) * up computed in down_proj's prep launch.

- Under Triton's CPU interpreter (tiny shapes) and on a CUDA GPU (skipped without): `w4_linear`
  given (gate, up, act) returns what it returns given torch's act(gate) * up, bit for bit, for
  each activation, row-major and token-minor inputs, every activation mode; and the hidden values
  themselves equal torch's (on the GPU over a million inputs, both 16-bit dtypes).
- Where down_proj's prep does not read its input itself, `hidden_launch` computes the hidden in
  its own launch: the same values (both runs above), over operands without overlaps or wide gaps.
- Everywhere: bad arguments are refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duquant_runtime.kernels import fast_path_available, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton not installed")
needs_gpu = pytest.mark.skipif(not (triton_available() and torch.cuda.is_available() and fast_path_available("cuda")),
                               reason="needs a CUDA GPU (sm_80+) and Triton")

SCRIPT = r"""
import sys
import torch
from duquant_runtime.kernels import w4a8 as K
from duquant_runtime.kernels.hidden import ACT_CODES, hidden_launch
from duquant_runtime.mlp_activation import hidden as torch_hidden

dev = sys.argv[1]
g = torch.Generator().manual_seed(3)
orth = lambda nb, b: torch.linalg.qr(torch.randn(nb, b, b, generator=g, dtype=torch.float64))[0].half().contiguous()


def kernel_hidden(gate, up, act):  # act(gate) * up (or act(gate)) by `hidden` in its own launch
    return hidden_launch(gate, up, act)


n = 1 << 20 if dev == "cuda" else 1 << 12
same_values = []
for dt in (torch.bfloat16, torch.float16):
    x = (torch.randn(n, generator=g) * 4).to(dt)
    x[:8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 9.0, -9.0, 30.0, -30.0]).to(dt)
    u = torch.randn(n, generator=g).to(dt)
    x, u = x.to(dev), u.to(dev)
    for act, code in ACT_CODES.items():
        for has_up in (True, False):
            out = hidden_launch(x, u if has_up else None, act)
            ref = torch_hidden(x, u if has_up else None, act)
            ulp = 2.0 ** (-7 if dt == torch.bfloat16 else -10)  # one unit in the last place, relative, at most
            far = (out.float() - ref.float()).abs() > ulp * ref.float().abs() + 1e-6
            same_values += [int((out != ref).sum()), int(far.sum())]
print("VALUES", *same_values)

same = []
for m, token_minor in ((3, False), (20, True), (20, False)):
    for mode in (K.MODE_DYNAMIC, K.MODE_STATIC, K.MODE_NONE):
        for act in ACT_CODES:
            k, n, b = 256, 128, 64
            gate = (torch.randn(m, k, generator=g) * 2).to(torch.bfloat16)
            up = (torch.randn(m, k, generator=g) * 2).to(torch.bfloat16)
            if token_minor:
                gate, up = gate.t().contiguous().t(), up.t().contiguous().t()
            kw = dict(qweight=torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8), r_in=orth(k // b, b),
                      w_scale=torch.rand(n, generator=g) * 0.01 + 0.001, perm=torch.randperm(k, generator=g),
                      r_out=orth(n // b, b), bias=None, smooth=None, mode=mode,
                      act_scale=torch.rand(k, generator=g) * 0.05 + 0.01 if mode == K.MODE_STATIC else None)
            kw = {key: v.to(dev) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
            gate, up = gate.to(dev), up.to(dev)
            fused = K.w4_linear(gate, up=up, act=act, **kw)
            # against the layer on the hidden computed apart by the same function (on the GPU that is torch's,
            # VALUES above; the interpreter's formulas differ from torch's CPU ones by a rounding here and there)
            plain = K.w4_linear(kernel_hidden(gate, up, act), **kw)
            alone = K.w4_linear(gate, act=act, **kw)  # no up: act(gate), a plain fc1 -> act -> fc2 MLP
            same.append(torch.equal(fused, plain) and torch.equal(alone, K.w4_linear(kernel_hidden(gate, None, act), **kw))
                        and not torch.equal(fused, alone))
            # x gathered by index_select first: the prep does not read x, so the hidden is launched apart
            gathered = K.w4_linear(gate, up=up, act=act, config={"XLOAD": "index_select"}, **kw)
            same.append(torch.equal(gathered, K.w4_linear(kernel_hidden(gate, up, act), config={"XLOAD": "index_select"},
                                                          **kw)))
print("SAME", *same)
"""


def _run(dev: str, tmp_path: Path) -> tuple[list[int], list[str]]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "TRITON_INTERPRET": "1" if dev == "cpu" else "0"}
    script = tmp_path / "hidden_check.py"  # a file: Triton compiles a jit function from its source file
    script.write_text(SCRIPT)
    res = subprocess.run([sys.executable, str(script), dev], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    values = [int(v) for v in res.stdout.split("VALUES")[1].split("SAME")[0].split()]
    return values, res.stdout.split("SAME")[1].split()


@needs_triton
def test_fused_hidden_matches_torch_in_interpreter(tmp_path):
    values, same = _run("cpu", tmp_path)
    # the interpreter has no libdevice (float64 formulas) and torch's CPU kernels their own: a few
    # values one 16-bit rounding apart (a wrong formula or rounding would differ on most inputs)
    assert len(values) == 16 and values[1::2] == [0] * 8 and max(values[0::2]) <= 4096 // 16, values
    assert same == ["True"] * 36


@needs_gpu
def test_fused_hidden_matches_torch_on_gpu(tmp_path):
    """On the GPU the hidden equals torch's bit for bit (libdevice's tanh, erf, exp as nvcc's)."""
    values, same = _run("cuda", tmp_path)
    assert values == [0] * 16, values
    assert same == ["True"] * 36


def test_w4_linear_refuses_bad_hidden_arguments():
    pytest.importorskip("triton")
    from duquant_runtime.kernels import w4a8 as K
    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    kw = dict(qweight=torch.zeros(64, 64, dtype=torch.uint8), w_scale=torch.ones(64), r_in=torch.eye(64).repeat(2, 1, 1),
              perm=None, r_out=None, bias=None, smooth=None, mode=K.MODE_DYNAMIC)
    with pytest.raises(ValueError, match="act must be one of"):
        K.w4_linear(x, act="gelu", **kw)  # erf gelu: not computed bit for bit as torch does (hidden.py)
    with pytest.raises(ValueError, match="needs act"):
        K.w4_linear(x, up=x, **kw)
    with pytest.raises(ValueError, match="needs act"):
        K.w4_linear(x, up=x[:1], act="silu", **kw)


def test_hidden_launch_takes_operands_without_overlaps_or_wide_gaps():
    pytest.importorskip("triton")
    from duquant_runtime.kernels.hidden import hidden_launch, launchable, storage_span
    x = torch.zeros(6, 128, dtype=torch.bfloat16)
    assert launchable(x, x) and launchable(x.t(), None)  # row-major, and token-minor storage
    assert launchable(x.t().contiguous().t(), x.t().contiguous().t())
    padded = torch.zeros(128, 16, dtype=torch.bfloat16).t()[:11]  # token-minor, rows padded to 16 tokens (w4_gemm)
    assert storage_span(padded) == 127 * 16 + 11 and launchable(padded, padded)
    assert not launchable(padded[:6], None)  # 6 of 16: more gaps than elements
    assert storage_span(x[:, :64]) == 5 * 128 + 64 and launchable(x[:, :64], None)
    assert not launchable(x[:, :8], None)  # gaps wider than the elements
    assert not launchable(x[:1].expand(6, 128), None)  # overlapping (stride 0)
    assert not launchable(x, x.t().contiguous().t())  # up laid out unlike gate
    assert not launchable(x.float(), None)
    with pytest.raises(ValueError, match="act must be one of"):
        hidden_launch(x, x, "gelu")
    with pytest.raises(ValueError, match="without overlaps"):
        hidden_launch(x[:, :8], None, "silu")


@needs_triton
def test_hidden_launch_on_padded_rows_in_interpreter(tmp_path):
    """Over a token-minor tensor with padded rows (w4_gemm's output at M % 16 != 0) the launch computes
    every element and keeps the layout."""
    script = tmp_path / "padded.py"
    script.write_text(
        "import torch\n"
        "from duquant_runtime.kernels.hidden import hidden_launch\n"
        "from duquant_runtime.mlp_activation import hidden\n"
        "g = torch.Generator().manual_seed(0)\n"
        "gate = (torch.randn(64, 16, generator=g) * 3).bfloat16().t()[:11]\n"
        "up = torch.randn(64, 16, generator=g).bfloat16().t()[:11]\n"
        "out = hidden_launch(gate, up, 'gelu_tanh')\n"
        "ref = hidden(gate, up, 'gelu_tanh')\n"
        "far = ((out.float() - ref.float()).abs() > 2.0 ** -7 * ref.float().abs() + 1e-6).sum()\n"
        "print('RESULT', tuple(out.stride()), int(far), int((out != ref).sum()))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    fields = res.stdout.split("RESULT")[1].split()
    assert fields[0] == "(1," and fields[1] == "16)", fields  # the padded layout kept
    assert int(fields[2]) == 0 and int(fields[3]) <= 704 // 16, fields  # interpreter formulas: a few roundings apart
