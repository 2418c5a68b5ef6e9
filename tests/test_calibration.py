"""duquant_runtime.calibration: saved static activation scales (save_calibration, apply_pack, the reader,
and what a rebuild does with them)."""

import copy
import fcntl
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_runtime import DuQuantLinear, PackError, apply_pack, load_pack, save_calibration
from duquant_runtime.format import file_sha256

from _util import save_ckpt, tree_bytes

PREFIX = "paligemma_with_expert.gemma_expert.model.layers"
# in the pack's (natural name) order
NAMES = [f"{PREFIX}.{i}.{p}" for i in range(2) for p in ("mlp.down_proj", "mlp.up_proj", "self_attn.q_proj")]
CFG = dict(wbits=4, abits=8, block=16, row_rot="restore", calib_steps=3, act_percentile=99.0, include=r"proj$")


class Block(nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(d, h, bias=False)
        self.mlp.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        x = x + self.self_attn.q_proj(x)
        return x + self.mlp.down_proj(nn.functional.gelu(self.mlp.up_proj(x)))


class Chain(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.paligemma_with_expert = nn.Module()
        self.paligemma_with_expert.gemma_expert = nn.Module()
        self.paligemma_with_expert.gemma_expert.model = nn.Module()
        self.paligemma_with_expert.gemma_expert.model.layers = nn.ModuleList([Block(), Block()])

    @property
    def blocks(self):
        return self.paligemma_with_expert.gemma_expert.model.layers

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(2, 16, 64, generator=g)
        x[..., 3] *= 20  # an outlier channel
        out.append(x)
    return out


def _dq(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, DuQuantLinear)}


def _build(model, ckpt_dir, out, **over):
    save_ckpt(ckpt_dir, {n + ".weight": m.weight.detach() for n, m in model.named_modules()
                         if isinstance(m, nn.Linear)})
    cfg = resolve(None, **dict(CFG, **over))[0]
    build_pack(ckpt_dir, out, cfg, jobs=1, progress=False, overwrite=True)
    return out


@pytest.fixture(scope="module")
def chain():
    return Chain()


@pytest.fixture(scope="module")
def base_pack(chain, tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    return _build(chain, d / "ckpt", d / "pack")


@pytest.fixture
def pack(base_pack, tmp_path):
    dst = tmp_path / "pack"
    shutil.copytree(base_pack, dst)
    return dst


def _calibrated(chain, pack, steps=3):
    model = copy.deepcopy(chain)
    apply_pack(model, pack)
    with torch.no_grad():
        for x in _batches(steps, seed=10):
            model(x)
    return model


def _manifest(pack):
    return json.loads((pack / "manifest.json").read_text())


# --- the round trip --------------------------------------------------------------------------------

def test_saved_scales_reproduce_the_calibrated_model(chain, pack):
    model = _calibrated(chain, pack)
    assert all(not m.calibrating and m.act_scale is not None for m in _dq(model).values())
    before = _manifest(pack)
    cal = save_calibration(model, pack)
    after = _manifest(pack)
    assert cal == after["calibration"]
    assert (after["config"], after["config_hash"], after["layers"]) == \
        (before["config"], before["config_hash"], before["layers"])
    assert {k: v for k, v in after.items() if k != "calibration"} == before
    sha = file_sha256(pack / cal["file"])
    assert cal == {"file": f"calibration/act_scales.{sha[:16]}.h5", "sha256": sha, "layers": 6, "abits": 8,
                   "act_percentile": 99.0, "calib_steps": 3, "act_mode": "static"}
    p = load_pack(pack)
    assert p.verify() == []
    scales = p.calibration_scales()
    assert list(scales) == NAMES
    for name, mod in _dq(model).items():
        assert torch.equal(scales[name], mod.act_scale)

    fresh = copy.deepcopy(chain)
    report = apply_pack(fresh, pack)
    assert report.calibrated == 6 and len(report.replaced) == 6 and report.warnings == []
    assert "6 with saved activation scales" in report.summary()
    assert all(not m.calibrating for m in _dq(fresh).values())
    with torch.no_grad():
        for x in _batches(3, seed=99):  # new inputs: no calibration happens in `fresh`
            assert torch.equal(fresh(x), model(x))
    # and they are quantized: not equal to the float model
    with torch.no_grad():
        x = _batches(1, seed=7)[0]
        assert not torch.allclose(fresh(x), chain(x), atol=1e-4)


def test_saving_is_deterministic_and_keeps_one_file(chain, pack, base_pack, tmp_path):
    model = _calibrated(chain, pack)
    save_calibration(model, pack)
    first = tree_bytes(pack)
    save_calibration(model, pack)
    assert tree_bytes(pack) == first
    other = tmp_path / "other"
    shutil.copytree(pack, other)
    # other scales (calibrated from the same, uncalibrated pack on other data): a new file replaces the old
    model2 = copy.deepcopy(chain)
    assert apply_pack(model2, base_pack).calibrated == 0
    with torch.no_grad():
        for x in _batches(3, seed=11):
            model2(x)
    cal2 = save_calibration(model2, pack)
    assert [p.name for p in (pack / "calibration").iterdir()] == [cal2["file"].split("/")[1]]
    assert cal2["file"] != _manifest(other)["calibration"]["file"]
    assert not list(pack.glob(".tmp-*")) and not list((pack / "calibration").glob(".tmp-*"))


def test_layers_without_layer_key_attribute_are_checked_against_the_pack(chain, pack):
    model = _calibrated(chain, pack)
    for m in _dq(model).values():
        del m.layer_key  # as built by DuQuantLinear.from_linear directly
    assert save_calibration(model, pack)["layers"] == 6


# --- partial calibration ---------------------------------------------------------------------------

def test_uncalibrated_layers_are_named_unless_partial(chain, pack):
    model = copy.deepcopy(chain)
    apply_pack(model, pack)
    with torch.no_grad():
        for x in _batches(3, seed=10):
            model.blocks[0](x)  # only block 0 sees data
    with pytest.raises(PackError, match=r"3 layer\(s\) still calibrating: .*layers\.1\.self_attn\.q_proj \(0/3 calls\)"):
        save_calibration(model, pack)
    assert "calibration" not in _manifest(pack)
    cal = save_calibration(model, pack, partial=True)
    assert cal["layers"] == 3 and list(load_pack(pack).calibration_scales()) == NAMES[:3]
    fresh = copy.deepcopy(chain)
    report = apply_pack(fresh, pack)
    assert report.calibrated == 3
    assert sorted(n for n, m in _dq(fresh).items() if m.calibrating) == NAMES[3:]


def test_nothing_to_save(chain, pack):
    with pytest.raises(PackError, match="no static-mode DuQuantLinear"):
        save_calibration(copy.deepcopy(chain), pack)
    dyn = copy.deepcopy(chain)
    apply_pack(dyn, pack, act_mode="dynamic")
    with pytest.raises(PackError, match="nothing to calibrate"):
        save_calibration(dyn, pack)
    fresh = copy.deepcopy(chain)
    apply_pack(fresh, pack)
    with pytest.raises(PackError, match="no layer has finished calibrating"):
        save_calibration(fresh, pack, partial=True)


# --- when saved scales are (not) used --------------------------------------------------------------

def test_scales_used_only_for_matching_settings(chain, pack):
    save_calibration(_calibrated(chain, pack), pack)
    for kwargs in ({"abits": 4}, {"act_mode": "dynamic"}, {"abits": 0}):
        model = copy.deepcopy(chain)
        report = apply_pack(model, pack, **kwargs)
        assert report.calibrated == 0
    report = apply_pack(copy.deepcopy(chain), pack, abits=4)
    assert report.warnings and "not used" in report.warnings[0] and "abits=8 (this run: 4)" in report.warnings[0]


def test_scales_of_another_pack_are_refused(chain, pack, tmp_path):
    other = _build(chain, tmp_path / "ckpt", tmp_path / "b32", block=32)  # same names, other transforms
    model = _calibrated(chain, pack)
    with pytest.raises(PackError, match="built from other transforms"):
        save_calibration(model, other)
    assert "calibration" not in _manifest(other)


# --- damaged or inconsistent calibration -------------------------------------------------------------

def _saved(chain, pack):
    save_calibration(_calibrated(chain, pack), pack)
    return _manifest(pack)


def test_corrupt_calibration_file(chain, pack):
    m = _saved(chain, pack)
    path = pack / m["calibration"]["file"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    p = load_pack(pack)  # the manifest is fine
    model = copy.deepcopy(chain)
    with pytest.raises(PackError, match="checksum mismatch.*calibration"):
        apply_pack(model, p)
    assert not _dq(model)  # unchanged
    assert any("calibration" in line for line in p.verify())
    path.unlink()
    with pytest.raises(PackError, match="calibration file missing"):
        load_pack(pack).calibration_scales()


def _rewrite(pack, m, mutate):
    """Rewrite the calibration file with `mutate(f)` applied and fix the manifest checksum."""
    path = pack / m["calibration"]["file"]
    with h5py.File(path, "r+") as f:
        mutate(f)
    m["calibration"]["sha256"] = file_sha256(path)
    (pack / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("mutate,match", [
    (lambda f: f.attrs.__setitem__("names", json.dumps(["nope"] + NAMES[1:])), "'nope' is not a layer of the pack"),
    (lambda f: f.attrs.__setitem__("names", json.dumps(NAMES[:5])), "must be lists of equal length"),
    (lambda f: f.attrs.__setitem__("names", json.dumps([NAMES[0]] * 6)), "listed twice"),
    (lambda f: f.attrs.__setitem__("layer_keys", json.dumps(["0" * 64] * 6)), "calibrated for other transforms"),
    (lambda f: f.attrs.__setitem__("format_version", 2), "calibration format version 2"),
    (lambda f: f.attrs.__setitem__("format", "x"), "not a duquant calibration file"),
    (lambda f: f.attrs.__setitem__("abits", 4), "attribute abits=4 disagrees"),
    (lambda f: (f.__delitem__("scale_00001"), f.create_dataset("scale_00001", data=np.ones(5, np.float32))),
     r"up_proj' must be float32 \(64,\), got float32 \(5,\)"),
    (lambda f: (f.__delitem__("scale_00000"), f.create_dataset("scale_00000", data=np.zeros(128, np.float32))),
     "non-finite or non-positive"),
    (lambda f: (f.__delitem__("scale_00000"), f.create_dataset("scale_00000", data=np.full(128, np.nan, np.float32))),
     "non-finite or non-positive"),
    (lambda f: (f.__delitem__("scale_00000"), f.create_dataset("scale_00000", data=np.ones(128))),
     r"must be float32"),
    (lambda f: f.create_dataset("extra", data=np.ones(3, np.float32)), "missing or unexpected: extra"),
])
def test_inconsistent_calibration_file(chain, pack, mutate, match):
    _rewrite(pack, _saved(chain, pack), mutate)
    with pytest.raises(PackError, match=match):
        load_pack(pack).calibration_scales()
    model = copy.deepcopy(chain)
    with pytest.raises(PackError, match=match):
        apply_pack(model, pack)
    assert not _dq(model)


@pytest.mark.parametrize("field,value,match", [
    ("file", "../act_scales.h5", "not a plain relative path"),
    ("file", "layers/act_scales.h5", "not under calibration/"),
    ("file", "calibration/x/act_scales.h5", "not under calibration/"),
    ("file", 3, "field 'file' has the wrong type"),
    ("sha256", "ABC", "sha256 is not a hex digest"),
    ("layers", 0, "layers must be 1..6"),
    ("layers", 7, "layers must be 1..6"),
    ("layers", True, "must be an integer"),
    ("abits", 16, "abits 16 is not 2..15"),
    ("act_mode", "dynamic", "act_mode must be 'static'"),
    ("act_percentile", 0, r"act_percentile must be a number in \(0, 100\]"),
    ("act_percentile", True, "act_percentile must be a number"),
    ("calib_steps", 0, "calib_steps must be >= 1"),
    (None, None, "missing field 'sha256'"),
])
def test_manifest_calibration_object_is_checked(chain, pack, field, value, match):
    m = _saved(chain, pack)
    if field is None:
        del m["calibration"]["sha256"]
    else:
        m["calibration"][field] = value
    (pack / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackError, match=match):
        load_pack(pack)


def test_calibration_must_be_an_object(chain, pack):
    m = _saved(chain, pack)
    m["calibration"] = None
    (pack / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackError, match="calibration: not a JSON object"):
        load_pack(pack)


def test_no_calibration_in_pack(pack):
    assert load_pack(pack).calibration is None
    with pytest.raises(PackError, match="holds no calibration"):
        load_pack(pack).calibration_scales()


# --- writing failures ------------------------------------------------------------------------------

def test_read_only_pack_directory(chain, pack):
    model = _calibrated(chain, pack)
    before = tree_bytes(pack)
    os.chmod(pack, 0o555)
    try:
        if os.access(pack, os.W_OK):
            pytest.skip("running as root: chmod does not make the directory read-only")
        with pytest.raises(PackError, match="not writable"):
            save_calibration(model, pack)
    finally:
        os.chmod(pack, 0o755)
    assert tree_bytes(pack) == before


def test_unwritable_pack_directory_is_refused_before_writing(chain, pack, monkeypatch):
    """The same check as above where chmod cannot be used (root): os.access reports no write access."""
    import duquant_runtime.calibration as calibration
    model = _calibrated(chain, pack)
    before = tree_bytes(pack)
    real = os.access
    monkeypatch.setattr(calibration.os, "access",
                        lambda path, mode, **k: False if str(path) == str(pack) else real(path, mode, **k))
    with pytest.raises(PackError, match="pack directory is not writable; cannot save the calibration$"):
        save_calibration(model, pack)
    assert tree_bytes(pack) == before


def test_write_failure_is_a_clean_error(chain, pack):
    """Works as root too: the calibration directory cannot be created (a file is in the way)."""
    model = _calibrated(chain, pack)
    (pack / "calibration").write_text("in the way")
    before = tree_bytes(pack)
    with pytest.raises(PackError, match=r"cannot save the calibration \(FileExistsError") as exc:
        save_calibration(model, pack)
    assert "\n" not in str(exc.value)
    assert tree_bytes(pack) == before


def test_held_build_lock_is_an_error(chain, pack):
    model = _calibrated(chain, pack)
    fd = os.open(pack / ".lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(PackError, match="a build is writing this pack"):
            save_calibration(model, pack)
    finally:
        os.close(fd)
    assert "calibration" not in _manifest(pack)


# --- rebuilds --------------------------------------------------------------------------------------

def test_rebuild_keeps_calibration_only_for_identical_layers(chain, pack, tmp_path):
    m = _saved(chain, pack)
    cal_file = m["calibration"]["file"]
    ckpt = tmp_path / "ckpt"
    # same config, same weights: every layer entry is identical, the calibration stays
    _build(chain, ckpt, pack)
    m2 = _manifest(pack)
    assert m2["calibration"] == m["calibration"] and (pack / cal_file).is_file()
    assert load_pack(pack).verify() == []
    # only abits changed: same layer files, the calibration stays but no longer fits the run
    _build(chain, ckpt, pack, abits=4)
    assert _manifest(pack)["calibration"] == m["calibration"]
    report = apply_pack(copy.deepcopy(chain), pack)
    assert report.calibrated == 0 and "not used" in report.warnings[0]
    # a different config that changes the layers: the calibration is dropped with its files
    _build(chain, ckpt, pack, wbits=3)
    m3 = _manifest(pack)
    assert "calibration" not in m3 and not (pack / "calibration").exists()
    assert load_pack(pack).verify() == []
    assert apply_pack(copy.deepcopy(chain), pack).calibrated == 0


def test_rebuild_cleans_stale_calibration_temporaries(chain, pack, tmp_path):
    _saved(chain, pack)
    stale = pack / "calibration" / ".tmp-999-act_scales.h5"
    stale.write_bytes(b"partial")
    _build(chain, tmp_path / "ckpt", pack)
    assert not stale.exists() and "calibration" in _manifest(pack)
