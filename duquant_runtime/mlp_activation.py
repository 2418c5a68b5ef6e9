"""The MLP activation computed inside down_proj's GPU kernels instead of by torch.

A gated MLP runs ``down_proj(act(gate_proj(x)) * up_proj(x))`` (a plain one ``fc2(act(fc1(x)))``).
Between our GEMMs torch runs the activation and the product as two elementwise launches that read
and write the whole hidden activation (at 50 tokens of the pi0.5 action expert 1.3 us each on an
H200, 3.4 us of the block in a CUDA graph, against ~8 us for a whole bf16 down_proj).
`fuse_mlp_activations` patches such an MLP module's forward to
``down_proj.forward_product(gate_proj(x), up_proj(x), act)``: on the GPU kernel path down_proj's
prep launch computes act(gate) * up from the loaded tiles (kernels/hidden.py, the values torch
computes); elsewhere `forward_product` computes the hidden with torch (`hidden`) and runs
down_proj as before, so the output is the module's own.

An MLP is patched only when its forward provably computes that function: with the three layers
swapped for cheap stand-ins (`_Probe`) whose outputs are known, its forward must pass exactly
act(gate) * up to the consumer, for one of `ACTIVATIONS`, and return the consumer's output
unchanged, in float32 and in the layers' dtype, in eval and in training mode (bit for bit).
Anything else (another activation, a norm, dropout, extra arguments) leaves the module as it is.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from .linear import DuQuantLinear
from .mlp_layout import MLP_CONSUMERS

# the activations the kernels compute bit for bit as torch does (kernels/hidden.py)
ACTIVATIONS = {
    "gelu_tanh": lambda t: nn.functional.gelu(t, approximate="tanh"),
    "silu": nn.functional.silu,
}


def hidden(gate: torch.Tensor, up: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(gate) * up (up None: act(gate)) by torch: the reference of the fused kernels."""
    h = ACTIVATIONS[act](gate)
    return h if up is None else h * up


class _Probe(nn.Module):
    """Stand-in for a linear layer (in_features -> out_features): y = x[..., idx] * w + c with fixed
    pseudo-random idx, w, c per seed (cheap; outputs cover the activations' interesting range).
    Keeps its last input."""

    def __init__(self, in_features: int, out_features: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.in_features, self.out_features = in_features, out_features
        self.idx = torch.randint(0, in_features, (out_features,), generator=g)
        self.w = torch.rand(out_features, generator=g) * 2.0 + 0.25
        self.c = torch.randn(out_features, generator=g)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x[..., self.idx] * self.w.to(x.dtype) + self.c.to(x.dtype)


def _single_argument(module: nn.Module) -> bool:
    """Whether module.forward takes exactly one argument (the patched forward's signature)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def probe_activation(parent: nn.Module, consumer: str, producers: tuple, dtype: torch.dtype) -> str | None:
    """The name in `ACTIVATIONS` for which `parent`'s forward computes consumer(act(p0(x)) * p1(x))
    (or consumer(act(p0(x))) with one producer), checked bit for bit with `_Probe` stand-ins on
    the CPU in float32 and in `dtype`, in eval and in training mode (the modules' modes are
    restored); None when it computes something else (or fails)."""
    c = getattr(parent, consumer)
    width = getattr(parent, producers[0]).in_features
    stand_ins = {consumer: _Probe(c.in_features, c.out_features, 1)}
    for i, p in enumerate(producers):
        stand_ins[p] = _Probe(width, c.in_features, 2 + i)
    saved = {name: parent._modules[name] for name in stand_ins}
    modes = {m: m.training for m in parent.modules()}
    found = None
    try:
        parent._modules.update(stand_ins)
        for training, dt in ((False, torch.float32), (True, torch.float32), (False, dtype), (True, dtype)):
            parent.train(training)  # the same function in both modes (dropout, for one, differs)
            x = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).mul(3.0).to(dt)
            with torch.no_grad():
                out = parent(x)
                ins = [stand_ins[p](x) for p in producers]
                seen = stand_ins[consumer].seen
                expected_out = stand_ins[consumer](seen) if seen is not None else None
            if seen is None or not torch.equal(out, expected_out):
                return None
            match = [a for a in ACTIVATIONS
                     if torch.equal(seen, hidden(ins[0], ins[1] if len(ins) > 1 else None, a))]
            if not match or (found is not None and found not in match):
                return None
            found = found if found is not None else match[0]
    except Exception:  # the forward needs more than the three layers (devices, attributes, arguments)
        return None
    finally:
        parent._modules.update(saved)
        for m, training in modes.items():
            m.training = training
    return found


def _fused_forward(self, x):
    """The patched MLP forward (bound to the module by `fuse_mlp_activations`)."""
    consumer, producers, act = self._duquant_mlp_activation
    ins = [getattr(self, p)(x) for p in producers]
    return getattr(self, consumer).forward_product(ins[0], ins[1] if len(ins) > 1 else None, act)


def fuse_mlp_activations(model: nn.Module) -> dict[str, str]:
    """Patch the forward of every MLP module of `model` whose consumer (down_proj, w2, fc2) and
    producers (gate_proj/up_proj, w1/w3, fc1) are all `DuQuantLinear` and whose forward computes
    consumer(act(gate) * up) (`probe_activation`), so that the GPU kernels compute the hidden
    activation themselves. Returns {module name: activation name} of the patched modules."""
    fused = {}
    for name, parent in model.named_modules():
        if "_duquant_mlp_activation" in parent.__dict__ or not _single_argument(parent):
            continue
        for consumer, producers in MLP_CONSUMERS.items():
            c = getattr(parent, consumer, None)
            if not isinstance(c, DuQuantLinear):
                continue
            prods = [getattr(parent, p, None) for p in producers]
            if not all(isinstance(p, DuQuantLinear) and p.out_features == c.in_features
                       and p.in_features == prods[0].in_features for p in prods):
                continue
            act = probe_activation(parent, consumer, producers, c._weight_dtype)
            if act is None:
                continue
            parent._duquant_mlp_activation = (consumer, producers, act)
            parent.forward = types.MethodType(_fused_forward, parent)
            fused[name] = act
            break
    return fused


def unfuse_mlp_activations(model: nn.Module) -> None:
    """Undo `fuse_mlp_activations`: the modules run their own forward again."""
    for m in model.modules():
        if "_duquant_mlp_activation" in m.__dict__:
            del m.__dict__["_duquant_mlp_activation"]
            m.__dict__.pop("forward", None)


__all__ = ["ACTIVATIONS", "hidden", "probe_activation", "fuse_mlp_activations", "unfuse_mlp_activations"]
