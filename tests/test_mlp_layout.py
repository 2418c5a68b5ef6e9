"""duquant_runtime.mlp_layout: which MLP producers write token-minor outputs, and the torch layout
rule the design relies on (elementwise ops keep a token-minor layout)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duquant_runtime import DuQuantLinear, apply_pack
from duquant_runtime.mlp_layout import clear_token_minor, mark_token_minor

from _util import share_inputs_pack

D, F = 128, 256


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, F, bias=False), nn.Linear(D, F, bias=False)
        self.down_proj = nn.Linear(F, D, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class PlainMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, F), nn.Linear(F, D)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.layers = nn.ModuleList([nn.Module(), nn.Module()])
    for blk in m.layers:
        blk.mlp, blk.vision_mlp = GatedMLP(), PlainMLP()
        blk.o_proj = nn.Linear(D, D, bias=False)
    return m


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return share_inputs_pack(tmp_path_factory.mktemp("mlp"), _model(), r"layers\.\d+\.")


def test_apply_marks_the_producers_of_replaced_consumers(pack):
    m = _model()
    report = apply_pack(m, pack, act_mode="dynamic")
    want = sorted(f"layers.{i}.{n}" for i in range(2) for n in ("mlp.gate_proj", "mlp.up_proj", "vision_mlp.fc1"))
    assert report.token_minor == want
    flagged = sorted(n for n, mod in m.named_modules() if isinstance(mod, DuQuantLinear) and mod.token_minor_output)
    assert flagged == want  # o_proj and the consumers are not marked
    clear_token_minor(m)
    assert not any(getattr(mod, "token_minor_output", False) for mod in m.modules())
    assert apply_pack(_model(), pack, act_mode="dynamic", token_minor_mlp=False).token_minor == []


def test_unreplaced_or_mismatched_consumers_mark_nothing(pack):
    m = _model()
    apply_pack(m, pack, act_mode="dynamic", strict=False,
               name_map=lambda n: None if n.endswith("down_proj") or n.endswith("fc2") else n)
    assert isinstance(m.layers[0].mlp.gate_proj, DuQuantLinear) and not isinstance(m.layers[0].mlp.down_proj,
                                                                                    DuQuantLinear)
    clear_token_minor(m)
    assert mark_token_minor(m) == []  # an nn.Linear consumer: nothing to gain, nothing marked
    m = _model()
    apply_pack(m, pack, act_mode="dynamic", strict=False, name_map=lambda n: None if n.endswith("up_proj") else n)
    clear_token_minor(m)
    # gate replaced, up not: a token-minor gate times a row-major up would mix layouts
    assert mark_token_minor(m) == [f"layers.{i}.vision_mlp.fc1" for i in range(2)]


def test_cpu_outputs_ignore_the_flag(pack):
    m = _model()
    apply_pack(m, pack, act_mode="dynamic")
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        h = m.layers[0].mlp.gate_proj(x)
        on = m.layers[0].mlp(x)
        clear_token_minor(m)
        off = m.layers[0].mlp(x)
    assert h.stride(-1) == 1 and torch.equal(on, off)  # row-major (a column slice of the linked output)


def test_elementwise_ops_keep_a_token_minor_layout():
    """What lets down_proj receive a token-minor input: gelu(gate) * up of token-minor views (two
    column slices of one (2F, M) tensor, viewed as (B, T, F)) is token-minor too, and reshapes
    back to (M, F) without a copy."""
    b, t = 2, 25
    y = torch.randn(2 * F, b * t).t()  # (M, 2F), strides (1, M)
    gate, up = (y[:, :F].reshape(b, t, F), y[:, F:].reshape(b, t, F))
    assert gate.stride() == (t, 1, b * t)
    h = nn.functional.gelu(gate, approximate="tanh") * up
    assert h.stride() == (t, 1, b * t)
    h2 = h.reshape(-1, F)
    assert h2.stride() == (1, b * t) and h2.data_ptr() == h.data_ptr()
