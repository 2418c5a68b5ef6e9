"""Token-minor MLP hidden activations: gate/up write what down_proj's kernels read without a transpose.

In a gated MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``, the hidden activation h (M, I) is
only ever consumed by down_proj, through elementwise ops. The fused GPU kernels of a large-M
down_proj read x^T (I, M) (kernels/w4a8.py: the permuted channels as contiguous runs of tokens),
so with a row-major h they first transpose it: one launch that reads and writes all of h (26 MB
for the pi0.5 language model's down_proj at M = 800). At M = 50 they gather h's permuted
channels element by element instead; from x^T they read runs of tokens.

A producer layer marked here (``DuQuantLinear.token_minor_output``) writes its output on the GPU
kernel path, from M > 16 tokens (`kernels.w4a8.token_minor_pays`), as the transpose of a contiguous (out, M) tensor: the same values with strides
(1, M); above 256 tokens each row of M tokens is padded to a multiple of 16 (strides (1, s),
`kernels.w4a8.token_minor_row`: whole vector stores). Elementwise ops keep the token-minor layout
(torch allocates their results like their inputs, dense), so down_proj receives x = h with strides
(1, M) and its prep reads that x^T directly (the fused activation, mlp_activation.py, reads gate
and up as they are). Values are
unchanged, bit for bit; only strides differ, and every torch op accepts them (``.view`` of the
token dimensions included). The float reference path and the CPU ignore the flag.

Marked: replaced producers (gate_proj/up_proj, w1/w3, fc1) whose consumer in the same parent
module (down_proj, w2, fc2) is a replaced `DuQuantLinear` reading their width, when every
producer of that consumer present in the parent is replaced (a row-major sibling would make the
elementwise op mix layouts).
"""

from __future__ import annotations

from torch import nn

from .linear import DuQuantLinear

# consumer attribute -> the producer attributes of one gated (or plain) MLP
MLP_CONSUMERS = {"down_proj": ("gate_proj", "up_proj"), "w2": ("w1", "w3"), "fc2": ("fc1",)}


def mark_token_minor(model: nn.Module) -> list[str]:
    """Set ``token_minor_output`` on the MLP producers of `model` whose consumer is a
    `DuQuantLinear` (see the module docstring); returns the marked module names, sorted."""
    marked = []
    for parent_name, parent in model.named_modules():
        for consumer, producers in MLP_CONSUMERS.items():
            c = getattr(parent, consumer, None)
            present = [(p, getattr(parent, p)) for p in producers if isinstance(getattr(parent, p, None), nn.Module)]
            if not isinstance(c, DuQuantLinear) or not present:
                continue
            if not all(isinstance(m, DuQuantLinear) and m.out_features == c.in_features for _, m in present):
                continue
            for attr, m in present:
                m.token_minor_output = True
                marked.append(f"{parent_name}.{attr}" if parent_name else attr)
    return sorted(marked)


def clear_token_minor(model: nn.Module) -> None:
    """Every `DuQuantLinear` of `model` writes row-major outputs again."""
    for m in model.modules():
        if isinstance(m, DuQuantLinear):
            m.token_minor_output = False


__all__ = ["MLP_CONSUMERS", "mark_token_minor", "clear_token_minor"]
