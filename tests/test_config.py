"""duquant_pack.config: defaults < preset < options, validation and normalisation."""

import pytest

from duquant_pack.config import (OLD_EXCLUDE, OLD_INCLUDE, BuildConfig, config_from_dict, config_hash_of,
                                 load_preset, normalize_bits, parse_layer_wbits, preset_names, resolve)
from duquant_pack.errors import ConfigError

PRESETS = {"pi05-llm": 126, "pi05-llm-expert-mlp": 180, "pi05-llm-expert": 252,
           "pi0-llm": 126, "pi0-llm-expert-mlp": 180, "pi0-llm-expert": 252, "pi05-llm-expert-quality": 252}


def test_defaults():
    cfg, preset = resolve()
    assert preset is None
    assert (cfg.wbits, cfg.abits, cfg.block, cfg.permute, cfg.row_rot, cfg.scale) == (4, 8, 64, "zigzag",
                                                                                     "disabled", "mse")
    assert cfg.include == OLD_INCLUDE and cfg.exclude == OLD_EXCLUDE and cfg.layers is None
    assert cfg.block_out is None  # no row rotation


@pytest.mark.parametrize("bits,expect", [(16, 0), (32, 0), (0, 0), (-1, 0), (2, 2), (4, 4), (8, 8), (15, 15)])
def test_bits_normalised(bits, expect):
    assert normalize_bits(bits, "--wbits") == expect
    cfg, _ = resolve(wbits=bits, abits=bits)
    assert cfg.wbits == expect and cfg.abits == expect


def test_one_bit_rejected_everywhere():
    for kw in ({"wbits": 1}, {"abits": 1}, {"layer_wbits": {"a.q_proj": 1}}):
        with pytest.raises(ConfigError, match="1-bit"):
            resolve(**kw)


def test_layer_wbits_normalised():
    cfg, _ = resolve(layer_wbits={"x.q_proj": 16, "x.k_proj": 8})
    assert cfg.layer_wbits == {"x.q_proj": 0, "x.k_proj": 8}
    assert cfg.layer_spec("x.q_proj").wbits == 0
    assert cfg.layer_spec("x.k_proj").wbits == 8
    assert cfg.layer_spec("x.v_proj").wbits == 4


def test_parse_layer_wbits():
    assert parse_layer_wbits("a.b:4, c:8,") == {"a.b": 4, "c": 8}
    assert parse_layer_wbits("name:with:colons:3") == {"name:with:colons": 3}
    for bad in ("a", ":4", "a:x"):
        with pytest.raises(ConfigError):
            parse_layer_wbits(bad)


def test_preset_values_and_option_override():
    cfg, preset = resolve("pi05-llm")
    assert preset["expected_layers"] == 126
    assert (cfg.block, cfg.row_rot, cfg.block_out, cfg.scope, cfg.exclude) == (64, "restore", 64, "", "")
    over, _ = resolve("pi05-llm", wbits=8, block=32, include="q_proj", exclude=None, row_rot="disabled")
    assert (over.wbits, over.block, over.include, over.row_rot, over.block_out) == (8, 32, "q_proj", "disabled", None)
    assert over.exclude == ""  # None means "not given": the preset's value stays
    assert over.abits == 8


def test_block_out_defaults_to_block_with_restore():
    assert resolve(row_rot="restore", block=32)[0].block_out == 32
    assert resolve(row_rot="restore", block=32, block_out=16)[0].block_out == 16
    assert resolve(row_rot="disabled", block_out=16)[0].block_out is None


@pytest.mark.parametrize("kw,match", [
    ({"block": 0}, "--block"), ({"block": -4}, "--block"), ({"block_out": 0, "row_rot": "restore"}, "--block-out"),
    ({"include": "q_proj("}, "--include"), ({"exclude": "[a-"}, "--exclude"),
    ({"permute": "random"}, "--permute"), ({"permute_metric": "p99"}, "--permute-metric"),
    ({"row_rot": "propagate"}, "propagate"), ({"row_rot": "yes"}, "--row-rot"), ({"scale": "l1"}, "--scale"),
    ({"act_percentile": 0}, "--act-percentile"), ({"act_percentile": 100.5}, "--act-percentile"),
    ({"calib_steps": 0}, "--calib-steps"), ({"lambda_smooth": 1.5}, "--lambda-smooth"),
    ({"layers": ()}, "--layers"), ({"colour": "red"}, "unknown option"),
])
def test_invalid_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        resolve(**kw)


def test_unknown_preset_suggests_names():
    with pytest.raises(ConfigError, match="unknown preset 'pi05-lm'.*pi05-llm"):
        resolve("pi05-lm")


def test_presets_shipped():
    assert set(preset_names()) == set(PRESETS)
    for name, n in PRESETS.items():
        p = load_preset(name)
        assert p["name"] == name and p["expected_layers"] == n
        cfg, _ = resolve(name)
        assert (cfg.wbits, cfg.abits, cfg.block, cfg.permute, cfg.row_rot) == (4, 8, 64, "zigzag", "restore")


def test_to_dict_roundtrip_and_hash():
    cfg, _ = resolve("pi05-llm-expert", layer_wbits={"b": 8, "a": 3})
    d = cfg.to_dict()
    assert list(d["layer_wbits"]) == ["a", "b"]
    assert config_from_dict(d) == cfg
    assert config_hash_of(cfg).startswith("sha256:")
    assert config_hash_of(cfg) == config_hash_of(resolve("pi05-llm-expert", layer_wbits={"a": 3, "b": 8})[0])
    assert config_hash_of(cfg) != config_hash_of(resolve("pi05-llm-expert", abits=4)[0])
    with pytest.raises(ConfigError):
        config_from_dict(dict(d, extra=1))


def test_layers_whitelist_becomes_tuple():
    cfg, _ = resolve(layers=["a", "b"])
    assert cfg.layers == ("a", "b")
    assert cfg.to_dict()["layers"] == ["a", "b"]


def test_resolve_is_idempotent():
    cfg, _ = resolve("pi0-llm", wbits=16)
    from duquant_pack.config import validate
    assert validate(cfg) == cfg
    assert isinstance(cfg, BuildConfig)
