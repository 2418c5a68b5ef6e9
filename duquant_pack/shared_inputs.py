"""Which selected layers share one input transform (`--share-inputs`).

Sibling layers that read the same activation (attention q/k/v, the MLP's gate/up) can use one
permutation, one set of input rotations and one smoothing vector, computed from their weights
stacked row-wise. The GPU runtime then transforms and quantizes the activation once per group and
runs the group's GEMMs as one (duquant_runtime/input_group.py). Each member keeps its own file,
weight scales, output rotations and integers, so a reader that ignores the grouping still gets a
correct layer.

A group is formed from the selected siblings (same parent module) whose last name component is in
one of `SIBLING_SETS`, when at least two are selected and all have the same settings
(`LayerSpec`) and input width.
"""

from __future__ import annotations

from .config import BuildConfig
from .selection import SelectedLayer

# leaf names of layers that read one activation (Gemma/Llama, and BERT-style attention)
SIBLING_SETS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                              ("query", "key", "value"))


def input_groups(selected: list[SelectedLayer], cfg: BuildConfig) -> list[list[SelectedLayer]]:
    """The groups of `selected` that share an input transform (members in `SIBLING_SETS` order);
    empty unless cfg.share_inputs. Layers in no group are not listed."""
    if not cfg.share_inputs:
        return []
    by_parent: dict[str, dict[str, SelectedLayer]] = {}
    for s in selected:
        parent, _, leaf = s.name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = s
    groups = []
    for _, leaves in sorted(by_parent.items()):
        for names in SIBLING_SETS:
            members = [leaves[n] for n in names if n in leaves]
            if len(members) < 2:
                continue
            specs = {cfg.layer_spec(m.name) for m in members}
            if len(specs) == 1 and len({m.in_features for m in members}) == 1:
                groups.append(members)
    return groups


__all__ = ["SIBLING_SETS", "input_groups"]
