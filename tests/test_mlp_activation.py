"""duquant_runtime.mlp_activation: which MLP modules get the fused activation (only those whose
forward provably computes down(act(gate(x)) * up(x))), and that fusing never changes a CPU output.
The GPU kernels' side is tests/test_hidden.py (values) and tests/test_linear_gpu.py (blocks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from duquant_runtime import DuQuantLinear, apply_pack, fuse_mlp_activations, unfuse_mlp_activations
from duquant_runtime.mlp_activation import hidden, probe_activation

from _util import share_inputs_pack

D, F = 128, 256


class GemmaMLP(nn.Module):  # gelu_pytorch_tanh, as pi0.5's PaliGemma and action expert
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, F, bias=False), nn.Linear(D, F, bias=False)
        self.down_proj = nn.Linear(F, D, bias=False)
        self.act_fn = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaMLP(GemmaMLP):
    def forward(self, hidden_states):
        return self.down_proj(nn.functional.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class SiglipMLP(nn.Module):
    def __init__(self, approximate="tanh"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, F), nn.Linear(F, D)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate=self.approximate))


# forwards that compute something else: each must stay unfused
class SwappedMLP(GemmaMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


class ScaledMLP(GemmaMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 1.0001)


class NormedMLP(GemmaMLP):
    def forward(self, x):
        return nn.functional.layer_norm(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)), (D,))


class FormulaGeluMLP(GemmaMLP):  # transformers' NewGELUActivation: the tanh formula in torch ops
    def forward(self, x):
        g = self.gate_proj(x)
        a = 0.5 * g * (1.0 + torch.tanh(0.7978845608028654 * (g + 0.044715 * torch.pow(g, 3.0))))
        return self.down_proj(a * self.up_proj(x))


class TwoArgMLP(GemmaMLP):
    def forward(self, x, scale=1.0):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * scale


class WeightReadingMLP(GemmaMLP):
    def forward(self, x):
        x = x.to(self.gate_proj.weight.dtype)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DropoutMLP(GemmaMLP):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.down_proj(self.drop(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


FUSED = {"gemma": (GemmaMLP, "gelu_tanh"), "llama": (LlamaMLP, "silu"), "siglip": (SiglipMLP, "gelu_tanh")}
UNFUSED = {"swapped": SwappedMLP, "scaled": ScaledMLP, "normed": NormedMLP, "formula": FormulaGeluMLP,
           "two_args": TwoArgMLP, "weight_reading": WeightReadingMLP, "dropout": DropoutMLP,
           "erf_gelu": lambda: SiglipMLP("none")}


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    for name, (cls, _) in FUSED.items():
        setattr(m, name, cls())
    for name, cls in UNFUSED.items():
        setattr(m, name, cls())
    return m


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return share_inputs_pack(tmp_path_factory.mktemp("mlp_act"), _model(), r"(proj|fc\d)$")


def _inputs():
    return torch.randn(2, 7, D, generator=torch.Generator().manual_seed(4)).mul(2.0)


@pytest.mark.parametrize("act_mode", ["dynamic", "static"])
def test_apply_fuses_exactly_the_mlps_that_compute_the_product(pack, act_mode):
    m = _model()
    m.train()  # dropout active: the probe must see it differ
    report = apply_pack(m, pack, act_mode=act_mode)
    assert report.fused_mlps == {name: act for name, (_, act) in FUSED.items()}
    assert "3 MLP activations fused" in report.summary()
    for name in FUSED:
        assert "forward" in vars(getattr(m, name))
    for name in UNFUSED:
        assert "forward" not in vars(getattr(m, name)), name
    assert apply_pack(_model(), pack, act_mode=act_mode, fuse_mlp_activation=False).fused_mlps == {}


def test_fused_outputs_equal_the_modules_own_on_cpu(pack):
    """On the CPU `forward_product` computes the hidden with torch: the outputs are the unfused
    module's, bit for bit, on the integer path and on the float reference path."""
    m = _model().eval()
    apply_pack(m, pack, act_mode="dynamic")
    x = _inputs()
    with torch.no_grad():
        for name in FUSED:
            mlp = getattr(m, name)
            fused = mlp(x)
            ref = type(mlp).forward(mlp, x)
            assert torch.equal(fused, ref), name
            consumer = mlp.fc2 if hasattr(mlp, "fc2") else mlp.down_proj
            consumer.use_fast = False  # the float reference path
            assert torch.equal(mlp(x), type(mlp).forward(mlp, x))


def test_unfuse_restores_the_forward_and_fusing_twice_patches_once(pack):
    m = _model().eval()
    report = apply_pack(m, pack, act_mode="dynamic")
    assert fuse_mlp_activations(m) == {}  # already fused: nothing patched again
    unfuse_mlp_activations(m)
    assert not any("forward" in vars(mod) or "_duquant_mlp_activation" in vars(mod) for mod in m.modules())
    assert fuse_mlp_activations(m) == report.fused_mlps


def test_probe_leaves_the_module_as_it_was(pack):
    m = _model().eval()
    apply_pack(m, pack, act_mode="dynamic", fuse_mlp_activation=False)
    mlp = m.gemma
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    assert probe_activation(mlp, "down_proj", ("gate_proj", "up_proj"), torch.bfloat16) == "gelu_tanh"
    assert (mlp.gate_proj, mlp.up_proj, mlp.down_proj) == layers
    assert all(torch.equal(v, mlp.state_dict()[k]) for k, v in before.items())


def test_state_dict_and_deepcopy_of_a_fused_model(pack):
    m = _model().eval()
    apply_pack(m, pack, act_mode="dynamic")
    plain = _model().eval()
    apply_pack(plain, pack, act_mode="dynamic", fuse_mlp_activation=False)
    assert set(m.state_dict()) == set(plain.state_dict())  # fusing adds nothing to save or load
    clone = copy.deepcopy(m)
    assert clone.gemma.forward.__self__ is clone.gemma  # bound to the copy, not the original
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(clone.gemma(x), m.gemma(x))


def test_forward_product_runs_hooks_and_refuses_unknown_activations(pack):
    m = _model().eval()
    apply_pack(m, pack, act_mode="dynamic")
    seen = []
    h = m.gemma.down_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = _inputs()
    with torch.no_grad():
        m.gemma(x)
        want = hidden(m.gemma.gate_proj(x), m.gemma.up_proj(x), "gelu_tanh")
    h.remove()
    assert len(seen) == 1 and torch.equal(seen[0], want)  # the hook saw down_proj's input
    with pytest.raises(ValueError, match="act must be one of"):
        m.gemma.down_proj.forward_product(x, None, "relu")


def test_fused_in_either_mode_and_modes_are_kept(pack):
    """The probe runs the forward in eval and in training mode: a dropout MLP is not fused even from
    an eval-mode model (its training forward differs), the others are, and every module keeps its mode."""
    m = _model().eval()
    m.gemma.train()
    report = apply_pack(m, pack, act_mode="dynamic")
    assert "dropout" not in report.fused_mlps and "gemma" in report.fused_mlps
    assert m.gemma.training and m.gemma.act_fn.training and not m.llama.training and not m.dropout.drop.training
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(m.gemma(x), GemmaMLP.forward(m.gemma, x))


def test_layers_must_all_be_replaced(pack):
    m = _model().eval()
    apply_pack(m, pack, act_mode="dynamic", strict=False, name_map=lambda n: None if n == "gemma.up_proj" else n)
    assert isinstance(m.gemma.down_proj, DuQuantLinear) and not isinstance(m.gemma.up_proj, DuQuantLinear)
    assert "forward" not in vars(m.gemma)
