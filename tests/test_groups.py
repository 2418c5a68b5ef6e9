"""duquant_pack.groups: layer groups by name and Frobenius-weighted error summaries."""

import math

import pytest

from duquant_pack.groups import group_summary, layer_group


@pytest.mark.parametrize("name,group", [
    ("paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1", "vision"),
    ("paligemma_with_expert.paligemma.model.multi_modal_projector.linear", "vision"),
    ("paligemma_with_expert.paligemma.model.language_model.layers.3.mlp.down_proj", "language_model"),
    ("model.paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_proj", "action_expert"),
    ("action_out_proj", "other"),
])
def test_layer_group(name, group):
    assert layer_group(name) == group


def _entry(name, out_f, in_f, w_fro=None, w_err=None, rtn=None):
    stats = {} if w_fro is None else {"w_fro": w_fro, "w_rel_err": w_err, "rtn_rel_err": rtn}
    return {"name": name, "in_features": in_f, "out_features": out_f, "stats": stats}


def test_group_summary_is_frobenius_weighted():
    entries = [_entry("a.language_model.x", 2, 3, 3.0, 0.1, 0.3),
               _entry("b.language_model.y", 4, 5, 4.0, 0.2, 0.4),
               _entry("c.gemma_expert.z", 1, 1),  # not quantized: no stats
               _entry("other", 2, 2, 1.0, 0.5, 0.5)]
    s = group_summary(entries)
    assert list(s) == ["language_model", "action_expert", "other"]  # GROUPS order
    lm = s["language_model"]
    assert (lm["layers"], lm["weights"]) == (2, 26)
    assert lm["w_rel_err"] == pytest.approx(math.sqrt((9 * 0.01 + 16 * 0.04) / 25))
    assert lm["rtn_rel_err"] == pytest.approx(math.sqrt((9 * 0.09 + 16 * 0.16) / 25))
    assert s["action_expert"] == {"layers": 1, "weights": 1, "w_rel_err": None, "rtn_rel_err": None}
    assert s["other"]["w_rel_err"] == pytest.approx(0.5)


def test_group_summary_of_built_pack(built_pack):
    from duquant_runtime import load_pack
    s = group_summary(load_pack(built_pack).manifest["layers"])
    assert set(s) == {"language_model", "action_expert"}
    assert s["language_model"]["layers"] == s["action_expert"]["layers"] == 14
    for g in s.values():
        assert 0 < g["w_rel_err"] < g["rtn_rel_err"]
