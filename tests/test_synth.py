"""duquant_pack.synth: synthetic pi0 / pi0.5 checkpoints with the real key names."""

import re

import pytest
import torch
from safetensors import safe_open

from duquant_pack.errors import ConfigError
from duquant_pack.synth import _produce, arch_table, synth_specs, write_synth


def test_arch_tables_have_the_documented_layers():
    for arch in ("pi05", "pi0"):
        table = dict(arch_table(arch))
        llm = [k for k in table if re.search(r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", k)]
        expert = [k for k in table if re.search(r"gemma_expert\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", k)]
        assert len(llm) == 126 and len(expert) == 126
        p = "paligemma_with_expert.paligemma.model.language_model.layers.0."
        assert table[p + "mlp.down_proj.weight"] == (2048, 16384)
        assert table[p + "self_attn.k_proj.weight"] == (256, 2048)
        e = "paligemma_with_expert.gemma_expert.model.layers.17."
        assert table[e + "self_attn.q_proj.weight"] == (2048, 1024)
        assert table[e + "mlp.down_proj.weight"] == (1024, 4096)


def test_specs_scale_widths_and_keep_layers():
    full = dict(synth_specs("pi05"))
    assert not any(k.endswith("language_model.embed_tokens.weight") for k in full)
    small = dict(synth_specs("pi05", layers=2, width_div=8))
    key = "paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.down_proj.weight"
    assert full[key] == (2048, 16384) and small[key] == (256, 2048)
    assert not any(".layers.2." in k for k in small)
    assert any(".vision_model.encoder.layers.1." in k for k in small)
    # sizes not listed as widths stay (the 3 colour channels, 14x14 patches)
    patch = "paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert small[patch] == (144, 3, 14, 14)


def test_specs_include_filter():
    specs = synth_specs("pi05", 1, 8, include=r"gemma_expert\.model\.layers\.\d+\.mlp\.")
    assert len(specs) == 3 and all(".mlp." in k for k, _ in specs)
    with pytest.raises(ConfigError, match="keeps no tensor"):
        synth_specs("pi05", 1, 8, include="no_such_key")
    with pytest.raises(ConfigError, match="invalid regular expression"):
        synth_specs("pi05", 1, 8, include="(")


@pytest.mark.parametrize("kw,match", [({"width_div": 3}, "width-div"), ({"layers": 0}, "--layers")])
def test_bad_spec_arguments(kw, match):
    with pytest.raises(ConfigError, match=match):
        synth_specs("pi05", **kw)


def test_unknown_arch_and_dtype(tmp_path):
    with pytest.raises(ConfigError, match="unknown arch"):
        synth_specs("pi1")
    with pytest.raises(ConfigError, match="--dtype"):
        write_synth(tmp_path, "pi05", 1, 8, dtype="int8")
    assert not (tmp_path / "model.safetensors").exists()


def test_written_checkpoint_matches_specs(synth2):
    path = synth2 / "model.safetensors"
    specs = synth_specs("pi05", 2, 8)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {k for k, _ in specs} and len(specs) == len(list(f.keys()))
        meta = f.metadata()
        assert meta["duquant_synth"].startswith("arch=pi05 layers=2 width_div=8 seed=0")
        for key, shape in specs[:: max(1, len(specs) // 40)]:
            t = f.get_tensor(key)
            assert tuple(t.shape) == shape and t.dtype == torch.bfloat16
            assert bool(torch.isfinite(t.float()).all())


def test_outliers_as_documented(synth2):
    with safe_open(str(synth2 / "model.safetensors"), framework="pt") as f:
        p = "paligemma_with_expert.paligemma.model.language_model.layers.0."
        # about 0.5% of the input columns (at least 2) of down_proj / o_proj scaled 10-50x; none elsewhere
        for name, n_outliers in (("mlp.down_proj", 2048 // 200), ("self_attn.o_proj", 2), ("mlp.gate_proj", 0),
                                 ("self_attn.q_proj", 0)):
            w = f.get_tensor(p + name + ".weight").float()
            energy = w.pow(2).mean(dim=0)
            assert int((energy > 20 * energy.median()).sum()) == n_outliers, name
        down = f.get_tensor(p + "mlp.down_proj.weight").float()
        gate = f.get_tensor(p + "mlp.gate_proj.weight").float()
        assert 0.01 < float(gate.std()) < 0.04  # Student-t, std 0.02
        assert float(down.abs().max()) > 10 * float(gate.abs().max()) / 2
        norm = f.get_tensor(p + "input_layernorm.weight").float()
        assert float(norm.median()) == pytest.approx(1.0, abs=0.1) and float(norm.max()) >= 20
        dense = f.get_tensor("paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight")
        assert float(dense.float().abs().max()) > 0  # adaRMS dense layers are not left at zero


def test_values_deterministic_per_seed_and_key():
    produce0, produce1 = _produce(0), _produce(1)
    key, shape = "x.layers.0.mlp.down_proj.weight", (16, 40)
    a = torch.cat(list(produce0(key, shape)))
    b = torch.cat(list(_produce(0)(key, shape)))
    c = torch.cat(list(produce1(key, shape)))
    d = torch.cat(list(produce0("x.layers.1.mlp.down_proj.weight", shape)))
    assert a.shape == shape and torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_same_arguments_same_bytes(tmp_path, synth2):
    path = write_synth(tmp_path / "again", "pi05", layers=2, width_div=8)
    assert path.read_bytes() == (synth2 / "model.safetensors").read_bytes()
    assert not list((tmp_path / "again").glob(".*tmp*"))  # no temporary left behind


def test_pi0_and_dtype(tmp_path):
    path = write_synth(tmp_path, "pi0", layers=1, width_div=8, seed=3, dtype="fp32")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert keys == {k for k, _ in synth_specs("pi0", 1, 8)}
        t = f.get_tensor("paligemma_with_expert.gemma_expert.model.layers.0.mlp.up_proj.weight")
        assert t.dtype == torch.float32
