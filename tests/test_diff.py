"""duquant_pack.diff (diff_packs / format_diff) and duquant_pack.quality.layer_error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from duquant_pack.build import build_pack
from duquant_pack.checkpoint import Checkpoint
from duquant_pack.config import resolve
from duquant_pack.diff import canonical_signs, diff_packs, format_diff
from duquant_pack.quality import layer_error
from duquant_runtime.pack import load_pack

from _util import random_orthogonal_blocks

PRESET = "pi05-llm-expert"


def _build(ckpt, out, **overrides):
    cfg, _ = resolve(PRESET, **overrides)
    build_pack(ckpt, out, cfg, preset=PRESET, jobs=1, progress=False)
    return out


@pytest.fixture(scope="module")
def pack_b32(synth2, tmp_path_factory):
    return _build(synth2, tmp_path_factory.mktemp("diff") / "b32", block=32)


@pytest.fixture(scope="module")
def pack_noperm(synth2, tmp_path_factory):
    return _build(synth2, tmp_path_factory.mktemp("diff") / "noperm", permute="none")


def test_diff_with_itself(built_pack):
    d = diff_packs(built_pack, built_pack)
    json.dumps(d)  # JSON-ready
    assert d["config_diff"] == {}
    assert d["only_in_a"] == [] and d["only_in_b"] == []
    assert len(d["layers"]) == 28
    for r in d["layers"]:
        assert r["identical"]
        assert r["perm"]["status"] == "identical" and r["perm"]["frac_differ"] == 0.0
        assert r["r_in"]["status"] == "identical" and r["r_in"]["max_abs_diff"] == 0.0
        assert r["scale_rel_change"] == 0.0
    assert d["summary"]["identical"] == 28
    # without --ckpt the manifests' recorded errors are compared: all ties
    assert d["errors_source"] == "manifest"
    assert d["summary"]["b_wins"] == 0 and d["summary"]["ties"] == 28
    text = format_diff(d)
    assert text.startswith("VERDICT: B better than A on 0/28 layers")
    assert "config: identical" in text and "most-changed" not in text


def test_diff_block64_vs_block32_with_ckpt(built_pack, pack_b32, synth2):
    d = diff_packs(built_pack, pack_b32, ckpt=synth2)
    json.dumps(d)
    assert d["config_diff"]["block"] == [64, 32]
    assert d["errors_source"] == "checkpoint"
    assert len(d["layers"]) == 28
    pa, pb = load_pack(built_pack), load_pack(pack_b32)
    for r in d["layers"]:
        assert r["r_in"]["status"] == "different block sizes"
        assert (r["r_in"]["block_a"], r["r_in"]["block_b"]) == (64, 32)
        assert r["r_in"]["max_abs_diff"] is None
        e = r["errors"]
        # both errors present, recomputed from the weights = the builds' recorded stats
        assert e["a"] == pytest.approx(pa.entry(r["name"])["stats"]["w_rel_err"], rel=1e-5)
        assert e["b"] == pytest.approx(pb.entry(r["name"])["stats"]["w_rel_err"], rel=1e-5)
        assert e["rtn_a"] == pytest.approx(e["rtn_b"])  # same bits, same weight
        assert e["winner"] == ("b" if e["b"] < e["a"] else "a")
    b_wins = sum(r["errors"]["b"] < r["errors"]["a"] for r in d["layers"])
    assert d["summary"]["b_wins"] == b_wins and d["summary"]["compared"] == 28
    assert d["verdict"].startswith(f"B better than A on {b_wins}/28 layers")
    # group errors: Frobenius-weighted over the group's layers
    for g, v in d["groups"].items():
        es = [r["errors"] for r in d["layers"] if r["group"] == g]
        n2 = sum(e["w_fro"] ** 2 for e in es)
        assert v["err_a"] == pytest.approx(math.sqrt(sum((e["a"] * e["w_fro"]) ** 2 for e in es) / n2))
        assert v["err_b"] == pytest.approx(math.sqrt(sum((e["b"] * e["w_fro"]) ** 2 for e in es) / n2))
        assert v["a_wins"] + v["b_wins"] + v["ties"] == v["layers"]
        assert f"{g} {v['err_a']:.4f} -> {v['err_b']:.4f}" in d["verdict"]
    assert set(d["groups"]) == {"language_model", "action_expert"}
    text = format_diff(d)
    lines = text.splitlines()
    assert lines[0] == "VERDICT: " + d["verdict"]
    assert "block: 64 -> 32" in text and "B64->32" in text
    assert len(lines) <= 40  # one screen
    top = lines[lines.index(next(l for l in lines if l.startswith("most-changed"))) + 2:]
    assert len(top) == 10


def test_diff_zigzag_vs_none(built_pack, pack_noperm):
    d = diff_packs(built_pack, pack_noperm)
    assert d["config_diff"]["permute"] == ["zigzag", "none"]
    for r in d["layers"]:
        assert r["perm"]["status"] == "differ"
        assert (r["perm"]["a"], r["perm"]["b"]) == ("perm", "none")
        assert 0.0 < r["perm"]["frac_differ"] <= 1.0
        assert r["r_in"]["status"] == "differ" and r["r_in"]["max_abs_diff"] > 0
        assert r["scale_rel_change"] > 0
        assert not r["identical"]
    assert "permute: 'zigzag' -> 'none'" in format_diff(d)


def test_canonical_signs_removes_column_sign_flips():
    r = random_orthogonal_blocks(3, 8, seed=1)
    flips = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    assert float((canonical_signs(r) - canonical_signs(r * flips)).abs().max()) == 0.0
    assert float((canonical_signs(r) - canonical_signs(r.flip(-1))).abs().max()) > 0.1


def test_layer_error_matches_build_stats(built_pack, synth2):
    p, ck = load_pack(built_pack), Checkpoint(synth2)
    name = p.layer_names[0]
    lp = p.layer(name)
    q = layer_error(ck.read_weight(name + ".weight"), lp)
    json.dumps(q)
    st = p.entry(name)["stats"]
    assert q["w_rel_err"] == pytest.approx(st["w_rel_err"], rel=1e-5)
    assert q["rtn_rel_err"] == pytest.approx(st["rtn_rel_err"], rel=1e-5)
    assert q["w_fro"] == pytest.approx(st["w_fro"], rel=1e-6)  # build: float32 row sums
    nb = -(-lp.in_features // lp.block_in)
    assert len(q["block_max"]) == len(q["block_median"]) == nb
    assert all(mx >= md >= 0 for mx, md in zip(q["block_max"], q["block_median"]))
    q64 = layer_error(ck.read_weight(name + ".weight").double(), lp)  # float64 path
    assert q64["w_rel_err"] == pytest.approx(q["w_rel_err"], rel=1e-2)


def test_layer_error_unquantized_is_zero(synth2, tmp_path):
    out = _build(synth2, tmp_path / "w16", wbits=16, layers=(
        "paligemma_with_expert.gemma_expert.model.layers.0.mlp.down_proj",))
    p, ck = load_pack(out), Checkpoint(synth2)
    (name,) = p.layer_names
    lp = p.layer(name)
    assert lp.wbits == 0
    q = layer_error(ck.read_weight(name + ".weight"), lp)
    assert q["w_rel_err"] == 0.0 and q["rtn_rel_err"] == 0.0 and q["wbits"] == 0
    assert len(q["block_max"]) == -(-lp.in_features // lp.block_in)
