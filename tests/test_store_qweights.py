"""`--store-qweights`: the pack stores the integers of W_t; the runtime uses them unchanged."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_runtime import DuQuantLinear, PackError, load_pack
from duquant_runtime.quant import pack_int4, quantize_rows, unpack_int4
from duquant_runtime.transforms import transform_weight

from _util import save_ckpt


def _ckpt(tmp_path, shape=(48, 96), bits_layers=None):
    g = torch.Generator().manual_seed(3)
    tensors = {"a.weight": torch.randn(*shape, generator=g), "b.weight": torch.randn(40, 72, generator=g)}
    save_ckpt(tmp_path / "ck", tensors)
    return tmp_path / "ck", tensors


@pytest.mark.parametrize("wbits", [3, 4, 6])
def test_stored_integers_equal_runtime_quantization(tmp_path, wbits):
    ck, tensors = _ckpt(tmp_path)
    cfg, _ = resolve(None, include=r"^(a|b)$", exclude="", block=32, wbits=wbits, store_qweights=True)
    build_pack(ck, tmp_path / "p", cfg, jobs=1, progress=False)
    pack = load_pack(tmp_path / "p")
    for name in ("a", "b"):
        lp = pack.layer(name)
        assert lp.meta["qweight"] is True and lp.qweight is not None
        w = tensors[name + ".weight"]
        w_t = transform_weight(w, lp.perm, lp.r_in, lp.r_out)
        q = quantize_rows(w_t, lp.weight_scale, wbits)
        got = unpack_int4(lp.qweight, w.shape[1]) if wbits <= 4 else lp.qweight
        assert torch.equal(got.to(torch.int16), q.to(torch.int16))
        # the runtime takes the stored integers: a module with other weights gives the pack's integers
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        m = DuQuantLinear.from_linear(lin, lp)
        assert torch.equal(m.int_codes().to(torch.int16), q.to(torch.int16))


def test_flag_changes_layer_keys_and_config_hash(tmp_path):
    ck, _ = _ckpt(tmp_path)
    base, _ = resolve(None, include=r"^a$", exclude="", block=32)
    stored, _ = resolve(None, include=r"^a$", exclude="", block=32, store_qweights=True)
    assert "store_qweights" not in base.to_dict()  # old packs keep their hash
    s1 = build_pack(ck, tmp_path / "p1", base, jobs=1, progress=False)
    s2 = build_pack(ck, tmp_path / "p2", stored, jobs=1, progress=False)
    assert s1.config_hash != s2.config_hash
    assert s1.entries[0]["layer_key"] != s2.entries[0]["layer_key"]
    assert "qweight" not in s1.entries[0]
    with h5py.File(tmp_path / "p1" / s1.entries[0]["file"]) as f:
        assert "qweight" not in f


def _rewrite(path, key, fn):
    with h5py.File(path, "a") as f:
        data = fn(f[key][()])
        del f[key]
        f.create_dataset(key, data=data)


def _fix_sha(pack_dir, name):
    from duquant_runtime.format import file_sha256
    m = json.loads((pack_dir / "manifest.json").read_text())
    for e in m["layers"]:
        if e["name"] == name:
            e["sha256"] = file_sha256(pack_dir / e["file"])
    (pack_dir / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, match", [
    (lambda q: q[:, :-1], "qweight must be uint8"),
    (lambda q: q.astype(np.int8), "qweight must be uint8"),
])
def test_reader_refuses_bad_qweight(tmp_path, damage, match):
    ck, _ = _ckpt(tmp_path)
    cfg, _ = resolve(None, include=r"^a$", exclude="", block=32, store_qweights=True)
    s = build_pack(ck, tmp_path / "p", cfg, jobs=1, progress=False)
    _rewrite(tmp_path / "p" / s.entries[0]["file"], "qweight", damage)
    _fix_sha(tmp_path / "p", "a")
    with pytest.raises(PackError, match=match):
        load_pack(tmp_path / "p").layer("a")


def test_reader_refuses_out_of_range_values(tmp_path):
    ck, _ = _ckpt(tmp_path)
    cfg, _ = resolve(None, include=r"^a$", exclude="", block=32, wbits=3, store_qweights=True)
    s = build_pack(ck, tmp_path / "p", cfg, jobs=1, progress=False)
    _rewrite(tmp_path / "p" / s.entries[0]["file"], "qweight",
             lambda q: np.full_like(q, pack_int4(torch.tensor([[7, 7]], dtype=torch.int8)).numpy()[0, 0]))
    _fix_sha(tmp_path / "p", "a")
    with pytest.raises(PackError, match="outside the 3-bit range"):
        load_pack(tmp_path / "p").layer("a")


def test_unlisted_qweight_dataset_refused(tmp_path):
    ck, _ = _ckpt(tmp_path)
    cfg, _ = resolve(None, include=r"^a$", exclude="", block=32, store_qweights=True)
    build_pack(ck, tmp_path / "p", cfg, jobs=1, progress=False)
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    del m["layers"][0]["qweight"]
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackError, match="qweight' present but"):
        load_pack(tmp_path / "p").layer("a")


def test_pack_unpack_roundtrip_odd_columns():
    q = torch.randint(-8, 8, (7, 13), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    p = pack_int4(q)
    assert p.shape == (7, 7) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p, 13), q)
    assert int((p[:, -1] >> 4).max()) == 0
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8]]))


def test_apply_with_meta_weights_uses_stored_integers(tmp_path):
    """A deployment without the float checkpoint: modules with meta weights take the pack's packed
    integers unchecked (listed in report.unchecked); without stored integers that is refused."""
    from duquant_runtime import apply_pack
    ck, tensors = _ckpt(tmp_path)
    cfg, _ = resolve(None, include=r"^(a|b)$", exclude="", block=32, store_qweights=True)
    build_pack(ck, tmp_path / "p", cfg, jobs=1, progress=False)

    def model(meta: bool):
        root = nn.Module()
        for name, w in tensors.items():
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta" if meta else "cpu")
            if not meta:
                lin.weight = nn.Parameter(w.clone(), requires_grad=False)
            root.add_module(name.split(".")[0], lin)
        return root
    full, bare = model(False), model(True)
    rep_full = apply_pack(full, tmp_path / "p", abits=0)
    rep_bare = apply_pack(bare, tmp_path / "p", abits=0)
    assert rep_full.unchecked == [] and sorted(rep_bare.unchecked) == ["a", "b"]
    x = torch.randn(3, 96)
    assert torch.equal(bare.a(x), full.a(x)) and bare.a.qweight.dtype == torch.uint8
    assert apply_pack(model(False), tmp_path / "p", abits=0, check_weights=False).unchecked == ["a", "b"]
    cfg2, _ = resolve(None, include=r"^(a|b)$", exclude="", block=32)
    build_pack(ck, tmp_path / "p2", cfg2, jobs=1, progress=False)
    with pytest.raises(PackError, match="no weight data"):
        apply_pack(model(True), tmp_path / "p2", abits=0)
