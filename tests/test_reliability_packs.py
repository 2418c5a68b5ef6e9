"""Reliability: damaged packs (docs/reliability.md §2).

Every case damages a copy of a small, valid pack (tests/_reliability_util.py: four layers with
partial blocks, output rotations, 0/3/4/8 bits and stored integers). Layer-file damage is followed
by fixing the manifest's checksums, so that the content check under test fires rather than the
checksum. For each case:
  - `verify_pack` (the API) reports it, in a line naming the manifest or the layer file;
  - `duquant-pack verify` exits 1 and prints the same lines, with no traceback;
  - `apply_pack` raises `PackError` before touching the model: its state_dict, module types and
    module identities are unchanged afterwards.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from duquant_pack.verify import verify_pack
from duquant_runtime import PackError, apply_pack, load_pack

from _reliability_util import (SMALL_NAMES, assert_one_line_error, assert_unchanged, build_small_pack, entry,
                               fix_checksums, model_from_tensors, read_manifest, replace_dataset, rewrite_layer,
                               run_cli, small_tensors, snapshot, write_manifest)

Q, D, O, U = "net.a.q_proj", "net.a.down_proj", "net.b.o_proj", "net.b.up_proj"  # 4, 3, 8 bits, unquantized


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    build_small_pack(d / "ckpt", d / "pack")
    assert load_pack(d / "pack").verify() == []
    return d


@pytest.fixture
def pack(small, tmp_path):
    dst = tmp_path / "pack"
    shutil.copytree(small / "pack", dst, symlinks=True)
    return dst


def _file(pack, name):
    return re.escape(Path(entry(pack, name)["file"]).name)


# --- manifest damage -------------------------------------------------------------------------------

def _text(data: bytes):
    def damage(pack):
        (pack / "manifest.json").write_bytes(data)
        return r"manifest\.json: not valid JSON"
    return damage


def _truncated_manifest(pack):
    p = pack / "manifest.json"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return r"manifest\.json: not valid JSON \(JSONDecodeError"


def _manifest_missing(pack):
    (pack / "manifest.json").unlink()
    return r"no manifest\.json: not a complete pack"


def _manifest_array(pack):
    (pack / "manifest.json").write_text("[]")
    return r"manifest\.json: not a JSON object"


def _edit(fn, pattern, name=Q):
    """Edit the manifest with fn(manifest); '{file}' in the pattern is the file name of layer `name`."""
    def damage(pack):
        file = _file(pack, name)
        m = read_manifest(pack)
        fn(m)
        write_manifest(pack, m)
        return pattern.replace("{file}", file)
    return damage


def _version(v):
    return _edit(lambda m: m.__setitem__("format_version", v),
                 r"manifest\.json: format version .* is not supported by this reader \(supports 1, 2\); upgrade")


def _manifest_symlink_outside(pack):
    outside = pack.parent / "elsewhere.json"
    (pack / "manifest.json").rename(outside)
    (pack / "manifest.json").symlink_to(outside)
    return r"manifest\.json: resolves outside the pack directory"


def _set_layer(name, key, value):
    def fn(m):
        next(e for e in m["layers"] if e["name"] == name)[key] = value
    return fn


def _del_layer_key(name, key):
    def fn(m):
        del next(e for e in m["layers"] if e["name"] == name)[key]
    return fn


# --- layer file damage -----------------------------------------------------------------------------

def _layer_missing(pack):
    (pack / entry(pack, O)["file"]).unlink()
    return rf"{_file(pack, O)}: layer file missing \(layer '{re.escape(O)}'\)"


def _flipped_byte(pack):
    p = pack / entry(pack, Q)["file"]
    raw = bytearray(p.read_bytes())
    with h5py.File(p, "r") as f:
        off = f["r_in"].id.get_offset()
    raw[off + 100] ^= 0x01
    p.write_bytes(bytes(raw))
    return rf"{_file(pack, Q)}: checksum mismatch \(file changed or corrupt; layer '{re.escape(Q)}'\)"


def _truncated_layer(pack):
    p = pack / entry(pack, D)["file"]
    p.write_bytes(p.read_bytes()[:4000])
    return rf"{_file(pack, D)}: checksum mismatch"


def _truncated_layer_fixed_sum(pack):
    p = pack / entry(pack, D)["file"]
    p.write_bytes(p.read_bytes()[:4000])
    fix_checksums(pack)
    return rf"{_file(pack, D)}: unreadable HDF5 layer file"


def _layer(name, mutate, pattern):
    def damage(pack):
        rewrite_layer(pack, name, mutate)
        return rf"{_file(pack, name)}: {pattern}"
    return damage


def _scaled(key, factor, index=(0,)):
    def mutate(f):
        a = f[key][()]
        a[index] *= np.float32(factor)
        f[key][...] = a
    return mutate


def _set_value(key, index, value):
    def mutate(f):
        a = f[key][()]
        a[index] = value
        f[key][...] = a
    return mutate


def _retyped(key, dtype):
    return lambda f: replace_dataset(f, key, f[key][()].astype(dtype))


def _reshaped(key, fn):
    return lambda f: replace_dataset(f, key, fn(f[key][()]))


def _tail_not_identity(f):
    r = f["r_in"][()]
    r[-1, 9:, 9:] = np.eye(7, dtype=np.float32)[::-1]  # orthogonal, but not the identity outside the 9x9 corner
    f["r_in"][...] = r


def _qweight_padding(f):
    q = f["qweight"][()]
    q[0, -1] |= 0x10  # in_features 41: the last byte's high nibble is padding
    f["qweight"][...] = q


def _qweight_out_of_range(f):
    q = f["qweight"][()]
    q[...] = 0x77  # every code 7: inside 4 bits, outside the 3-bit range
    f["qweight"][...] = q


def _qweight_on_unquantized(pack):
    rewrite_layer(pack, U, lambda f: f.create_dataset("qweight", data=np.zeros((32, 32), np.int8)))
    m = read_manifest(pack)
    _set_layer(U, "qweight", True)(m)
    write_manifest(pack, m)
    return rf"{_file(pack, U)}: stored integers for a layer that is not quantized"


def _with_group(f):
    f.create_group("extra_group")


def _string_dataset(f):
    del f["weight_scale"]
    f.create_dataset("weight_scale", data=np.array([b"x"] * 24))


def _external_link(pack):
    other = pack.parent / "outside.h5"
    p = pack / entry(pack, Q)["file"]
    with h5py.File(p, "r") as f, h5py.File(other, "w") as g:
        g.create_dataset("r_in", data=f["r_in"][()])
    rewrite_layer(pack, Q, lambda f: (f.__delitem__("r_in"), f.__setitem__("r_in", h5py.ExternalLink(str(other), "r_in"))))
    return rf"{_file(pack, Q)}: 'r_in' is a link, not a dataset stored in the file"


def _external_storage(pack):
    raw = pack.parent / "outside.bin"
    p = pack / entry(pack, Q)["file"]
    with h5py.File(p, "r") as f:
        r = f["r_in"][()]
    raw.write_bytes(r.astype("<f4").tobytes())

    def mutate(f):
        del f["r_in"]
        f.create_dataset("r_in", shape=r.shape, dtype="<f4", external=[(str(raw), 0, r.nbytes)])
    rewrite_layer(pack, Q, mutate)
    return rf"{_file(pack, Q)}: dataset 'r_in' keeps its data outside the file"


def _soft_link(pack):
    rewrite_layer(pack, U, lambda f: (f.__delitem__("r_out"), f.__setitem__("r_out", h5py.SoftLink("/r_in"))))
    return rf"{_file(pack, U)}: 'r_out' is a link"


def _symlink_outside(pack):
    e = entry(pack, Q)
    outside = pack.parent / "stolen.h5"
    (pack / e["file"]).rename(outside)
    (pack / e["file"]).symlink_to(outside)
    return rf"{_file(pack, Q)}: resolves outside the pack directory"


def _layers_dir_symlink_outside(pack):
    outside = pack.parent / "layers-elsewhere"
    (pack / "layers").rename(outside)
    (pack / "layers").symlink_to(outside, target_is_directory=True)
    return r"resolves outside the pack directory"


def _path(rel):
    return _edit(_set_layer(Q, "file", rel), rf"file path {re.escape(repr(rel))} is not")


CASES = {
    # manifest
    "manifest missing": (_manifest_missing, None),
    "manifest truncated": (_truncated_manifest, None),
    "manifest empty": (_text(b""), None),
    "manifest binary garbage": (_text(b"\x89HDF\r\n\x1a\n\x00\xff\xfe"), None),
    "manifest a JSON array": (_manifest_array, None),
    "manifest nested 100000 deep": (_text(b"[" * 100000), None),
    "manifest number of 5000 digits": (_text(b'{"format": ' + b"9" * 5000 + b"}"), None),
    "manifest symlink outside the pack": (_manifest_symlink_outside, None),
    "format version 3": (_version(3), None),
    "format version 0": (_version(0), None),
    "format version '2' (a string)": (_version("2"), None),
    "format version missing": (_edit(lambda m: m.pop("format_version"), r"format version None is not supported"), None),
    "format name wrong": (_edit(lambda m: m.__setitem__("format", "other-pack"), r"format is 'other-pack'"), None),
    "config edited, hash kept": (_edit(lambda m: m["config"].__setitem__("wbits", 8),
                                       r"config_hash does not match its config"), None),
    "config_hash edited": (_edit(lambda m: m.__setitem__("config_hash", "sha256:" + "0" * 64),
                                 r"config_hash does not match its config"), None),
    "layer entry field missing": (_edit(_del_layer_key(Q, "sha256"), r"layers\[1\]: missing field 'sha256'"), None),
    "layer entry field of wrong type": (_edit(_set_layer(Q, "in_features", "41"),
                                              r"field 'in_features' has the wrong type \(str\)"), None),
    "qweight flag of wrong type": (_edit(_set_layer(Q, "qweight", "yes"), r"field 'qweight' has the wrong type"), None),
    "layer listed twice": (_edit(lambda m: m["layers"].append(dict(m["layers"][0])), r"listed twice"), None),
    "layer path with ..": (_path("layers/../manifest.json"), None),
    "absolute layer path": (_path("/etc/passwd"), None),
    "layer path outside layers/": (_path("calibration/x.h5"), None),
    # layer files
    "layer file missing": (_layer_missing, None),
    "flipped byte in a layer file": (_flipped_byte, None),
    "layer file truncated": (_truncated_layer, None),
    "layer file truncated, checksum fixed": (_truncated_layer_fixed_sum, None),
    "extra dataset": (_layer(Q, lambda f: f.create_dataset("bias", data=np.zeros(24, np.float32)),
                             r"unexpected datasets \['bias'\]"), None),
    "extra group": (_layer(Q, _with_group, r"unexpected datasets \['extra_group'\]"), None),
    "r_in float64": (_layer(Q, _retyped("r_in", np.float64), r"r_in must be float32 \(3, 16, 16\), got float64"), None),
    "r_out float16": (_layer(O, _retyped("r_out", np.float16), r"r_out must be float32 \(2, 16, 16\), got float16"), None),
    "perm float32": (_layer(Q, _retyped("perm", np.float32), r"perm must be integer \(41,\), got float32"), None),
    "weight_scale float64": (_layer(O, _retyped("weight_scale", np.float64), r"weight_scale must be float32"), None),
    "weight_scale strings": (_layer(Q, _string_dataset, r"dataset 'weight_scale' has non-numeric dtype"), None),
    "r_in missing": (_layer(O, lambda f: f.__delitem__("r_in"), r"missing dataset 'r_in'"), None),
    "weight_scale missing": (_layer(O, lambda f: f.__delitem__("weight_scale"), r"missing dataset 'weight_scale'"), None),
    "NaN in r_in": (_layer(Q, _set_value("r_in", (1, 2, 3), np.nan), r"r_in has NaN or Inf"), None),
    "Inf in r_out": (_layer(D, _set_value("r_out", (0, 0, 0), np.inf), r"r_out has NaN or Inf"), None),
    "NaN in weight_scale": (_layer(Q, _set_value("weight_scale", 3, np.nan), r"weight_scale has non-finite"), None),
    "zero weight_scale": (_layer(O, _set_value("weight_scale", 0, 0.0), r"weight_scale has non-finite or non-positive"), None),
    "non-orthogonal r_in": (_layer(Q, _scaled("r_in", 1.001), r"r_in is not orthogonal \(max \|R\^T R - I\|"), None),
    "non-orthogonal r_out": (_layer(U, _scaled("r_out", 0.999, (1,)), r"r_out is not orthogonal"), None),
    "partial block not identity outside its corner": (_layer(Q, _tail_not_identity,
                                                            r"r_in last block must be identity outside its 9x9 corner"), None),
    "perm with a duplicate index": (_layer(O, _set_value("perm", 0, 5), r"perm is not a permutation of 0\.\.47"), None),
    "perm index out of range": (_layer(O, _set_value("perm", 0, 48), r"perm is not a permutation of 0\.\.47"), None),
    "perm negative index": (_layer(O, _set_value("perm", 3, -1), r"perm is not a permutation"), None),
    "r_in one block short": (_layer(Q, _reshaped("r_in", lambda r: r[:2]),
                                    r"r_in must be float32 \(3, 16, 16\), got float32 \(2, 16, 16\)"), None),
    "weight_scale too long": (_layer(D, _reshaped("weight_scale", lambda s: np.concatenate([s, s[:1]])),
                                     r"weight_scale must be float32 \(41,\), got float32 \(42,\)"), None),
    "perm shorter than in_features": (_layer(O, _reshaped("perm", lambda p: p[:-1]), r"perm must be integer \(48,\)"), None),
    "manifest in_features disagrees with the file": (
        _edit(_set_layer(O, "in_features", 64), r"{file}: r_in must be float32 \(4, 16, 16\)", O),
        r"module 'net\.b\.o_proj' has weight \[20, 48\], pack layer expects \[20, 64\]"),
    "manifest block_in disagrees with the file": (_edit(_set_layer(O, "block_in", 8), r"{file}: r_in must be float32 \(6, 8, 8\)", O), None),
    "manifest says not permuted, file has perm": (_edit(_set_layer(O, "permuted", False),
                                                        r"{file}: dataset 'perm' present but manifest says not permuted", O), None),
    "manifest says no r_out, file has one": (_edit(_set_layer(U, "block_out", None),
                                                   r"{file}: dataset 'r_out' present but manifest has no output rotation", U), None),
    "manifest wbits 0, file has weight_scale": (_edit(_set_layer(O, "wbits", 0), r"dataset 'weight_scale' present"), None),
    # stored integers (format v2 qweight)
    "qweight missing, manifest lists it": (_layer(Q, lambda f: f.__delitem__("qweight"),
                                                  r"missing dataset 'qweight' \(manifest says the integers are stored\)"), None),
    "qweight present, manifest does not list it": (_edit(_del_layer_key(Q, "qweight"),
                                                         r"{file}: dataset 'qweight' present but the manifest does not list it"), None),
    "qweight int8 for 4 bits": (_layer(Q, _retyped("qweight", np.int8), r"qweight must be uint8 \(24, 21\) for wbits=4, got int8"), None),
    "qweight one column short": (_layer(O, _reshaped("qweight", lambda q: q[:, :-1]),
                                        r"qweight must be int8 \(20, 48\) for wbits=8, got int8 \(20, 47\)"), None),
    "qweight padding nibble set": (_layer(Q, _qweight_padding, r"qweight padding nibbles are not zero"), None),
    "qweight outside the 3-bit range": (_layer(D, _qweight_out_of_range, r"qweight values outside the 3-bit range \[-4, 3\]"), None),
    "qweight on an unquantized layer": (_qweight_on_unquantized, None),
    # links and paths out of the pack
    "symlinked layer file outside the pack": (_symlink_outside, None),
    "layers/ symlinked outside the pack": (_layers_dir_symlink_outside, None),
    "HDF5 external link": (_external_link, None),
    "HDF5 external raw storage": (_external_storage, None),
    "HDF5 soft link": (_soft_link, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_pack_reported_and_refused(case, pack):
    damage, apply_pattern = CASES[case]
    pattern = damage(pack)
    # verify (API): one line per problem, one of them naming this one
    problems = verify_pack(pack)
    assert problems and any(re.search(pattern, line) for line in problems), (pattern, problems)
    assert all("\n" not in line and "verifying the layer files failed" not in line for line in problems)
    # duquant-pack verify: exit 1, the same lines on stdout, nothing on stderr
    rc, out, err = run_cli(["verify", str(pack)])
    assert rc == 1 and err == "" and "Traceback" not in out
    assert out.splitlines() == [" ".join(line.split()) for line in problems]
    # apply_pack: PackError before the model is touched
    model = model_from_tensors(small_tensors())
    snap = snapshot(model)
    with pytest.raises(PackError) as ei:
        apply_pack(model, pack)
    assert "\n" not in str(ei.value)
    assert re.search(apply_pattern or pattern, str(ei.value)), (apply_pattern or pattern, str(ei.value))
    assert_unchanged(model, snap)


def test_intact_pack_applies(small):
    """The control: the undamaged pack verifies and replaces all four layers."""
    model = model_from_tensors(small_tensors())
    assert verify_pack(small / "pack", ckpt=small / "ckpt") == []
    report = apply_pack(model, small / "pack")
    assert sorted(report.replaced) == sorted(SMALL_NAMES)


def test_each_damaged_layer_is_reported_separately(pack):
    """Two damaged layers give two lines; the intact layers give none."""
    _layer(O, _set_value("perm", 0, 5), "")(pack)  # fixes the checksums: damage this one first
    _flipped_byte(pack)
    problems = verify_pack(pack)
    assert len(problems) == 2, problems
    assert sum("checksum mismatch" in p for p in problems) == 1
    assert sum("not a permutation" in p for p in problems) == 1


# --- legacy import: pickled content ---------------------------------------------------------------

def _npy_bytes_object_array(payload: bytes) -> bytes:
    """A version-1.0 .npy file of dtype object holding `payload` as its pickle (written by hand)."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + payload


@pytest.mark.parametrize("kind", ["npz with an object array", "npy with an object array"])
def test_import_legacy_refuses_pickled_content(kind, small, tmp_path):
    """The pickle would create a marker file if it were ever unpickled; it must not exist afterwards."""
    marker = tmp_path / "UNPICKLED"
    payload = b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    bad = legacy / f"{Q}.npz"
    if kind.startswith("npz"):
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("meta.npy", _npy_bytes_object_array(payload))
            z.writestr("weight_scale.npy", _npy_bytes_object_array(payload))
    else:
        bad.write_bytes(_npy_bytes_object_array(payload))
    out = tmp_path / "out" / "pack"
    rc, stdout, stderr = run_cli(["import-legacy", str(legacy), "--ckpt", str(small / "ckpt"), "--out", str(out)])
    line = assert_one_line_error(rc, stdout, stderr)
    assert rc == 1 and bad.name in line
    assert ("pickled" in line) if kind.startswith("npz") else ("single .npy array" in line)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_import_legacy_pickled_content_keeps_previous_pack(small, tmp_path):
    """With --overwrite over an existing pack, the refused import leaves it byte for byte."""
    from _reliability_util import tree_bytes
    out = tmp_path / "pack"
    shutil.copytree(small / "pack", out)
    before = tree_bytes(out)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    np.savez(legacy / f"{Q}.npz", meta=np.array([{"in_features": 41}], dtype=object))  # numpy pickles it
    rc, stdout, stderr = run_cli(["import-legacy", str(legacy), "--ckpt", str(small / "ckpt"), "--out", str(out),
                                  "--overwrite"])
    line = assert_one_line_error(rc, stdout, stderr)
    assert "pickled" in line
    assert tree_bytes(out) == before and load_pack(out).verify() == []
