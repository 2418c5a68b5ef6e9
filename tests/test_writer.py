"""duquant_pack.writer and duquant_pack.safetensors_writer: atomic, deterministic file writing."""

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from duquant_pack.safetensors_writer import write_streaming
from duquant_pack.writer import datasets_sha256, reusable_entry, write_layer_file
from duquant_runtime.atomic import write_json_atomic
from duquant_runtime.format import file_sha256


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((2, 4, 4)))
    return {"perm": rng.permutation(8).astype(np.int32), "r_in": q.astype(np.float32),
            "r_out": None, "weight_scale": rng.random(3).astype(np.float32) + 0.1}


def _write(path, key="k1", **arrays):
    a = _arrays()
    a.update(arrays)
    entry = {"name": "x", "layer_key": key}
    return write_layer_file(path, name="x", layer_key=key, weight_fingerprint="bf16:00", perm=a["perm"],
                            r_in=a["r_in"], r_out=a["r_out"], weight_scale=a["weight_scale"],
                            entry_json=json.dumps(entry))


def test_layer_file_contents_and_digest(tmp_path):
    path = tmp_path / "x.h5"
    digest = _write(path)
    assert digest == file_sha256(path)
    a = _arrays()
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"perm", "r_in", "weight_scale"}
        assert f["perm"].dtype == np.int32 and np.array_equal(f["perm"][()], a["perm"])
        assert f["r_in"].dtype == np.float32 and np.array_equal(f["r_in"][()], a["r_in"])
        assert f.attrs["format"] == "duquant-layer" and f.attrs["layer_key"] == "k1"
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"]  # no temporary left


def test_equal_data_gives_equal_bytes(tmp_path):
    _write(tmp_path / "a.h5")
    _write(tmp_path / "b.h5")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    _write(tmp_path / "c.h5", weight_scale=_arrays()["weight_scale"] * 2)
    assert (tmp_path / "c.h5").read_bytes() != (tmp_path / "a.h5").read_bytes()


def test_reusable_entry_checks_key_and_data(tmp_path):
    path = tmp_path / "x.h5"
    _write(path)
    assert reusable_entry(path, "k1") == {"name": "x", "layer_key": "k1"}
    assert reusable_entry(path, "other") is None
    with h5py.File(path, "r") as f:
        off = f["weight_scale"].id.get_offset()
    raw = bytearray(path.read_bytes())
    raw[off] ^= 0x01
    path.write_bytes(bytes(raw))
    assert reusable_entry(path, "k1") is None  # data no longer matches its checksum
    path.write_bytes(b"garbage")
    assert reusable_entry(path, "k1") is None


def test_datasets_sha256_depends_on_names_dtypes_and_values():
    a = {"r_in": np.eye(2, dtype=np.float32)}
    assert datasets_sha256(a) == datasets_sha256({"r_in": np.eye(2, dtype=np.float32)})
    assert datasets_sha256(a) != datasets_sha256({"r_out": np.eye(2, dtype=np.float32)})
    assert datasets_sha256(a) != datasets_sha256({"r_in": np.eye(2, dtype=np.float64)})
    assert datasets_sha256(a) != datasets_sha256({"r_in": np.eye(2, dtype=np.float32).reshape(1, 4)})


def test_write_json_atomic(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    text = path.read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1} and text.endswith("\n") and text.index('"a"') < text.index('"b"')
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": float("nan")})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_write_streaming_roundtrip(tmp_path):
    specs = [("a", (5, 3)), ("b", (4,)), ("c", (2, 2, 2))]
    data = {n: torch.arange(int(np.prod(s)), dtype=torch.float32).reshape(s) / 7 for n, s in specs}

    def produce(name, shape):
        t = data[name].reshape(shape[0], -1)
        for r0 in range(0, shape[0], 2):  # row chunks
            yield t[r0:r0 + 2]

    size = write_streaming(tmp_path / "m.safetensors", specs, torch.bfloat16, produce, {"k": "v"})
    assert size == (tmp_path / "m.safetensors").stat().st_size
    back = load_file(str(tmp_path / "m.safetensors"))
    for n, _ in specs:
        assert back[n].dtype == torch.bfloat16 and torch.equal(back[n], data[n].to(torch.bfloat16))


def test_write_streaming_wrong_size_leaves_nothing(tmp_path):
    def produce(name, shape):
        yield torch.zeros(1, 1)

    with pytest.raises(RuntimeError, match="expected"):
        write_streaming(tmp_path / "m.safetensors", [("a", (3, 3))], torch.float32, produce)
    assert list(tmp_path.iterdir()) == []
