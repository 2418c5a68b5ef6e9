"""duquant_pack.build: parallel, resumable, deterministic, incremental and safe pack builds."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from safetensors.torch import load_file

from duquant_pack.build import PENDING_NAME, build_pack, default_out_dir
from duquant_pack.checkpoint import Checkpoint
from duquant_pack.cli import main
from duquant_pack.config import resolve
from duquant_pack.errors import BuildError, CheckpointError
from duquant_runtime import load_pack
from duquant_runtime.fingerprint import weight_fingerprint
from duquant_runtime.quant import fake_quantize_rows
from duquant_runtime.transforms import input_transform, output_restore, restore_weight, transform_weight

from _util import max_rel, ortho_err, save_ckpt, tree_bytes

PRESET = "pi05-llm-expert"


def _cfg(**kw):
    return resolve(PRESET, **kw)[0]


def _layer_files(pack) -> dict:
    return {k: v for k, v in tree_bytes(pack).items() if k.startswith("layers/")}


# --- determinism --------------------------------------------------------------------------------

def test_jobs_1_and_2_give_byte_identical_packs(synth2, built_pack, tmp_path):
    s2 = build_pack(synth2, tmp_path / "j2", _cfg(), preset=PRESET, jobs=2, progress=False)
    assert (s2.layers, s2.computed, s2.reused) == (28, 28, 0)
    a, b = tree_bytes(built_pack), tree_bytes(tmp_path / "j2")
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.startswith("layers/")]) == 28 and "manifest.json" in a
    for name in a:
        assert a[name] == b[name], name


def test_manifest_contents(synth2, built_pack):
    m = load_pack(built_pack).manifest
    ck = Checkpoint(synth2)
    assert m["checkpoint"] == json.loads(json.dumps(ck.fingerprint()))
    assert m["preset"] == PRESET and m["config"] == _cfg().to_dict()
    assert m["totals"]["layers"] == 28
    assert m["totals"]["weights"] == sum(e["in_features"] * e["out_features"] for e in m["layers"])
    assert m["totals"]["layer_bytes"] == sum((built_pack / e["file"]).stat().st_size for e in m["layers"])
    names = [e["name"] for e in m["layers"]]
    assert names.index("paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj") < \
        names.index("paligemma_with_expert.paligemma.model.language_model.layers.1.self_attn.q_proj")
    for e in m["layers"]:
        assert e["source_dtype"] == "BF16" and e["wbits"] == 4 and e["permuted"]
        assert e["weight_fingerprint"] == weight_fingerprint(ck.read(e["name"] + ".weight"))
        assert e["block_in"] == min(64, e["in_features"]) and e["block_out"] == min(64, e["out_features"])
    assert not (built_pack / PENDING_NAME).exists()
    assert sorted(p.name for p in (built_pack / "layers").iterdir()) == sorted(Path(e["file"]).name for e in m["layers"])


def test_built_pack_reproduces_every_layer(synth2, built_pack):
    """Every R orthogonal; unquantized equivalence y = ((x P R_in) W_t^T) R_out^T + b == x W^T + b;
    the stored scales reproduce the recorded weight error."""
    pack = load_pack(built_pack)
    ck = Checkpoint(synth2)
    g = torch.Generator().manual_seed(0)
    for lp in pack.layers():
        assert ortho_err(lp.r_in) < 1e-5 and ortho_err(lp.r_out) < 1e-5
        w = ck.read_weight(lp.name + ".weight")
        x = torch.randn(3, lp.in_features, generator=g)
        bias = torch.randn(lp.out_features, generator=g)
        w_t = transform_weight(w, lp.perm, lp.r_in, lp.r_out)
        y = output_restore(input_transform(x, lp.perm, lp.r_in) @ w_t.T, lp.r_out) + bias
        assert max_rel(y, x.double() @ w.double().T + bias.double()) < 1e-5, lp.name
        assert max_rel(restore_weight(w_t, lp.perm, lp.r_in, lp.r_out), w) < 1e-5
        deq = restore_weight(fake_quantize_rows(w_t, lp.weight_scale, 4), lp.perm, lp.r_in, lp.r_out)
        rel = float((deq.double() - w.double()).norm() / w.double().norm())
        assert rel == pytest.approx(lp.meta["stats"]["w_rel_err"], rel=1e-3)
        assert lp.meta["stats"]["w_rel_err"] < lp.meta["stats"]["rtn_rel_err"]


# --- reuse, incremental builds ----------------------------------------------------------------------

def test_rebuild_same_config_reuses_everything(synth2, pack_copy, built_pack):
    s = build_pack(synth2, pack_copy, _cfg(), preset=PRESET, jobs=1, progress=False)
    assert (s.layers, s.reused, s.computed) == (28, 28, 0)
    assert tree_bytes(pack_copy) == tree_bytes(built_pack)


def test_changing_only_abits_reuses_all_layer_files(synth2, pack_copy, built_pack):
    with pytest.raises(BuildError, match="different configuration"):
        build_pack(synth2, pack_copy, _cfg(abits=4), preset=PRESET, jobs=1, progress=False)
    s = build_pack(synth2, pack_copy, _cfg(abits=4), preset=PRESET, jobs=1, progress=False, overwrite=True)
    assert (s.reused, s.computed) == (28, 0)
    assert _layer_files(pack_copy) == _layer_files(built_pack)
    m = load_pack(pack_copy).manifest
    assert m["config"]["abits"] == 4
    assert m["config_hash"] != load_pack(built_pack).manifest["config_hash"]
    assert load_pack(pack_copy).verify() == []


def test_changing_one_layers_bits_recomputes_only_that_layer(synth2, pack_copy, built_pack):
    name = "paligemma_with_expert.gemma_expert.model.layers.1.self_attn.v_proj"
    s = build_pack(synth2, pack_copy, _cfg(layer_wbits={name: 8}), preset=PRESET, jobs=1, progress=False,
                   overwrite=True)
    assert (s.reused, s.computed) == (27, 1)
    pack = load_pack(pack_copy)
    assert pack.entry(name)["wbits"] == 8 and pack.layer(name).wbits == 8
    old, new = _layer_files(built_pack), _layer_files(pack_copy)
    assert len(new) == 28 and len(set(old) & set(new)) == 27  # the old file of that layer was deleted
    assert pack.verify() == []


def test_different_config_refused_and_previous_pack_intact(synth2, pack_copy):
    before = tree_bytes(pack_copy)
    with pytest.raises(BuildError, match="different configuration.*--overwrite"):
        build_pack(synth2, pack_copy, _cfg(wbits=8), preset=PRESET, jobs=1, progress=False)
    assert tree_bytes(pack_copy) == before
    assert load_pack(pack_copy).verify() == []
    s = build_pack(synth2, pack_copy, _cfg(wbits=8), preset=PRESET, jobs=1, progress=False, overwrite=True)
    assert (s.computed, s.reused) == (28, 0)
    pack = load_pack(pack_copy)
    assert pack.config["wbits"] == 8 and pack.verify() == []
    assert len(list((pack_copy / "layers").iterdir())) == 28  # the previous pack's files are gone


def test_different_checkpoint_refused(tmp_path, pack_copy):
    other = save_ckpt(tmp_path / "other", {
        "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8)})
    before = tree_bytes(pack_copy)
    with pytest.raises(BuildError, match="different checkpoint"):
        build_pack(other, pack_copy, _cfg(), preset=PRESET, jobs=1, progress=False)
    assert tree_bytes(pack_copy) == before


def test_failed_overwrite_leaves_previous_pack_intact(tmp_path, pack_copy):
    w = torch.randn(8, 8)
    w[0, 0] = float("nan")
    bad = save_ckpt(tmp_path / "bad", {
        "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight": w})
    before = tree_bytes(pack_copy)
    with pytest.raises(CheckpointError, match="NaN"):
        build_pack(bad, pack_copy, _cfg(), preset=PRESET, jobs=1, progress=False, overwrite=True)
    pack = load_pack(pack_copy)
    assert pack.verify() == [] and len(pack.layer_names) == 28
    after = tree_bytes(pack_copy)
    assert {k: after[k] for k in before} == before


def test_corrupted_layer_file_is_recomputed_not_reused(synth2, pack_copy, built_pack):
    pack = load_pack(pack_copy)
    e = pack.entry(pack.layer_names[0])
    f = pack_copy / e["file"]
    with h5py.File(f, "r") as h:
        off = h["weight_scale"].id.get_offset()
    raw = bytearray(f.read_bytes())
    raw[off] ^= 0x01  # lowest mantissa bit of one scale: still a valid, positive float
    f.write_bytes(bytes(raw))
    assert len(load_pack(pack_copy).verify()) == 1
    s = build_pack(synth2, pack_copy, _cfg(), preset=PRESET, jobs=1, progress=False)
    assert (s.reused, s.computed) == (27, 1)
    assert tree_bytes(pack_copy) == tree_bytes(built_pack)


# --- resume ---------------------------------------------------------------------------------------

def test_resume_after_partial_build_with_stale_temporaries(synth2, pack_copy, built_pack):
    """A build that died mid-way: no manifest, a pending marker, some layer files, a half-written temporary."""
    (pack_copy / "manifest.json").unlink()
    files = sorted((pack_copy / "layers").glob("*.h5"))
    for p in files[::3]:
        p.unlink()
    deleted = len(files[::3])
    (pack_copy / "layers" / ".tmp-999999-half.h5").write_bytes(b"\x89HDF\r\n partial")
    ck = Checkpoint(synth2)
    (pack_copy / PENDING_NAME).write_text(json.dumps(
        {"config_hash": load_pack(built_pack).manifest["config_hash"], "checkpoint": ck.fingerprint()["sha256"]}))
    with pytest.raises(Exception, match="interrupted build"):
        load_pack(pack_copy)
    # another configuration may not take over the unfinished build
    with pytest.raises(BuildError, match="different configuration"):
        build_pack(synth2, pack_copy, _cfg(wbits=3), preset=PRESET, jobs=1, progress=False)
    s = build_pack(synth2, pack_copy, _cfg(), preset=PRESET, jobs=1, progress=False)
    assert (s.reused, s.computed) == (28 - deleted, deleted)
    assert tree_bytes(pack_copy) == tree_bytes(built_pack)


def _finished_layer_files(out):
    """Layer files under their final names (pathlib's glob also matches the hidden .tmp-* files)."""
    layers = out / "layers"
    return sorted(p.name for p in layers.glob("*.h5") if not p.name.startswith(".")) if layers.is_dir() else []


def _kill_ckpt(directory):
    """16 layers that each take tens of milliseconds (two 512-wide eigendecompositions, each with a
    448-dimensional null-space basis), so that a kill polled every 5 ms lands mid-build."""
    g = torch.Generator().manual_seed(0)
    return save_ckpt(directory, {f"blk.layers.{i}.mlp.down_proj.weight":
                                 torch.randn(64, 1024, generator=g).to(torch.bfloat16) for i in range(16)})


def test_resume_after_sigkill_gives_same_bytes_as_uninterrupted_build(tmp_path, capsys):
    ckpt = _kill_ckpt(tmp_path / "ckpt")
    out = tmp_path / "killed"
    args = ["build", str(ckpt), "--out", str(out), "--jobs", "1", "--block", "512", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "duquant_pack.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_finished_layer_files(out)) >= 2:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_at_kill = _finished_layer_files(out)
    killed_mid_build = not (out / "manifest.json").exists()
    if killed_mid_build:
        assert proc.returncode == -signal.SIGKILL
        assert (out / PENDING_NAME).exists()
        assert 2 <= len(done_at_kill) < 16
        with pytest.raises(Exception, match="interrupted build"):
            load_pack(out)
    else:  # the machine was too fast to catch it: simulate the same state
        (out / "manifest.json").unlink()
        for name in _finished_layer_files(out)[::2]:
            (out / "layers" / name).unlink()
        done_at_kill = _finished_layer_files(out)
    clean = tmp_path / "clean"
    build_pack(ckpt, clean, resolve(block=512)[0], jobs=1, progress=False)
    capsys.readouterr()
    assert main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["layers"], summary["reused"]) == (16, len(done_at_kill))
    assert not list(out.rglob(".tmp-*")) and not (out / PENDING_NAME).exists()
    assert tree_bytes(out) == tree_bytes(clean)
    assert load_pack(out).verify() == []


# --- bad inputs and safety -------------------------------------------------------------------------

@pytest.mark.parametrize("jobs", [1, 2])
def test_nan_weight_is_a_checkpoint_error_and_leaves_nothing(tmp_path, jobs):
    w = torch.randn(16, 16)
    w[3, 5] = float("nan")
    t = {"x.q_proj.weight": w}
    t.update({f"x{i}.k_proj.weight": torch.randn(16, 16) for i in range(4)})
    ckpt = save_ckpt(tmp_path / "ckpt", t)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"'x\.q_proj\.weight' has 1 NaN/Inf"):
        build_pack(ckpt, out, resolve(block=8)[0], jobs=jobs, progress=False)
    assert not out.exists()


def test_missing_shard_is_an_error_before_anything_is_written(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.q_proj.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard model-00001-of-00002.safetensors is missing"):
        build_pack(tmp_path / "ckpt", tmp_path / "out", _cfg(), jobs=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint_gives_same_layers_as_single_file(synth2, built_pack, tmp_path):
    tensors = load_file(str(synth2 / "model.safetensors"))
    keys = sorted(tensors)
    shard_dir = tmp_path / "sharded"
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        fname = f"model-0000{i}-of-00002.safetensors"
        save_ckpt(shard_dir, {k: tensors[k] for k in part}, name=fname)
        weight_map.update({k: fname for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    del tensors
    out = tmp_path / "pack"
    s = build_pack(shard_dir, out, _cfg(), preset=PRESET, jobs=1, progress=False)
    assert s.layers == 28
    a, b = load_pack(built_pack).manifest, load_pack(out).manifest
    assert [e["weight_fingerprint"] for e in a["layers"]] == [e["weight_fingerprint"] for e in b["layers"]]
    assert _layer_files(out) == _layer_files(built_pack)
    assert len(b["checkpoint"]["files"]) == 2 and b["checkpoint"]["sha256"] != a["checkpoint"]["sha256"]


def test_refuses_foreign_directory_file_and_held_lock(synth2, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not a duquant pack"):
        build_pack(synth2, foreign, _cfg(), jobs=1, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(BuildError, match="not a directory"):
        build_pack(synth2, afile, _cfg(), jobs=1, progress=False)
    locked = tmp_path / "locked"
    locked.mkdir()
    fd = os.open(locked / ".lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(BuildError, match="another build"):
            build_pack(synth2, locked, _cfg(), jobs=1, progress=False)
    finally:
        os.close(fd)
    assert not (locked / "manifest.json").exists()


def test_default_out_dir(tmp_path):
    (tmp_path / "my-ckpt").mkdir()
    d = default_out_dir(tmp_path / "my-ckpt", "sha256:0123456789abcdef", "pi05-llm")
    assert d == Path("packs") / "my-ckpt-pi05-llm-01234567"
    (tmp_path / "c").mkdir()
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(b"")
    assert default_out_dir(f, "sha256:ffffffffffff", None, root=tmp_path).name == "c-custom-ffffffff"


# --- known bugs -------------------------------------------------------------------------------------

def test_rebuild_after_checkpoint_rewritten_reads_new_weights(tmp_path):
    name = "m.layers.0.mlp.down_proj.weight"
    ck_dir = tmp_path / "ckpt"
    save_ckpt(ck_dir, {name: torch.randn(32, 64, generator=torch.Generator().manual_seed(0))})
    cfg = resolve(block=16)[0]
    build_pack(ck_dir, tmp_path / "a", cfg, jobs=1, progress=False)
    new = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    tmp = save_ckpt(tmp_path / "staging", {name: new})
    os.replace(tmp, ck_dir / "model.safetensors")  # same layout, new values
    build_pack(ck_dir, tmp_path / "b", cfg, jobs=1, progress=False)
    entry = load_pack(tmp_path / "b").manifest["layers"][0]
    assert entry["weight_fingerprint"] == weight_fingerprint(new)


def test_rebuild_from_same_values_in_other_dtype_equals_clean_build(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {f"m.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 32, generator=g).to(torch.bfloat16)
         for i in range(2)}
    bf16 = save_ckpt(tmp_path / "bf16", t)
    f32 = save_ckpt(tmp_path / "f32", {k: v.float() for k, v in t.items()})
    cfg = resolve(block=8)[0]
    build_pack(bf16, tmp_path / "pack", cfg, jobs=1, progress=False)
    s = build_pack(f32, tmp_path / "pack", cfg, jobs=1, progress=False, overwrite=True)
    assert s.reused == 2
    build_pack(f32, tmp_path / "clean", cfg, jobs=1, progress=False)
    assert tree_bytes(tmp_path / "pack") == tree_bytes(tmp_path / "clean")


def test_failed_build_leaves_no_directories_it_created(tmp_path):
    w = torch.randn(8, 8)
    w[0, 0] = float("nan")
    ckpt = save_ckpt(tmp_path / "ckpt", {"x.q_proj.weight": w})
    with pytest.raises(CheckpointError):
        build_pack(ckpt, tmp_path / "a" / "b" / "pack", resolve()[0], jobs=1, progress=False)
    assert not (tmp_path / "a" / "b" / "pack").exists()
    assert not (tmp_path / "a").exists()
