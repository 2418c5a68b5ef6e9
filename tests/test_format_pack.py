"""duquant_runtime.format and duquant_runtime.pack: manifest validation, load_pack, read_layer, verify."""

import json

import h5py
import numpy as np
import pytest
import torch

from duquant_runtime import FORMAT_NAME, FORMAT_VERSION, PackError, load_pack
from duquant_runtime.format import check_relative_path, config_hash, validate_manifest
from duquant_runtime.pack import orthogonality_error, read_layer
from duquant_runtime.transforms import n_blocks
from duquant_pack.writer import write_layer_file
from duquant_runtime.format import file_sha256

from _util import ortho_err, tree_bytes


def _manifest(pack):
    return json.loads((pack / "manifest.json").read_text())


def _flip_byte(f):
    """Corrupt file f in place: one bit of its middle byte flipped."""
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    f.write_bytes(bytes(raw))


def _write_manifest(pack, m):
    (pack / "manifest.json").write_text(json.dumps(m))


def test_intact_pack_loads_and_verifies(built_pack):
    pack = load_pack(built_pack)
    assert pack.verify() == []
    m = pack.manifest
    assert (m["format"], m["format_version"]) == (FORMAT_NAME, FORMAT_VERSION) == ("duquant-pack", 2)
    assert m["config_hash"] == config_hash(m["config"])
    assert len(pack.layer_names) == 28 and m["preset"] == "pi05-llm-expert"
    assert pack.config["block"] == 64 and "Pack(" in repr(pack)


def test_layer_contents(built_pack):
    pack = load_pack(built_pack)
    for lp in pack.layers():
        e = pack.entry(lp.name)
        assert (lp.in_features, lp.out_features, lp.wbits) == (e["in_features"], e["out_features"], 4)
        assert lp.r_in.dtype == torch.float32
        assert lp.r_in.shape == (n_blocks(lp.in_features, lp.block_in), lp.block_in, lp.block_in)
        assert lp.perm.dtype == torch.int64 and torch.equal(lp.perm.sort().values, torch.arange(lp.in_features))
        assert lp.r_out is not None and lp.block_out == min(64, lp.out_features)
        assert lp.weight_scale.shape == (lp.out_features,) and bool((lp.weight_scale > 0).all())
        assert orthogonality_error(lp.r_in) < 1e-5 and orthogonality_error(lp.r_out) < 1e-5
        assert lp.nbytes == sum(t.numel() * t.element_size() for t in (lp.perm, lp.r_in, lp.r_out, lp.weight_scale))


def test_every_stored_rotation_is_orthogonal(built_pack):
    """Independent of the reader's own check: read the HDF5 datasets directly."""
    checked = 0
    for e in _manifest(built_pack)["layers"]:
        with h5py.File(built_pack / e["file"], "r") as f:
            for key in ("r_in", "r_out"):
                r = torch.from_numpy(f[key][()])
                assert r.dtype == torch.float32
                assert ortho_err(r) < 1e-5, (e["name"], key)
                checked += 1
    assert checked == 56


def test_unknown_layer_name(built_pack):
    with pytest.raises(PackError, match="no layer named 'nope'"):
        load_pack(built_pack).layer("nope")


def test_missing_directory(tmp_path):
    with pytest.raises(PackError, match="does not exist"):
        load_pack(tmp_path / "absent")


def test_manifest_missing(pack_copy, tmp_path):
    (pack_copy / "manifest.json").unlink()
    with pytest.raises(PackError, match="no manifest.json.*interrupted build"):
        load_pack(pack_copy)
    (tmp_path / "plain").mkdir()
    with pytest.raises(PackError, match="no manifest.json: not a complete pack$"):
        load_pack(tmp_path / "plain")


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"])
def test_manifest_not_json(pack_copy, text):
    (pack_copy / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(PackError, match="not valid JSON"):
        load_pack(pack_copy)


def test_manifest_not_an_object(pack_copy):
    (pack_copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(PackError, match="not a JSON object"):
        load_pack(pack_copy)


@pytest.mark.parametrize("version", [3, 0, "1", None])
def test_unknown_format_version(pack_copy, version):
    m = _manifest(pack_copy)
    m["format_version"] = version
    _write_manifest(pack_copy, m)
    with pytest.raises(PackError, match="format version .* is not supported"):
        load_pack(pack_copy)


def test_wrong_format_name(pack_copy):
    m = _manifest(pack_copy)
    m["format"] = "other"
    _write_manifest(pack_copy, m)
    with pytest.raises(PackError, match="format is 'other'"):
        load_pack(pack_copy)


def test_config_hash_mismatch(pack_copy):
    m = _manifest(pack_copy)
    m["config"]["wbits"] = 8  # edited config, hash left alone
    _write_manifest(pack_copy, m)
    with pytest.raises(PackError, match="config_hash does not match"):
        load_pack(pack_copy)


@pytest.mark.parametrize("bad", ["NaN", "Infinity"])
def test_non_finite_number_in_config_is_a_pack_error(pack_copy, bad):
    text = (pack_copy / "manifest.json").read_text()
    text = text.replace('"act_percentile": 99.9', f'"act_percentile": {bad}', 1)
    assert bad in text
    (pack_copy / "manifest.json").write_text(text)
    with pytest.raises(PackError, match="manifest.json"):
        load_pack(pack_copy)


@pytest.mark.parametrize("field,value,match", [("wbits", 1, "wbits"), ("wbits", 16, "wbits"),
                                               ("sha256", "z" * 64, "hex digest"),
                                               ("block_out", 0, "block_out"), ("block_out", True, "block_out")])
def test_bad_layer_field_values(pack_copy, field, value, match):
    m = _manifest(pack_copy)
    m["layers"][2][field] = value
    _write_manifest(pack_copy, m)
    with pytest.raises(PackError, match=match):
        load_pack(pack_copy)


def test_checkpoint_fingerprint_required(pack_copy):
    m = _manifest(pack_copy)
    m["checkpoint"] = {}
    _write_manifest(pack_copy, m)
    with pytest.raises(PackError, match="checkpoint"):
        load_pack(pack_copy)


def test_missing_manifest_field(pack_copy):
    m = _manifest(pack_copy)
    del m["layers"][3]["sha256"]
    _write_manifest(pack_copy, m)
    with pytest.raises(PackError, match=r"layers\[3\]: missing field 'sha256'"):
        load_pack(pack_copy)


def test_duplicate_layer_and_bad_types(pack_copy):
    m = _manifest(pack_copy)
    m2 = json.loads(json.dumps(m))
    m2["layers"][1]["name"] = m2["layers"][0]["name"]
    _write_manifest(pack_copy, m2)
    with pytest.raises(PackError, match="listed twice"):
        load_pack(pack_copy)
    m3 = json.loads(json.dumps(m))
    m3["layers"][0]["in_features"] = True
    _write_manifest(pack_copy, m3)
    with pytest.raises(PackError, match="must be an integer"):
        load_pack(pack_copy)
    m4 = json.loads(json.dumps(m))
    m4["layers"][0]["block_in"] = 0
    _write_manifest(pack_copy, m4)
    with pytest.raises(PackError, match="block_in must be positive"):
        load_pack(pack_copy)


@pytest.mark.parametrize("rel", ["../outside.h5", "/etc/passwd", "layers/../manifest.json", "other/x.h5",
                                 "layers/sub/x.h5", "C:/x.h5", "layers//x.h5"])
def test_layer_paths_must_stay_in_layers_dir(pack_copy, rel):
    m = _manifest(pack_copy)
    m["layers"][0]["file"] = rel
    _write_manifest(pack_copy, m)
    with pytest.raises(PackError, match="file path"):
        load_pack(pack_copy)
    with pytest.raises(PackError):
        check_relative_path(rel, "x")


def test_flipped_byte_in_layer_file(pack_copy):
    pack = load_pack(pack_copy)
    name = pack.layer_names[5]
    f = pack_copy / pack.entry(name)["file"]
    _flip_byte(f)
    with pytest.raises(PackError, match="checksum mismatch.*" + name.replace(".", r"\.")):
        pack.layer(name)
    problems = pack.verify()
    assert len(problems) == 1 and "checksum mismatch" in problems[0] and name in problems[0]
    pack.layer(pack.layer_names[0])  # the other layers still read fine


def test_layer_file_missing(pack_copy):
    pack = load_pack(pack_copy)
    name = pack.layer_names[-1]
    (pack_copy / pack.entry(name)["file"]).unlink()
    with pytest.raises(PackError, match=f"layer file missing \\(layer '{name}'\\)"):
        pack.layer(name)
    problems = load_pack(pack_copy).verify()
    assert len(problems) == 1 and "missing" in problems[0]


def test_symlink_out_of_pack_refused(pack_copy, tmp_path):
    pack = load_pack(pack_copy)
    e = pack.entry(pack.layer_names[0])
    target = tmp_path / "elsewhere.h5"
    (pack_copy / e["file"]).rename(target)
    (pack_copy / e["file"]).symlink_to(target)
    with pytest.raises(PackError, match="outside the pack"):
        pack.layer(e["name"])


def _rewrite_layer(pack_dir, entry, **arrays):
    """Rewrite a layer file with other arrays and fix the manifest's sha256 so only the content checks fire."""
    path = pack_dir / entry["file"]
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f.keys()}
        attrs = dict(f.attrs)
    data.update(arrays)
    write_layer_file(path, name=entry["name"], layer_key=attrs["layer_key"],
                     weight_fingerprint=attrs["weight_fingerprint"], perm=data.get("perm"), r_in=data["r_in"],
                     r_out=data.get("r_out"), weight_scale=data.get("weight_scale"), entry_json=attrs["entry"])
    m = _manifest(pack_dir)
    for e in m["layers"]:
        if e["name"] == entry["name"]:
            e["sha256"] = file_sha256(path)
    _write_manifest(pack_dir, m)
    return load_pack(pack_dir)


def test_reader_content_checks(pack_copy):
    pack = load_pack(pack_copy)
    e = pack.entry(pack.layer_names[0])
    lp = pack.layer(e["name"])
    r_in = lp.r_in.numpy().copy()
    r_in[0, 0, 0] += 1e-3
    with pytest.raises(PackError, match="r_in is not orthogonal"):
        _rewrite_layer(pack_copy, e, r_in=r_in).layer(e["name"])
    perm = lp.perm.numpy().astype(np.int32).copy()
    perm[0] = perm[1]
    with pytest.raises(PackError, match="not a permutation"):
        _rewrite_layer(pack_copy, e, r_in=lp.r_in.numpy(), perm=perm).layer(e["name"])
    scale = lp.weight_scale.numpy().copy()
    scale[0] = -1
    with pytest.raises(PackError, match="non-positive"):
        _rewrite_layer(pack_copy, e, perm=lp.perm.numpy().astype(np.int32), weight_scale=scale).layer(e["name"])
    with pytest.raises(PackError, match="r_out must be float32"):
        _rewrite_layer(pack_copy, e, weight_scale=lp.weight_scale.numpy(),
                       r_out=np.stack([np.eye(3, dtype=np.float32)])).layer(e["name"])


def test_reader_checks_partial_block_layout(tmp_path):
    """A hand-made one-layer pack: in=20 with block_in=16 (tail 4)."""
    pack = tmp_path / "p"
    (pack / "layers").mkdir(parents=True)
    r_in = np.stack([np.eye(16, dtype=np.float32)] * 2)
    r_in[1, :4, :4] = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    path = pack / "layers" / "x.h5"

    def make(r):
        write_layer_file(path, name="x", layer_key="k", weight_fingerprint="f", perm=None, r_in=r, r_out=None,
                         weight_scale=None, entry_json="{}")
        config = {"a": 1}
        m = {"format": "duquant-pack", "format_version": 1, "tool": {}, "preset": None, "config": config,
             "config_hash": config_hash(config), "checkpoint": {"sha256": "0" * 64, "files": []}, "totals": {},
             "layers": [{"name": "x", "file": "layers/x.h5", "sha256": file_sha256(path), "in_features": 20,
                         "out_features": 5, "wbits": 0, "block_in": 16, "block_out": None, "permuted": False,
                         "weight_fingerprint": "f", "layer_key": "k", "source_dtype": "F32", "stats": {}}]}
        _write_manifest(pack, m)
        return load_pack(pack)

    lp = make(r_in).layer("x")
    assert lp.perm is None and lp.r_out is None and lp.weight_scale is None
    bad = r_in.copy()
    bad[1, 4:, 4:] = np.eye(12, dtype=np.float32)[::-1]  # orthogonal, but not identity outside the corner
    with pytest.raises(PackError, match="identity outside its 4x4 corner"):
        make(bad).layer("x")


def test_validate_manifest_is_pure(built_pack):
    m = _manifest(built_pack)
    before = json.dumps(m, sort_keys=True)
    assert validate_manifest(m) is m
    assert json.dumps(m, sort_keys=True) == before


def test_reading_does_not_modify_the_pack(built_pack):
    before = tree_bytes(built_pack)
    pack = load_pack(built_pack)
    list(pack.layers())
    pack.verify()
    assert tree_bytes(built_pack) == before


def test_read_layer_function(built_pack):
    m = _manifest(built_pack)
    lp = read_layer(built_pack, m["layers"][0])
    assert lp.name == m["layers"][0]["name"] and lp.meta == m["layers"][0]


def _same_layer(a, b):
    assert a.name == b.name and a.meta == b.meta
    for key in ("perm", "r_in", "r_out", "weight_scale", "smooth", "qweight"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None and y is None) or torch.equal(x, y), key


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_read_layers_equals_reading_one_by_one(built_pack, workers):
    pack = load_pack(built_pack)
    names = pack.layer_names[::-1]  # any order, returned in that order
    layers = pack.read_layers(names, workers=workers)
    assert [lp.name for lp in layers] == names
    for lp, name in zip(layers, names):
        _same_layer(lp, pack.layer(name))
    assert pack.read_layers([], workers=workers) == []


def test_read_layers_raises_the_first_failing_layer_in_order(pack_copy):
    pack = load_pack(pack_copy)
    names = pack.layer_names
    for i in (3, 7):  # two corrupt files: the error names the earlier one, as a loop would
        _flip_byte(pack_copy / pack.entry(names[i])["file"])
    for workers in (1, 4):
        with pytest.raises(PackError, match="checksum mismatch.*" + names[3].replace(".", r"\.")):
            pack.read_layers(names, workers=workers)
    with pytest.raises(PackError, match="checksum mismatch.*" + names[7].replace(".", r"\.")):
        pack.read_layers(names[4:], workers=4)


def test_verify_lists_every_bad_layer_in_manifest_order(pack_copy):
    pack = load_pack(pack_copy)
    names = pack.layer_names
    (pack_copy / pack.entry(names[9])["file"]).unlink()
    f = pack_copy / pack.entry(names[2])["file"]
    _flip_byte(f)
    problems = load_pack(pack_copy).verify()
    assert len(problems) == 2
    assert "checksum mismatch" in problems[0] and names[2] in problems[0]
    assert "missing" in problems[1] and names[9] in problems[1]
