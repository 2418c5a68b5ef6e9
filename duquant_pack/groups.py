"""Layer groups by name (vision / language model / action expert / other) and their error summaries."""

from __future__ import annotations

import math

GROUPS = ("vision", "language_model", "action_expert", "other")


def layer_group(name: str) -> str:
    """The model part a layer belongs to, from its name (pi0 / pi0.5 / PaliGemma naming)."""
    if "vision_tower" in name or "vision_model" in name or "multi_modal_projector" in name:
        return "vision"
    if "gemma_expert" in name:
        return "action_expert"
    if "language_model" in name:
        return "language_model"
    return "other"


def group_summary(entries: list[dict]) -> dict[str, dict]:
    """Per group: layer count, weights, and the Frobenius-weighted relative weight error of the
    pack's W quantization (`w_rel_err`) and of plain round-to-nearest (`rtn_rel_err`):
    sqrt(sum_i err_i^2 / sum_i |W_i|^2)."""
    acc: dict[str, dict] = {}
    for e in entries:
        g = acc.setdefault(layer_group(e["name"]), {"layers": 0, "weights": 0, "_n2": 0.0, "_w": 0.0, "_r": 0.0})
        g["layers"] += 1
        g["weights"] += e["in_features"] * e["out_features"]
        st = e.get("stats") or {}
        if "w_fro" in st:
            n2 = st["w_fro"] ** 2
            g["_n2"] += n2
            g["_w"] += n2 * st["w_rel_err"] ** 2
            g["_r"] += n2 * st["rtn_rel_err"] ** 2
    out = {}
    for name in GROUPS:
        if name not in acc:
            continue
        g = acc[name]
        q = g["_n2"] > 0
        out[name] = {"layers": g["layers"], "weights": g["weights"],
                     "w_rel_err": math.sqrt(g["_w"] / g["_n2"]) if q else None,
                     "rtn_rel_err": math.sqrt(g["_r"] / g["_n2"]) if q else None}
    return out
