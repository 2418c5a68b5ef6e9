"""duquant_pack.selection: which checkpoint tensors become layers (presets, scope, include/exclude, whitelist)."""

import re

import pytest
import torch

from duquant_pack.checkpoint import Checkpoint
from duquant_pack.config import resolve
from duquant_pack.errors import ConfigError
from duquant_pack.selection import select_layers
from duquant_pack.synth import synth_specs

from _util import save_ckpt

COUNTS = {"llm": 126, "llm-expert-mlp": 180, "llm-expert": 252}
COUNTS_2_LAYERS = {"llm": 14, "llm-expert-mlp": 20, "llm-expert": 28}


def _names_ckpt(directory, arch, prefix=""):
    """A checkpoint with every key name of the full architecture and tiny tensors of the same rank."""
    tensors = {}
    for key, shape in synth_specs(arch):
        tensors[prefix + key] = torch.zeros((3, 2) if len(shape) == 2 else (1,) * len(shape),
                                            dtype=torch.bfloat16)
    return save_ckpt(directory, tensors)


@pytest.fixture(scope="module")
def names_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    return {(arch, prefix): Checkpoint(_names_ckpt(root / f"{arch}{prefix or '-'}", arch, prefix))
            for arch in ("pi05", "pi0") for prefix in ("", "model.")}


@pytest.mark.parametrize("arch", ["pi05", "pi0"])
@pytest.mark.parametrize("which", list(COUNTS))
@pytest.mark.parametrize("prefix", ["", "model."])
def test_presets_select_exact_counts_on_full_key_tables(names_ckpts, arch, which, prefix):
    preset = f"{arch}-{which}"
    cfg, data = resolve(preset)
    chosen = select_layers(names_ckpts[(arch, prefix)], cfg)
    assert len(chosen) == COUNTS[which] == data["expected_layers"]
    names = [s.name for s in chosen]
    assert all(n.startswith(prefix + "paligemma_with_expert.") for n in names)
    assert all(re.search(r"\.(q|k|v|o|gate|up|down)_proj$", n) for n in names)
    llm = [n for n in names if ".language_model.layers." in n]
    expert = [n for n in names if ".gemma_expert.model.layers." in n]
    assert len(llm) == 126 and len(llm) + len(expert) == len(names)
    if which == "llm-expert-mlp":
        assert all(".mlp." in n for n in expert)
    # nothing of the vision tower, projector, adaRMS dense layers or heads
    assert not any(t in n for n in names for t in ("vision", "projector", "dense", "lm_head", "action_"))


def test_llm_expert_weight_count_matches_the_documented_total():
    cfg, _ = resolve("pi05-llm-expert")
    inc = re.compile(cfg.include)
    total = sum(s[0] * s[1] for k, s in synth_specs("pi05") if k.endswith(".weight") and inc.search(k[:-7]))
    assert total == 2_293_235_712  # docs: 252 linears, 2,293,235,712 weights


@pytest.mark.parametrize("which", list(COUNTS_2_LAYERS))
def test_presets_on_two_layer_synthetic_checkpoint(synth2, which):
    cfg, _ = resolve(f"pi05-{which}")
    chosen = select_layers(Checkpoint(synth2), cfg)
    assert len(chosen) == COUNTS_2_LAYERS[which]
    q = next(s for s in chosen if s.name.endswith("language_model.layers.0.self_attn.q_proj"))
    assert (q.out_features, q.in_features, q.dtype, q.wbits) == (256, 256, "BF16", 4)


def test_options_override_preset(synth2):
    ck = Checkpoint(synth2)
    cfg, _ = resolve("pi05-llm-expert", include=r"\.q_proj$")
    assert len(select_layers(ck, cfg)) == 6  # 2 vision + 2 LLM + 2 expert layers: include replaced
    cfg, _ = resolve("pi05-llm-expert", scope="paligemma_with_expert.gemma_expert.")
    assert len(select_layers(ck, cfg)) == 14
    cfg, _ = resolve("pi05-llm-expert", exclude=r"mlp")
    assert len(select_layers(ck, cfg)) == 16
    name = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.down_proj"
    cfg, _ = resolve("pi05-llm", layers=(name,), layer_wbits={name: 8})
    chosen = select_layers(ck, cfg)
    assert [(s.name, s.wbits) for s in chosen] == [(name, 8)]


def test_natural_order_and_old_default_selection(tmp_path):
    t = {f"m.layers.{i}.mlp.down_proj.weight": torch.ones(4, 3) for i in (10, 2, 1)}
    t["m.layers.1.norm.q_proj.weight"] = torch.ones(4, 3)  # q_proj, but a 'norm' name component: excluded
    t["m.emb.fc1.weight"] = torch.ones(4, 3)  # an 'emb' component: excluded
    t["m.embed.fc1.weight"] = torch.ones(4, 3)  # 'embed' is not the component 'emb': kept (old semantics)
    t["m.layers.1.input_layernorm.q_proj.weight"] = torch.ones(4, 3)  # 'input_layernorm' != 'layernorm': kept
    t["m.layers.1.mlp.down_proj.bias"] = torch.ones(4)
    ck = Checkpoint(save_ckpt(tmp_path, t))
    cfg, _ = resolve()
    names = [s.name for s in select_layers(ck, cfg)]
    assert names == ["m.embed.fc1", "m.layers.1.input_layernorm.q_proj", "m.layers.1.mlp.down_proj",
                     "m.layers.2.mlp.down_proj", "m.layers.10.mlp.down_proj"]


def test_empty_exclude_excludes_nothing(tmp_path):
    ck = Checkpoint(save_ckpt(tmp_path, {"a.norm.q_proj.weight": torch.ones(2, 2), "b.q_proj.weight": torch.ones(2, 2)}))
    assert len(select_layers(ck, resolve()[0])) == 1
    assert len(select_layers(ck, resolve(exclude="")[0])) == 2


def test_selection_errors(tmp_path):
    t = {"x.q_proj.weight": torch.ones(4, 4), "x.conv_proj.weight": torch.ones(2, 2, 3),
         "x.int_proj.weight": torch.ones(3, 3, dtype=torch.int32), "x.norm.weight": torch.ones(4)}
    ck = Checkpoint(save_ckpt(tmp_path, t))
    with pytest.raises(ConfigError, match="no layer matches --include"):
        select_layers(ck, resolve(include="nothing_here")[0])
    with pytest.raises(ConfigError, match="--scope 'y.'"):
        select_layers(ck, resolve(scope="y.")[0])
    with pytest.raises(ConfigError, match=r"--layers: no layer 'x\.k_proj'"):
        select_layers(ck, resolve(layers=("x.k_proj",))[0])
    with pytest.raises(ConfigError, match="--layer-wbits: 'x.v_proj' is not a selected layer"):
        select_layers(ck, resolve(include="q_proj", layer_wbits={"x.v_proj": 8})[0])
    with pytest.raises(ConfigError, match="not a 2-D linear weight"):
        select_layers(ck, resolve(include="conv_proj")[0])
    with pytest.raises(ConfigError, match="dtype I32"):
        select_layers(ck, resolve(include="int_proj")[0])
    assert [s.name for s in select_layers(ck, resolve(include="q_proj")[0])] == ["x.q_proj"]


def test_nearest_name_hint_for_misspelt_include(synth2):
    with pytest.raises(ConfigError, match="q_proj"):
        select_layers(Checkpoint(synth2), resolve(include=r"\.q_prjo$")[0])
