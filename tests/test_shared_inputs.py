"""duquant_pack.shared_inputs and the build's --share-inputs: which layers group, one input
transform per group, per-member files and keys, determinism, and the manifest's input_group checks."""

from __future__ import annotations

import json

import pytest
import torch

from click.testing import CliRunner

from duquant_pack.build import build_pack, layer_key
from duquant_pack.cli import cli
from duquant_pack.inspect import format_inspect, inspect_pack
from duquant_pack.checkpoint import Checkpoint
from duquant_pack.config import resolve
from duquant_pack.layer import LayerSpec
from duquant_pack.selection import select_layers
from duquant_pack.shared_inputs import input_groups
from duquant_runtime import PackError, load_pack
from duquant_runtime.format import validate_manifest

from _util import tree_bytes

PRESET = "pi05-llm-expert"


@pytest.fixture(scope="module")
def packs(synth2, tmp_path_factory):
    """{'plain': pack without sharing, 'shared': with --share-inputs (jobs 1), 'shared2': jobs 2}."""
    root = tmp_path_factory.mktemp("share")
    out = {}
    for kind, share, jobs in (("plain", None, 1), ("shared", True, 1), ("shared2", True, 2)):
        cfg, _ = resolve(PRESET, share_inputs=share)
        build_pack(synth2, root / kind, cfg, preset=PRESET, jobs=jobs, progress=False)
        out[kind] = root / kind
    return out


def test_groups_are_sibling_q_k_v_and_gate_up(synth2):
    cfg, _ = resolve(PRESET, share_inputs=True)
    groups = input_groups(select_layers(Checkpoint(synth2), cfg), cfg)
    leaves = sorted({tuple(m.name.rpartition(".")[2] for m in g) for g in groups})
    assert leaves == [("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")]
    assert len(groups) == 8  # 2 towers x 2 decoder layers x 2 groups
    assert all(len({m.name.rpartition(".")[0] for m in g}) == 1 for g in groups)  # siblings only
    off, _ = resolve(PRESET)
    assert input_groups(select_layers(Checkpoint(synth2), off), off) == []
    k = next(m.name for g in groups for m in g if m.name.endswith("layers.0.self_attn.k_proj"))
    mixed, _ = resolve(PRESET, share_inputs=True, layer_wbits={k: 8})  # k's settings differ: no group there
    g2 = input_groups(select_layers(Checkpoint(synth2), mixed), mixed)
    assert len(g2) == 7 and all(k not in [m.name for m in g] for g in g2)


def test_members_share_the_input_side_only(packs):
    plain, shared = load_pack(packs["plain"]), load_pack(packs["shared"])
    assert shared.config["share_inputs"] is True and "share_inputs" not in plain.config
    groups = {tuple(shared.entry(n)["input_group"]) for n in shared.layer_names if "input_group" in shared.entry(n)}
    assert len(groups) == 8
    for group in groups:
        layers = [shared.layer(n) for n in group]
        for lay in layers[1:]:
            assert torch.equal(lay.perm, layers[0].perm) and torch.equal(lay.r_in, layers[0].r_in)
            assert lay.r_out is None or not torch.equal(lay.r_out, layers[0].r_out)
        # a member's own transform differs from the group's (computed from other rows)
        assert any(not torch.equal(plain.layer(n).r_in, shared.layer(n).r_in) for n in group)
        for n in group:  # each member's scales fit its own rows; errors stay in the plain build's range
            assert shared.entry(n)["stats"]["w_rel_err"] < 1.25 * plain.entry(n)["stats"]["w_rel_err"]
    for n in plain.layer_names:  # layers in no group are computed exactly as without sharing
        if "input_group" not in shared.entry(n):
            assert shared.entry(n)["layer_key"] == plain.entry(n)["layer_key"]
            assert (packs["shared"] / shared.entry(n)["file"]).read_bytes() == \
                (packs["plain"] / plain.entry(n)["file"]).read_bytes()


def test_shared_build_is_deterministic_across_jobs(packs):
    assert tree_bytes(packs["shared"]) == tree_bytes(packs["shared2"])


def test_member_keys_depend_on_every_member():
    spec = LayerSpec(wbits=4, block=64, block_out=None, permute="zigzag", permute_metric="absmax", scale="mse")
    group = [["a.q", "fp-q", None], ["a.k", "fp-k", None]]
    changed = [["a.q", "fp-q", None], ["a.k", "fp-k2", None]]
    assert layer_key("a.q", spec, "fp-q", group=group) != layer_key("a.q", spec, "fp-q", group=changed)
    assert layer_key("a.q", spec, "fp-q", group=group) != layer_key("a.q", spec, "fp-q")


@pytest.mark.parametrize("edit, match", [
    (lambda g: g[0].update(input_group=[g[0]["name"]]), "two or more"),
    (lambda g: g[0].update(input_group=g[0]["input_group"] + ["nope"]), "'nope', which is not in the pack"),
    (lambda g: g[1].update(input_group=list(reversed(g[1]["input_group"]))), "disagrees"),
    (lambda g: g[0].update(input_group="q,k"), "wrong type"),
    (lambda g: g[0].update(input_group=[n for n in g[0]["input_group"] if n != g[0]["name"]] + ["x"]),
     "this one included"),
], ids=["group of one", "unknown member", "members disagree on the order", "not a list", "own name missing"])
def test_manifest_refuses_inconsistent_groups(packs, edit, match):
    m = json.loads((packs["shared"] / "manifest.json").read_text())
    validate_manifest(json.loads(json.dumps(m)))
    first = next(e for e in m["layers"] if "input_group" in e)
    edit([e for e in m["layers"] if e.get("input_group") == first["input_group"]])  # the entries, in place
    with pytest.raises(PackError, match=match):
        validate_manifest(m)


def test_inspect_counts_groups(packs):
    info = inspect_pack(packs["shared"])
    assert (info["input_groups"], info["input_group_layers"]) == (8, 20)
    assert "input groups 8 (20 layers share one input transform per group)" in format_inspect(info)


def test_cli_flag_and_help(synth2, tmp_path, packs):
    res = CliRunner().invoke(cli, ["build", str(synth2), "--preset", PRESET, "--share-inputs", "--out",
                                   str(tmp_path / "p"), "-j", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert tree_bytes(tmp_path / "p") == tree_bytes(packs["shared"])  # the same pack as the API's
    assert "--share-inputs" in CliRunner().invoke(cli, ["build", "--help"]).output
