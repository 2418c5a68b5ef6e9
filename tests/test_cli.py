"""duquant_pack.cli: the `duquant-pack` commands, their output and their one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import duquant_pack.cli as cli_mod
from duquant_pack.cli import main
from duquant_runtime import load_pack

from _util import save_ckpt, tree_bytes

PRESET = "pi05-llm-expert"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setattr(cli_mod, "_DEBUG", False)


def _run(capsys, argv):
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_one_line_error(rc, out, err):
    assert rc != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err and "Traceback" not in out


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    g = torch.Generator().manual_seed(0)
    return save_ckpt(d, {"m.layers.0.self_attn.q_proj.weight": torch.randn(32, 48, generator=g),
                         "m.layers.0.mlp.down_proj.weight": torch.randn(48, 96, generator=g),
                         "m.layers.0.norm.weight": torch.ones(48)})


def _bad_inputs(tmp_path, small_ckpt):
    """name -> (checkpoint path, extra args)."""
    raw = small_ckpt.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) // 2])
    rnd = tmp_path / "random.safetensors"
    rnd.write_bytes(os.urandom(4096))
    txt = tmp_path / "model.safetensors.txt"
    txt.write_text("not a checkpoint\n" * 50)
    w = torch.randn(8, 8)
    w[1, 1] = float("nan")
    nan = save_ckpt(tmp_path / "nan", {"x.q_proj.weight": w, "x.k_proj.weight": torch.randn(8, 8)})
    shard_dir = tmp_path / "sharded"
    save_ckpt(shard_dir, {"x.q_proj.weight": torch.randn(8, 8)}, name="model-00001-of-00002.safetensors")
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x.q_proj.weight": "model-00001-of-00002.safetensors", "x.k_proj.weight": "model-00002-of-00002.safetensors"}}))
    return {
        "missing file": (tmp_path / "missing.safetensors", []),
        "truncated": (trunc, []),
        "random bytes": (rnd, []),
        "text file": (txt, []),
        "no matching layers": (small_ckpt, ["--include", "no_such_layer"]),
        "bad regex": (small_ckpt, ["--include", "q_proj("]),
        "block 0": (small_ckpt, ["--block", "0"]),
        "unknown preset": (small_ckpt, ["--preset", "pi05-everything"]),
        "unknown option": (small_ckpt, ["--frobnicate"]),
        "bad choice": (small_ckpt, ["--permute", "random"]),
        "not an integer": (small_ckpt, ["--block", "sixty-four"]),
        "one bit": (small_ckpt, ["--wbits", "1"]),
        "propagate": (small_ckpt, ["--row-rot", "propagate"]),
        "bad layer-wbits": (small_ckpt, ["--layer-wbits", "m.layers.0.self_attn.q_proj"]),
        "unknown whitelist layer": (small_ckpt, ["--layers", "m.layers.0.self_attn.k_proj"]),
        "nan weight": (nan, []),
        "missing shard": (shard_dir, []),
        "missing shard (index path)": (shard_dir / "model.safetensors.index.json", []),
    }


CASES = ["missing file", "truncated", "random bytes", "text file", "no matching layers", "bad regex", "block 0",
         "unknown preset", "unknown option", "bad choice", "not an integer", "one bit", "propagate",
         "bad layer-wbits", "unknown whitelist layer", "nan weight", "missing shard", "missing shard (index path)"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_error_and_no_pack_dir(case, tmp_path, small_ckpt, capsys):
    ckpt, extra = _bad_inputs(tmp_path, small_ckpt)[case]
    out = tmp_path / "out" / "pack"
    rc, stdout, stderr = _run(capsys, ["build", str(ckpt), "--out", str(out), "--jobs", "1", *extra])
    _assert_one_line_error(rc, stdout, stderr)
    assert not out.exists()
    assert rc == (2 if case in ("unknown option", "bad choice", "not an integer") else 1)


def test_error_messages_name_the_problem(tmp_path, small_ckpt, capsys):
    inputs = _bad_inputs(tmp_path, small_ckpt)
    expect = {"missing file": "no such file", "truncated": "truncated", "nan weight": "'x.q_proj.weight' has 1 NaN",
              "missing shard": "shard model-00002-of-00002.safetensors is missing",
              "unknown option": "--frobnicate", "unknown preset": "unknown preset 'pi05-everything'",
              "bad regex": "invalid regular expression", "block 0": "--block must be a positive integer"}
    for case, needle in expect.items():
        ckpt, extra = inputs[case]
        _, _, err = _run(capsys, ["build", str(ckpt), "--out", str(tmp_path / "o"), "--jobs", "1", *extra])
        assert needle in err, (case, err)


def test_nan_weight_with_parallel_jobs(tmp_path, capsys):
    w = torch.randn(16, 16)
    w[0, 0] = float("inf")
    t = {"x.q_proj.weight": w, **{f"y{i}.k_proj.weight": torch.randn(16, 16) for i in range(3)}}
    ckpt = save_ckpt(tmp_path / "c", t)
    out = tmp_path / "pack"
    rc, stdout, stderr = _run(capsys, ["build", str(ckpt), "--out", str(out), "--jobs", "2", "--block", "8"])
    _assert_one_line_error(rc, stdout, stderr)
    assert "x.q_proj.weight" in stderr and not out.exists()


def test_existing_different_pack_refused_and_kept(built_pack, tmp_path, synth2, capsys):
    out = tmp_path / "pack"
    shutil.copytree(built_pack, out)
    before = tree_bytes(out)
    rc, stdout, stderr = _run(capsys, ["build", str(synth2), "--out", str(out), "--preset", PRESET,
                                       "--wbits", "8", "--jobs", "1"])
    _assert_one_line_error(rc, stdout, stderr)
    assert "different configuration" in stderr and "--overwrite" in stderr
    assert tree_bytes(out) == before
    assert load_pack(out).verify() == []


def test_out_holding_foreign_files_refused(tmp_path, small_ckpt, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    rc, stdout, stderr = _run(capsys, ["build", str(small_ckpt), "--out", str(out), "--jobs", "1"])
    _assert_one_line_error(rc, stdout, stderr)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_entry_point_subprocess_errors(tmp_path):
    exe = Path(sys.executable).parent / "duquant-pack"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "duquant_pack.cli"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    out = tmp_path / "out"
    for args in (["build", str(tmp_path / "nope"), "--out", str(out)], ["build", str(bad), "--out", str(out)],
                 ["build", str(bad), "--no-such-option"]):
        r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
        _assert_one_line_error(r.returncode, r.stdout, r.stderr)
        assert not out.exists()


# --- successful commands -----------------------------------------------------------------------------

def test_build_json_then_rebuild_reuses(synth2, tmp_path, capsys):
    out = tmp_path / "pack"
    rc, stdout, stderr = _run(capsys, ["build", str(synth2), "--out", str(out), "--preset", PRESET, "--jobs", "1",
                                       "--json"])
    assert rc == 0 and stderr == ""
    s = json.loads(stdout)
    assert (s["layers"], s["computed"], s["reused"]) == (28, 28, 0)
    assert s["groups"]["language_model"]["layers"] == 14 and s["groups"]["action_expert"]["layers"] == 14
    assert s["config_hash"] == load_pack(out).manifest["config_hash"]
    rc, stdout, stderr = _run(capsys, ["build", str(synth2), "--out", str(out), "--preset", PRESET, "-j", "1", "-q"])
    assert rc == 0
    assert "28 (0 computed, 28 reused)" in stdout
    assert "language_model" in stdout and "action_expert" in stdout


def test_build_options_reach_the_manifest(small_ckpt, tmp_path, capsys):
    out = tmp_path / "pack"
    rc, stdout, stderr = _run(capsys, [
        "build", str(small_ckpt), "--out", str(out), "--jobs", "1", "--block", "16", "--row-rot", "restore",
        "--block-out", "8", "--wbits", "3", "--abits", "16", "--layer-wbits", "m.layers.0.mlp.down_proj:16",
        "--permute", "interleave", "--scale", "max", "--lambda-smooth", "0.15", "-q"])
    assert rc == 0
    assert stderr.startswith("note: --lambda-smooth") and len(stderr.splitlines()) == 1
    pack = load_pack(out)
    c = pack.config
    assert (c["block"], c["block_out"], c["wbits"], c["abits"], c["permute"], c["scale"], c["lambda_smooth"]) == \
        (16, 8, 3, 0, "interleave", "max", 0.15)
    q = pack.layer("m.layers.0.self_attn.q_proj")
    d = pack.layer("m.layers.0.mlp.down_proj")
    assert (q.wbits, q.block_in, q.block_out) == (3, 16, 8) and q.weight_scale is not None
    assert d.wbits == 0 and d.weight_scale is None
    assert pack.verify() == []


@pytest.mark.parametrize("preset,count", [("pi05-llm", 14), ("pi05-llm-expert-mlp", 20), ("pi05-llm-expert", 28)])
def test_layers_dry_run(synth2, preset, count, capsys, tmp_path):
    rc, stdout, _ = _run(capsys, ["layers", str(synth2), "--preset", preset, "--json"])
    assert rc == 0
    data = json.loads(stdout)
    assert data["count"] == count == len(data["layers"])
    assert data["weights"] == sum(l["out_features"] * l["in_features"] for l in data["layers"])
    rc, stdout, _ = _run(capsys, ["layers", str(synth2), "--preset", preset])
    assert rc == 0 and stdout.splitlines()[-1].startswith(f"{count} layers")
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_layers_option_overrides_preset(synth2, capsys):
    rc, stdout, _ = _run(capsys, ["layers", str(synth2), "--preset", "pi05-llm", "--include", r"mlp\.down_proj$",
                                  "--wbits", "16", "--json"])
    data = json.loads(stdout)
    assert rc == 0 and data["count"] == 4  # LLM + expert down_proj of 2 layers: the preset include is replaced
    assert {l["wbits"] for l in data["layers"]} == {0}


def test_presets_command(capsys):
    rc, stdout, _ = _run(capsys, ["presets", "--json"])
    assert rc == 0
    data = {p["name"]: p["expected_layers"] for p in json.loads(stdout)}
    assert data == {"pi05-llm": 126, "pi05-llm-expert-mlp": 180, "pi05-llm-expert": 252,
                    "pi0-llm": 126, "pi0-llm-expert-mlp": 180, "pi0-llm-expert": 252,
                    "pi05-llm-expert-quality": 252}
    rc, stdout, _ = _run(capsys, ["presets"])
    assert rc == 0 and "pi05-llm-expert" in stdout and "252" in stdout


def test_demo_json(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, stdout, stderr = _run(capsys, ["demo", "--out", str(out), "--layers", "1", "--width-div", "8", "--json"])
    assert rc == 0, stderr
    s = json.loads(stdout)
    assert s["layers"] == 14 and s["computed"] == 14
    groups = s["groups"]
    assert groups["language_model"]["layers"] == 7 and groups["action_expert"]["layers"] == 7
    for g in ("language_model", "action_expert"):
        assert 0 < groups[g]["w_rel_err"] < groups[g]["rtn_rel_err"]
    assert load_pack(out).verify() == []
    # rerunning rebuilds from scratch into the same directory
    rc, stdout, _ = _run(capsys, ["demo", "--out", str(out), "--layers", "1", "--width-div", "8", "--json",
                                  "--jobs", "1"])
    assert rc == 0 and json.loads(stdout)["computed"] == 14


def test_demo_refuses_non_pack_out(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("keep")
    rc, stdout, stderr = _run(capsys, ["demo", "--out", str(tmp_path / "x"), "--layers", "1", "--width-div", "8"])
    _assert_one_line_error(rc, stdout, stderr)
    assert (tmp_path / "x" / "keep.txt").read_text() == "keep"


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "s"
    rc, stdout, _ = _run(capsys, ["synth", "--out", str(out), "--arch", "pi0", "--layers", "1", "--width-div", "8",
                                  "--include", r"gemma_expert\.model\.layers\.0\.mlp\."])
    assert rc == 0 and stdout.startswith("wrote ")
    rc, stdout, _ = _run(capsys, ["layers", str(out), "--json", "--exclude", ""])
    assert json.loads(stdout)["count"] == 3
    rc, stdout, stderr = _run(capsys, ["synth", "--out", str(tmp_path / "t"), "--width-div", "3"])
    _assert_one_line_error(rc, stdout, stderr)


def test_version_and_help(capsys):
    rc, stdout, _ = _run(capsys, ["--version"])
    assert rc == 0 and "0.1.0" in stdout
    rc, stdout, _ = _run(capsys, ["build", "--help"])
    assert rc == 0 and "--overwrite" in stdout and "--jobs" in stdout


def test_debug_shows_the_exception(tmp_path, capsys):
    from duquant_pack.errors import CheckpointError
    with pytest.raises(CheckpointError):
        main(["--debug", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
