"""duquant_pack.checkpoint: single files, directories, sharded indexes, header checks, weight checks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from duquant_pack.checkpoint import Checkpoint, natural_key
from duquant_pack.errors import CheckpointError

from _util import save_ckpt, write_raw_safetensors


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.q_proj.weight": torch.randn(6, 4, generator=g),
            "a.q_proj.bias": torch.randn(6, generator=g),
            "b.down_proj.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "b.idx": torch.arange(4, dtype=torch.int64)}


def _sharded(directory, tensors, index_name="model.safetensors.index.json"):
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for fname, ks in shards.items():
        save_ckpt(directory, {k: tensors[k] for k in ks}, name=fname)
        weight_map.update({k: fname for k in ks})
    index = directory / index_name
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_single_file_and_directory(tmp_path):
    t = _tensors()
    path = save_ckpt(tmp_path, t)
    for ck in (Checkpoint(path), Checkpoint(tmp_path)):
        assert sorted(ck.names()) == sorted(t)
        info = ck.info("b.down_proj.weight")
        assert (info.dtype, info.shape, info.file) == ("BF16", (3, 5), path)
        assert torch.equal(ck.read("b.down_proj.weight"), t["b.down_proj.weight"])
        w = ck.read_weight("b.down_proj.weight")
        assert w.dtype == torch.float32 and torch.equal(w, t["b.down_proj.weight"].float())


def test_directory_with_one_differently_named_file(tmp_path):
    save_ckpt(tmp_path, _tensors(), name="weights.safetensors")
    assert "a.q_proj.weight" in Checkpoint(tmp_path).names()


def test_sharded_index_matches_single_file(tmp_path):
    t = _tensors(1)
    single = Checkpoint(save_ckpt(tmp_path / "single", t))
    index = _sharded(tmp_path / "sharded", t)
    for ck in (Checkpoint(index), Checkpoint(tmp_path / "sharded")):
        assert len(ck.files) == 2
        assert sorted(ck.names()) == sorted(single.names())
        for name in t:
            assert torch.equal(ck.read(name), single.read(name))
    assert Checkpoint(index).fingerprint()["sha256"] != single.fingerprint()["sha256"]
    assert len(Checkpoint(index).fingerprint()["files"]) == 2


def test_index_naming_a_missing_shard(tmp_path):
    index = _sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is missing") as ei:
        Checkpoint(index)
    assert "\n" not in str(ei.value)


def test_index_problems(tmp_path):
    index = _sharded(tmp_path, _tensors())
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        Checkpoint(index)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        Checkpoint(index)
    index.write_text(json.dumps({"weight_map": {"x.weight": "../escape.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        Checkpoint(index)


def test_same_tensor_in_two_shards_rejected(tmp_path):
    t = _tensors()
    save_ckpt(tmp_path, t, name="s1.safetensors")
    save_ckpt(tmp_path, {"a.q_proj.weight": t["a.q_proj.weight"]}, name="s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.q_proj.weight": "s1.safetensors", "b.idx": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="also appears"):
        Checkpoint(tmp_path)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        Checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        Checkpoint(tmp_path / "empty")


def test_truncated_file(tmp_path):
    path = save_ckpt(tmp_path, _tensors())
    raw = path.read_bytes()
    for cut in (len(raw) // 2, 12, 4, 0):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a safetensors file"):
            Checkpoint(bad)
    bad = tmp_path / "minus1.safetensors"
    bad.write_bytes(raw[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(bad)


def test_not_safetensors(tmp_path):
    rnd = tmp_path / "random.safetensors"
    rnd.write_bytes(bytes(range(256)) * 8)
    txt = tmp_path / "text.safetensors"
    txt.write_text("this is a text file, not a checkpoint\n" * 5)
    for bad in (rnd, txt):
        with pytest.raises(CheckpointError, match="not a safetensors file"):
            Checkpoint(bad)
    nonjson = write_raw_safetensors(tmp_path / "nonjson.safetensors", {}, b"")
    nonjson.write_bytes(nonjson.read_bytes()[:8] + b"[" + nonjson.read_bytes()[9:])
    with pytest.raises(CheckpointError, match="header is not JSON"):
        Checkpoint(nonjson)


@pytest.mark.parametrize("header,match", [
    ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, "inconsistent"),
    ({"x": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
    ({"x": {"dtype": "F32", "shape": [2]}}, "malformed"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "truncated"),
])
def test_bad_headers(tmp_path, header, match):
    path = write_raw_safetensors(tmp_path / "bad.safetensors", header, bytes(16))
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(path)


def test_nan_in_weight_names_the_tensor(tmp_path):
    w = torch.randn(8, 8)
    w[2, 3] = float("nan")
    w[5, 1] = float("inf")
    ck = Checkpoint(save_ckpt(tmp_path, {"x.q_proj.weight": w, "x.k_proj.weight": torch.randn(8, 8)}))
    with pytest.raises(CheckpointError, match=r"'x\.q_proj\.weight' has 2 NaN/Inf values"):
        ck.read_weight("x.q_proj.weight")
    assert ck.read_weight("x.k_proj.weight").shape == (8, 8)


def test_read_weight_rejects_non_float_and_non_2d(tmp_path):
    ck = Checkpoint(save_ckpt(tmp_path, _tensors()))
    with pytest.raises(CheckpointError, match="dtype I64"):
        ck.read_weight("b.idx")
    with pytest.raises(CheckpointError, match="2-D"):
        ck.read_weight("a.q_proj.bias")


def test_fingerprint_depends_on_header_and_size(tmp_path):
    a = Checkpoint(save_ckpt(tmp_path / "a", _tensors(0)))
    a2 = Checkpoint(save_ckpt(tmp_path / "a2", _tensors(0)))
    b = Checkpoint(save_ckpt(tmp_path / "b", {k: v for k, v in _tensors(0).items() if k != "b.idx"}))
    assert a.fingerprint() == a2.fingerprint()
    assert a.fingerprint()["sha256"] != b.fingerprint()["sha256"]


def test_matches_safetensors_loader(synth2):
    ck = Checkpoint(synth2)
    ref = load_file(str(synth2 / "model.safetensors"))
    assert set(ck.names()) == set(ref)
    name = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ck.read(name), ref[name])


def test_natural_key():
    names = ["l.10.a", "l.2.a", "l.1.b", "l.1.a", "m"]
    assert sorted(names, key=natural_key) == ["l.1.a", "l.1.b", "l.2.a", "l.10.a", "m"]
