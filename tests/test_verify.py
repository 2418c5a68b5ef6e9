"""duquant_pack.verify: verify_pack on intact and damaged packs, with and without the checkpoint."""

import json

import h5py
import pytest

from duquant_runtime.format import file_sha256
from duquant_pack.synth import write_synth
from duquant_pack.verify import verify_pack, verify_summary


def _manifest(pack):
    return json.loads((pack / "manifest.json").read_text())


def _write_manifest(pack, m):
    (pack / "manifest.json").write_text(json.dumps(m, sort_keys=True, indent=2) + "\n")


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory):
    """Same layout as `synth2`, other weights (seed 1)."""
    d = tmp_path_factory.mktemp("synth2_seed1")
    write_synth(d, "pi05", layers=2, width_div=8, seed=1)
    return d


def test_intact_pack(built_pack):
    assert verify_pack(built_pack) == []


def test_intact_pack_with_its_checkpoint(built_pack, synth2):
    assert verify_pack(built_pack, ckpt=synth2) == []
    assert verify_pack(built_pack, ckpt=synth2 / "model.safetensors") == []


def test_summary(built_pack, synth2, pack_copy):
    s = verify_summary(verify_pack(built_pack, synth2), built_pack, synth2)
    assert s == {"ok": True, "problems": [], "layers_checked": 28, "checked_checkpoint": True}
    (pack_copy / "manifest.json").unlink()
    problems = verify_pack(pack_copy)
    s = verify_summary(problems, pack_copy, None)
    assert s["ok"] is False and s["problems"] == problems and len(problems) == 1
    assert s["layers_checked"] == 0 and s["checked_checkpoint"] is False
    json.dumps(s)


def test_flipped_byte(pack_copy):
    e = _manifest(pack_copy)["layers"][3]
    p = pack_copy / e["file"]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    problems = verify_pack(pack_copy)
    assert len(problems) == 1
    assert "checksum mismatch" in problems[0] and p.name in problems[0] and e["name"] in problems[0]


def test_missing_layer_file(pack_copy):
    e = _manifest(pack_copy)["layers"][0]
    (pack_copy / e["file"]).unlink()
    problems = verify_pack(pack_copy)
    assert any("layer file missing" in line and e["name"] in line for line in problems), problems
    assert not any("stray" in line for line in problems)


def test_config_edited_without_hash(pack_copy):
    m = _manifest(pack_copy)
    m["config"]["block"] = 128
    _write_manifest(pack_copy, m)
    problems = verify_pack(pack_copy)
    assert len(problems) == 1 and "config_hash does not match" in problems[0]


def test_layer_in_features_edited(pack_copy, synth2):
    m = _manifest(pack_copy)
    e = m["layers"][5]
    e["in_features"] *= 2
    _write_manifest(pack_copy, m)
    problems = verify_pack(pack_copy)
    file_name = e["file"].split("/")[1]
    assert any(file_name in line and "r_in" in line for line in problems), problems
    assert any("totals.weights" in line for line in problems), problems
    problems = verify_pack(pack_copy, ckpt=synth2)
    assert any(f"layer '{e['name']}'" in line and "shape" in line for line in problems), problems


@pytest.mark.parametrize("version", [3, 0, "1"])
def test_unknown_format_version(pack_copy, version):
    m = _manifest(pack_copy)
    m["format_version"] = version
    _write_manifest(pack_copy, m)
    problems = verify_pack(pack_copy)
    assert len(problems) == 1 and "format version" in problems[0] and "not supported" in problems[0]


def test_manifest_missing(pack_copy):
    (pack_copy / "manifest.json").unlink()
    problems = verify_pack(pack_copy)
    assert len(problems) == 1 and "no manifest.json" in problems[0]


def test_missing_directory(tmp_path):
    problems = verify_pack(tmp_path / "nope")
    assert len(problems) == 1 and "does not exist" in problems[0]


def test_truncated_manifest(pack_copy):
    p = pack_copy / "manifest.json"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    problems = verify_pack(pack_copy)
    assert len(problems) == 1 and "manifest.json" in problems[0] and "not valid JSON" in problems[0]


def test_non_orthogonal_r_in_with_fixed_checksum(pack_copy):
    m = _manifest(pack_copy)
    e = m["layers"][7]
    p = pack_copy / e["file"]
    with h5py.File(p, "r+") as f:
        r = f["r_in"][()]
        r[0] *= 1.01
        f["r_in"][...] = r
    e["sha256"] = file_sha256(p)
    m["totals"]["layer_bytes"] = sum((pack_copy / x["file"]).stat().st_size for x in m["layers"])
    _write_manifest(pack_copy, m)
    problems = verify_pack(pack_copy)
    assert len(problems) == 1, problems
    assert p.name in problems[0] and "r_in is not orthogonal" in problems[0]


def test_non_orthogonal_r_in_fails_roundtrip_skipped_with_ckpt(pack_copy, synth2):
    """A layer the reader rejects is reported once; the checkpoint checks of the others still pass."""
    m = _manifest(pack_copy)
    e = m["layers"][7]
    p = pack_copy / e["file"]
    with h5py.File(p, "r+") as f:
        r = f["r_in"][()]
        r[0] *= 1.01
        f["r_in"][...] = r
    e["sha256"] = file_sha256(p)
    m["totals"]["layer_bytes"] = sum((pack_copy / x["file"]).stat().st_size for x in m["layers"])
    _write_manifest(pack_copy, m)
    problems = verify_pack(pack_copy, ckpt=synth2)
    assert len(problems) == 1 and "not orthogonal" in problems[0]


def test_other_checkpoint(built_pack, other_ckpt):
    problems = verify_pack(built_pack, ckpt=other_ckpt)
    names = [e["name"] for e in _manifest(built_pack)["layers"]]
    fp_lines = [line for line in problems if "weight fingerprint" in line]
    assert len(fp_lines) == len(names) == 28
    for n in names:
        assert any(f"layer '{n}'" in line for line in fp_lines), n
    # the round trip holds whatever the weights: only identity and fingerprint lines
    assert not any("do not invert" in line for line in problems)
    assert all("weight fingerprint" in line or line.startswith("checkpoint:") for line in problems)


def test_missing_checkpoint(built_pack, tmp_path):
    problems = verify_pack(built_pack, ckpt=tmp_path / "absent")
    assert len(problems) == 1 and problems[0].startswith("checkpoint:") and "no such file" in problems[0]


def test_checkpoint_missing_a_tensor(built_pack, synth2, tmp_path):
    from _util import save_ckpt
    from duquant_pack.checkpoint import Checkpoint
    ck = Checkpoint(synth2)
    names = [e["name"] for e in _manifest(built_pack)["layers"]]
    dropped = names[2] + ".weight"
    save_ckpt(tmp_path, {k: ck.read(k) for k in ck.names() if k != dropped})
    problems = verify_pack(built_pack, ckpt=tmp_path)
    assert any("fingerprint" in line and line.startswith("checkpoint:") for line in problems)
    assert any(f"tensor '{dropped}' not in the checkpoint" in line for line in problems)
    # the same weights, re-saved: every weight fingerprint and round trip still holds
    assert not any("weight fingerprint" in line or "do not invert" in line for line in problems), problems


def test_roundtrip_failure_reported(pack_copy, synth2, monkeypatch):
    """A restore that does not invert the transform is reported with the error value."""
    import duquant_pack.verify as v
    monkeypatch.setattr(v, "restore_weight", lambda w_t, perm, r_in, r_out: w_t)
    problems = verify_pack(pack_copy, ckpt=synth2)
    assert len(problems) == 28 and all("transforms do not invert" in line and "max |" in line for line in problems)


def test_stray_files(pack_copy):
    (pack_copy / "layers" / "junk.h5").write_bytes(b"x")
    (pack_copy / "layers" / ".tmp-123-foo.h5").write_bytes(b"x")
    (pack_copy / "calibration").mkdir()
    (pack_copy / "calibration" / "act_scales.0123456789abcdef.h5").write_bytes(b"x")
    problems = verify_pack(pack_copy)
    assert len(problems) == 2, problems
    assert any("junk.h5" in line and "not referenced" in line for line in problems)
    assert any("act_scales.0123456789abcdef.h5" in line for line in problems)
    # an unfinished rebuild owns the unreferenced files
    (pack_copy / ".pending.json").write_text("{}")
    assert verify_pack(pack_copy) == []


def test_totals_edited(pack_copy):
    m = _manifest(pack_copy)
    m["totals"]["layer_bytes"] += 1
    _write_manifest(pack_copy, m)
    problems = verify_pack(pack_copy)
    assert len(problems) == 1 and "totals.layer_bytes" in problems[0]
