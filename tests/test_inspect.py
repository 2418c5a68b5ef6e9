"""duquant_pack.inspect: inspect_pack and format_inspect."""

import json

import pytest

from duquant_runtime import PackError
from duquant_runtime.format import config_hash
from duquant_pack.groups import layer_group
from duquant_pack.inspect import format_inspect, inspect_pack


def _manifest(pack):
    return json.loads((pack / "manifest.json").read_text())


def test_inspect_built_pack(built_pack):
    info = inspect_pack(built_pack)
    json.dumps(info, allow_nan=False)  # JSON-serialisable
    m = _manifest(built_pack)
    assert (info["format"], info["format_version"]) == ("duquant-pack", 2)
    assert info["tool"]["name"] == "duquant" and info["tool"]["version"] == m["tool"]["version"]
    assert info["tool"]["algorithm_version"] == m["tool"]["algorithm_version"]
    assert info["preset"] == "pi05-llm-expert"
    assert info["config"] == m["config"] and info["config_hash"] == config_hash(m["config"])
    assert info["checkpoint"] == m["checkpoint"] and len(info["checkpoint"]["sha256"]) == 64
    assert info["layers"] == 28
    assert {g: v["layers"] for g, v in info["groups"].items()} == {"language_model": 14, "action_expert": 14}
    assert sum(v["weights"] for v in info["groups"].values()) == info["weights"] == m["totals"]["weights"]
    assert all(0 < v["w_rel_err"] < v["rtn_rel_err"] for v in info["groups"].values())
    # bits / blocks: every (wbits, block_in, block_out) combination, counts summing to the layer count
    expect = {}
    for e in m["layers"]:
        k = (e["wbits"], e["block_in"], e["block_out"])
        expect[k] = expect.get(k, 0) + 1
    got = {(c["wbits"], c["block_in"], c["block_out"]): c["layers"] for c in info["bits_blocks"]}
    assert got == expect and sum(got.values()) == 28
    assert all(c["wbits"] == 4 for c in info["bits_blocks"])
    assert info["permuted"] == 28 and info["quantized"] == 28
    assert info["calibration"] is False and info["calibration_info"] is None
    assert info["input_groups"] == 0 and "input groups" not in format_inspect(info)


def test_inspect_bytes_equal_file_sizes(built_pack):
    info = inspect_pack(built_pack)
    b = info["bytes"]
    on_disk = sum(p.stat().st_size for p in built_pack.rglob("*") if p.is_file())
    layer_files = sum(p.stat().st_size for p in (built_pack / "layers").iterdir())
    assert b["layers"] == layer_files == _manifest(built_pack)["totals"]["layer_bytes"] > 0
    assert b["manifest"] == (built_pack / "manifest.json").stat().st_size > 0
    assert b["calibration"] == 0 and b["missing_files"] == 0
    assert b["total"] == b["manifest"] + b["layers"] + b["calibration"] == on_disk


def test_inspect_groups_follow_layer_group(built_pack):
    info = inspect_pack(built_pack)
    names = [e["name"] for e in _manifest(built_pack)["layers"]]
    for g, v in info["groups"].items():
        assert v["layers"] == sum(1 for n in names if layer_group(n) == g)


def test_inspect_missing_layer_file_counts(pack_copy):
    e = _manifest(pack_copy)["layers"][0]
    size = (pack_copy / e["file"]).stat().st_size
    before = inspect_pack(pack_copy)["bytes"]
    (pack_copy / e["file"]).unlink()
    after = inspect_pack(pack_copy)["bytes"]
    assert after["missing_files"] == 1 and after["layers"] == before["layers"] - size


def test_inspect_bad_manifest_raises(pack_copy):
    (pack_copy / "manifest.json").unlink()
    with pytest.raises(PackError, match="no manifest.json"):
        inspect_pack(pack_copy)


def test_format_inspect(built_pack):
    info = inspect_pack(built_pack)
    text = format_inspect(info)
    assert info["config_hash"] in text
    assert info["checkpoint"]["sha256"] in text
    assert "pi05-llm-expert" in text and "duquant-pack v2" in text
    assert "language_model" in text and "action_expert" in text
    assert "calibration  none" in text
    lines = text.splitlines()
    assert any(line.split()[:1] == ["4"] and line.split()[-1].isdigit() for line in lines)  # a bits/blocks row
    for key in info["config"]:
        assert any(line.strip().startswith(key + " ") for line in lines), key
