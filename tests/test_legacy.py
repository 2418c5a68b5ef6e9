"""import_legacy (old openpi_duquant .npz packs -> format 1) and build --compat openpi-duquant.

The legacy directory is written here with the old layout (np.savez, uncompressed; meta as a JSON
string; perm int64; R_in_blocks / Rin_b and R_out_blocks / Rout_b float32, a partial last block
stored r x r), with transforms computed the old way: interleave order of the channel energies,
full SVD per block (U of W[:, block]^T for R_in, U of W[rows, :] for R_out, applied as
W_t = Rout W P Rin and restored with y Rout).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from duquant_pack.build import build_pack
from duquant_pack.checkpoint import Checkpoint
from duquant_pack.config import ConfigError, config_hash_of, resolve
from duquant_pack.errors import DuquantError
from duquant_pack.legacy import import_legacy, old_sanitize
from duquant_pack.synth import write_synth
from duquant_runtime import apply_pack, load_pack

LM = "paligemma_with_expert.paligemma.model.language_model.layers.0"
EXP = "paligemma_with_expert.gemma_expert.model.layers.0"
NAMES = [f"{LM}.self_attn.k_proj", f"{EXP}.mlp.down_proj", "action_out_proj"]  # 32x256, 128x512, 32x128
BLOCK, BLOCK_OUT = 48, 40  # partial last blocks everywhere


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth1")
    write_synth(d, "pi05", layers=1, width_div=8)
    return d


def _old_interleave(energy: np.ndarray) -> np.ndarray:
    order = np.argsort(-energy, kind="stable")
    left, right, perm, toggle = 0, len(order) - 1, [], True
    while left <= right:
        if toggle:
            perm.append(order[left]); left += 1
        else:
            perm.append(order[right]); right -= 1
        toggle = not toggle
    return np.array(perm, dtype=np.int64)


def _svd_u(a: np.ndarray) -> np.ndarray:
    u, _, _ = torch.linalg.svd(torch.from_numpy(a.astype(np.float64)), full_matrices=True)
    return u.numpy()


def old_transforms(w: np.ndarray, block: int, block_out: int, *, drop_rin=()) -> dict:
    """The old pack_weight: {perm, rin: {b: R}, rout: {b: R}} (float32 blocks, partial ones r x r)."""
    out_f, in_f = w.shape
    perm = _old_interleave(np.mean(w.astype(np.float64) ** 2, axis=0))
    rin, rout = {}, {}
    for b in range(-(-in_f // block)):
        cols = perm[b * block:min((b + 1) * block, in_f)]
        if b not in drop_rin:
            rin[b] = _svd_u(w[:, cols].T).astype(np.float32)
    for b in range(-(-out_f // block_out)):
        rout[b] = _svd_u(w[b * block_out:min((b + 1) * block_out, out_f), :]).astype(np.float32)
    return {"perm": perm, "rin": rin, "rout": rout}


def save_old(path, w: np.ndarray, t: dict, block: int, block_out: int, **extra):
    out_f, in_f = w.shape
    meta = {"in_features": in_f, "out_features": out_f, "block_size": block, "block_out_size": block_out,
            "enable_permute": True, "lambda_smooth": 0.15}
    data = {"weight_scale": (np.abs(w).max(axis=1) / 7).astype(np.float32), "meta": json.dumps(meta),
            "perm": t["perm"]}
    for b, r in t["rin"].items():
        data[f"Rin_{b}"] = r
    data["R_in_blocks"] = np.array(sorted(t["rin"]), dtype=np.int64)
    for b, r in t["rout"].items():
        data[f"Rout_{b}"] = r
    data["R_out_blocks"] = np.array(sorted(t["rout"]), dtype=np.int64)
    data.update(extra)
    np.savez(path, **data)


def weights(ckpt_dir) -> dict:
    ck = Checkpoint(ckpt_dir)
    out = {}
    for n in NAMES:
        bias = ck.read(n + ".bias").to(torch.float32) if n + ".bias" in ck.tensors else None
        out[n] = (ck.read_weight(n + ".weight"), bias)
    return out


@pytest.fixture(scope="module")
def legacy_dir(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("legacy")
    ts = {}
    for i, (n, (w, _)) in enumerate(weights(ckpt).items()):
        t = old_transforms(w.numpy(), BLOCK, BLOCK_OUT, drop_rin=(1,) if i == 1 else ())
        save_old(d / f"{old_sanitize(n)}.npz", w.numpy(), t, BLOCK, BLOCK_OUT)
        ts[n] = t
    return d, ts


def make_model(ckpt_dir) -> nn.Module:
    root = nn.Module()
    for n, (w, b) in weights(ckpt_dir).items():
        *parents, leaf = n.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        mod.add_module(leaf, lin)
    return root


def _bd(blocks: dict, n: int, block: int) -> np.ndarray:
    m = np.eye(n)
    for b, r in blocks.items():
        s = b * block
        m[s:s + r.shape[0], s:s + r.shape[0]] = r.astype(np.float64)
    return m


def _direct(x: torch.Tensor, w, bias, t: dict, scale, bits: int) -> np.ndarray:
    """The old transforms applied directly in float64: W_t = Rout W P Rin, y = (x P Rin) Q(W_t)^T Rout + b."""
    w = w.double().numpy()
    out_f, in_f = w.shape
    rin, rout = _bd(t["rin"], in_f, BLOCK), _bd(t["rout"], out_f, BLOCK_OUT)
    w_t = rout @ w[:, t["perm"]] @ rin
    if bits:
        s = scale.double().numpy()[:, None]
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        w_t = np.clip(np.rint(w_t / s), qmin, qmax) * s
    y = (x.double().numpy()[:, t["perm"]] @ rin) @ w_t.T @ rout
    return y + (bias.double().numpy() if bias is not None else 0)


def _run(model, name, x):
    return model.get_submodule(name)(x).detach()


def test_import_unquantized_is_exact(ckpt, legacy_dir, tmp_path):
    d, _ = legacy_dir
    s = import_legacy(d, ckpt, tmp_path / "p16", wbits=16, abits=0)
    assert s.layers == 3
    pack = load_pack(tmp_path / "p16")
    assert pack.verify() == []
    m = pack.manifest
    assert m["imported_from"] == {"format": "openpi-duquant-npz", "files": 3}
    assert m["config"]["compat"] == "openpi-duquant"
    assert set(m["config"]["layers"]) == set(NAMES) and m["config"]["block"] == BLOCK
    assert m["config"]["block_out"] == BLOCK_OUT and m["config"]["wbits"] == 0
    model, ref = make_model(ckpt), make_model(ckpt)
    apply_pack(model, tmp_path / "p16", abits=0)
    for n in NAMES:
        lin = ref.get_submodule(n)
        x = torch.randn(7, lin.in_features, generator=torch.Generator().manual_seed(1))
        y, y_ref = _run(model, n, x), _run(ref, n, x)
        assert float((y - y_ref).abs().max() / y_ref.abs().max()) < 1e-5, n


def test_import_w4_equals_direct_application(ckpt, legacy_dir, tmp_path):
    d, ts = legacy_dir
    import_legacy(d, ckpt, tmp_path / "p4")
    pack = load_pack(tmp_path / "p4")
    assert pack.verify() == []
    model = make_model(ckpt)
    ws = weights(ckpt)
    apply_pack(model, tmp_path / "p4", abits=0)
    for n in NAMES:
        lay = pack.layer(n)
        assert lay.wbits == 4 and lay.block_in == BLOCK
        # stored rotations are the old ones, R_out transposed (format.md §9)
        assert np.array_equal(lay.perm.numpy(), ts[n]["perm"])
        for b, r in ts[n]["rout"].items():
            k = r.shape[0]
            assert np.array_equal(lay.r_out[b, :k, :k].numpy(), r.T)
        for b in range(lay.r_in.shape[0]):
            k = min(BLOCK, lay.in_features - b * BLOCK)
            want = ts[n]["rin"].get(b, np.eye(k, dtype=np.float32))  # missing block -> identity
            assert np.array_equal(lay.r_in[b, :k, :k].numpy(), want)
        w, bias = ws[n]
        x = torch.randn(9, w.shape[1], generator=torch.Generator().manual_seed(2))
        y = _run(model, n, x).double().numpy()
        want = _direct(x, w, bias, ts[n], lay.weight_scale, 4)
        assert np.abs(y - want).max() / np.abs(want).max() < 1e-5, n
        assert m_entry(pack, n)["stats"]["w_rel_err"] > 0


def m_entry(pack, name):
    return next(e for e in pack.manifest["layers"] if e["name"] == name)


def test_import_layer_keys_and_rerun(ckpt, legacy_dir, tmp_path):
    d, _ = legacy_dir
    import_legacy(d, ckpt, tmp_path / "a")
    with pytest.raises(DuquantError, match="not empty"):
        import_legacy(d, ckpt, tmp_path / "a")
    import_legacy(d, ckpt, tmp_path / "a", overwrite=True)
    assert load_pack(tmp_path / "a").verify() == []
    cfg, _ = resolve(None, compat="openpi-duquant", layers=tuple(NAMES), block=BLOCK, block_out=BLOCK_OUT)
    build_pack(ckpt, tmp_path / "b", cfg, jobs=1, progress=False)
    ka = {e["name"]: e["layer_key"] for e in load_pack(tmp_path / "a").manifest["layers"]}
    kb = {e["name"]: e["layer_key"] for e in load_pack(tmp_path / "b").manifest["layers"]}
    assert all(ka[n] != kb[n] for n in NAMES)


def _fresh_dir(legacy_dir, tmp_path):
    d = tmp_path / "npz"
    shutil.copytree(legacy_dir[0], d)
    return d


def _refused(d, ckpt, tmp_path, match):
    out = tmp_path / "nested" / "out"
    with pytest.raises(DuquantError, match=match):
        import_legacy(d, ckpt, out)
    assert not (tmp_path / "nested").exists()


def test_pickled_npz_refused(ckpt, legacy_dir, tmp_path):
    d = _fresh_dir(legacy_dir, tmp_path)
    bad = d / f"{NAMES[0]}.npz"
    np.savez(bad, meta=np.array([{"in_features": 1}], dtype=object), weight_scale=np.ones(32, np.float32))
    _refused(d, ckpt, tmp_path, rf"{NAMES[0]}\.npz.*pickled")
    np.save(open(bad, "wb"), np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a .npy named .npz
    _refused(d, ckpt, tmp_path, rf"{NAMES[0]}\.npz")


def test_random_npz_refused(ckpt, legacy_dir, tmp_path):
    d = _fresh_dir(legacy_dir, tmp_path)
    np.savez(d / "whatever.npz", a=np.zeros(3), b=np.ones((2, 2)))
    _refused(d, ckpt, tmp_path, r"whatever\.npz.*not an openpi_duquant pack")
    (d / "whatever.npz").write_bytes(b"not a zip at all")
    _refused(d, ckpt, tmp_path, r"whatever\.npz.*not an \.npz")


def test_shape_mismatch_and_unknown_layer_refused(ckpt, legacy_dir, tmp_path):
    d = _fresh_dir(legacy_dir, tmp_path)
    # the k_proj file (32x256) renamed to the down_proj layer (128x512)
    (d / f"{NAMES[1]}.npz").unlink()
    shutil.copy(d / f"{NAMES[0]}.npz", d / f"{NAMES[1]}.npz")
    _refused(d, ckpt, tmp_path, rf"{NAMES[1]}\.npz.*32 x 256.*\[128, 512\]")
    d = _fresh_dir(legacy_dir, tmp_path / "2")
    shutil.move(d / f"{NAMES[0]}.npz", d / "no.such.layer.npz")
    _refused(d, ckpt, tmp_path, r"no\.such\.layer\.npz.*no tensor 'no\.such\.layer\.weight'")


def test_bad_blocks_refused(ckpt, legacy_dir, tmp_path):
    w = weights(ckpt)[NAMES[2]][0].numpy()
    t = old_transforms(w, BLOCK, BLOCK_OUT)
    d = _fresh_dir(legacy_dir, tmp_path)
    f = d / f"{NAMES[2]}.npz"
    t2 = dict(t, rin={**t["rin"], 1: t["rin"][1] * np.float32(1.001)})
    save_old(f, w, t2, BLOCK, BLOCK_OUT)
    _refused(d, ckpt, tmp_path, rf"{NAMES[2]}\.npz: block Rin_1 is not orthogonal")
    t3 = dict(t, rout={0: t["rout"][0][:20, :20]})  # out 32 = one block of 32
    save_old(f, w, t3, BLOCK, BLOCK_OUT)
    _refused(d, ckpt, tmp_path, rf"{NAMES[2]}\.npz: block Rout_0: shape \(20, 20\).*do not cover")
    t4 = dict(t, rin={**t["rin"], 7: np.eye(BLOCK, dtype=np.float32)})
    save_old(f, w, t4, BLOCK, BLOCK_OUT)
    _refused(d, ckpt, tmp_path, rf"{NAMES[2]}\.npz: block Rin_7: index 7 outside")
    save_old(f, w, t, BLOCK, BLOCK_OUT, perm=np.zeros(w.shape[1], dtype=np.int64))
    _refused(d, ckpt, tmp_path, rf"{NAMES[2]}\.npz: 'perm' is not a permutation")
    save_old(f, w, t, BLOCK, BLOCK_OUT, weight_scale=np.ones(3, dtype=np.float32))
    _refused(d, ckpt, tmp_path, rf"{NAMES[2]}\.npz: 'weight_scale'")
    save_old(f, w, t, BLOCK, BLOCK_OUT, R_in_blocks=np.array([0.0, 1.0]))
    _refused(d, ckpt, tmp_path, rf"{NAMES[2]}\.npz: 'R_in_blocks' must be a 1-D integer array")


def test_existing_dir_kept_on_error(ckpt, legacy_dir, tmp_path):
    out = tmp_path / "out"
    import_legacy(legacy_dir[0], ckpt, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    d = _fresh_dir(legacy_dir, tmp_path)
    np.savez(d / "junk.npz", a=np.zeros(1))
    with pytest.raises(DuquantError, match="junk"):
        import_legacy(d, ckpt, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(DuquantError, match="not a duquant pack"):
        import_legacy(legacy_dir[0], ckpt, tmp_path / "foreign", overwrite=True)


def test_row_rot_disabled_drops_rout(ckpt, legacy_dir, tmp_path):
    import_legacy(legacy_dir[0], ckpt, tmp_path / "p", row_rot="disabled")
    pack = load_pack(tmp_path / "p")
    assert pack.config["row_rot"] == "disabled" and pack.config["block_out"] is None
    assert all(pack.layer(n).r_out is None for n in NAMES)
    with pytest.raises(DuquantError, match="propagate"):
        import_legacy(legacy_dir[0], ckpt, tmp_path / "q", row_rot="propagate")


# --- build --compat openpi-duquant -------------------------------------------------------------

def test_compat_config():
    cfg, _ = resolve("pi05-llm", compat="openpi-duquant")
    assert (cfg.permute, cfg.permute_metric, cfg.scale, cfg.row_rot) == ("interleave", "energy", "mse", "restore")
    assert cfg.to_dict()["compat"] == "openpi-duquant"
    assert "compat" not in resolve("pi05-llm")[0].to_dict()  # presets' hashes unchanged
    assert config_hash_of(cfg) != config_hash_of(resolve("pi05-llm", permute="interleave")[0])
    assert resolve(None, compat="openpi-duquant", row_rot="disabled")[0].block_out is None
    assert resolve(None, compat="openpi-duquant", permute="none")[0].permute == "none"
    for bad in ({"permute": "zigzag"}, {"scale": "max"}, {"compat": "nope"}, {"permute_metric": "absmax"}):
        with pytest.raises(ConfigError):
            resolve(None, **{"compat": "openpi-duquant", **bad})


def test_compat_build(ckpt, tmp_path):
    layers = tuple(NAMES)
    cfg, _ = resolve(None, compat="openpi-duquant", layers=layers, block=BLOCK, block_out=BLOCK_OUT)
    plain, _ = resolve(None, permute="interleave", row_rot="restore", layers=layers, block=BLOCK,
                       block_out=BLOCK_OUT)
    default, _ = resolve(None, layers=layers, block=BLOCK, block_out=BLOCK_OUT)
    sa = build_pack(ckpt, tmp_path / "compat", cfg, jobs=1, progress=False)
    sb = build_pack(ckpt, tmp_path / "plain", plain, jobs=1, progress=False)
    assert sa.config_hash not in (sb.config_hash, config_hash_of(default))
    a, b = load_pack(tmp_path / "compat"), load_pack(tmp_path / "plain")
    assert a.verify() == []
    files_a = {e["file"] for e in a.manifest["layers"]}
    assert files_a.isdisjoint(e["file"] for e in b.manifest["layers"])
    ws = weights(ckpt)
    for n in NAMES:
        w = ws[n][0]
        la, lb = a.layer(n), b.layer(n)
        assert np.array_equal(la.perm.numpy(), _old_interleave(np.mean(w.double().numpy() ** 2, axis=0)))
        assert torch.equal(la.r_in, lb.r_in)
        assert torch.equal(la.r_out, lb.r_out.transpose(1, 2))  # the old convention: r_out = U^T
        # rows of each r_out block are the principal axes of the row block: r G r^T diagonal, descending
        for k in range(la.r_out.shape[0]):
            rows = w[k * BLOCK_OUT:(k + 1) * BLOCK_OUT].double()
            m = rows.shape[0]
            r = la.r_out[k, :m, :m].double()
            g = r @ (rows @ rows.t()) @ r.t()
            off = g - torch.diag(torch.diagonal(g))
            assert float(off.abs().max()) < 1e-4 * float(g.abs().max())
            dg = torch.diagonal(g)
            assert bool((dg[:-1] >= dg[1:] - 1e-6 * dg[0]).all())
        # the same numbers as the old algorithm up to signs: r_out rows = old U columns (+-)
        t = old_transforms(w.numpy(), BLOCK, BLOCK_OUT)
        u = torch.from_numpy(t["rout"][0].astype(np.float64))
        m = u.shape[0]
        prod = la.r_out[0, :m, :m].double() @ u  # = diag(+-1) when singular values are distinct
        assert torch.allclose(prod.abs(), torch.eye(m, dtype=torch.float64), atol=1e-3)
    # runtime: exact without quantization
    c16, _ = resolve(None, compat="openpi-duquant", layers=layers, block=BLOCK, block_out=BLOCK_OUT, wbits=16)
    build_pack(ckpt, tmp_path / "c16", c16, jobs=1, progress=False)
    model, ref = make_model(ckpt), make_model(ckpt)
    apply_pack(model, tmp_path / "c16", abits=0)
    for n in NAMES:
        x = torch.randn(4, ref.get_submodule(n).in_features, generator=torch.Generator().manual_seed(3))
        y, y_ref = _run(model, n, x), _run(ref, n, x)
        assert float((y - y_ref).abs().max() / y_ref.abs().max()) < 1e-5
