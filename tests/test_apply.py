"""duquant_runtime.apply.apply_pack: name mapping, checks before any change, errors, report."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn

from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_runtime import DuQuantLinear, PackError, apply_pack, load_pack

from _util import save_ckpt

D, F = 96, 160  # 96 = 64 + 32: a partial input block
PACKED = ["enc.layers.0.attn.o", "enc.layers.0.attn.q", "enc.layers.0.mlp.down", "enc.layers.0.mlp.up",
          "enc.layers.1.attn.o", "enc.layers.1.attn.q", "enc.layers.1.mlp.down", "enc.layers.1.mlp.up"]  # pack order


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q = nn.Linear(D, D)
        self.attn.o = nn.Linear(D, D, bias=False)
        self.mlp = nn.Module()
        self.mlp.up = nn.Linear(D, F)
        self.mlp.down = nn.Linear(F, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        x = x + self.attn.o(torch.tanh(self.attn.q(self.norm(x))))
        return x + self.mlp.down(torch.relu(self.mlp.up(x)))


class Net(nn.Module):
    """Nested model: enc.layers.{0,1}.{attn.q, attn.o, mlp.up, mlp.down} are packed; head is not."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Module()
        self.enc.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, 10)

    def forward(self, x):
        for blk in self.enc.layers:
            x = blk(x)
        return self.head(x)


class Wrapped(nn.Module):
    """The same network one level down (LeRobot's `model.` prefix)."""

    def __init__(self):
        super().__init__()
        self.model = Net()

    def forward(self, x):
        return self.model(x)


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _wrapped() -> Wrapped:
    w = Wrapped()
    w.model.load_state_dict(_net().state_dict())
    return w


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """{'plain': pack of Net's checkpoint, 'prefixed': pack of Wrapped's checkpoint (names 'model.*')}."""
    root = tmp_path_factory.mktemp("apply")
    cfg, _ = resolve(None, include=r"enc\.layers\.\d+\.(attn|mlp)\.", exclude="", row_rot="restore", block=64)
    out = {}
    for kind, model in (("plain", _net()), ("prefixed", _wrapped())):
        ck = root / f"ckpt-{kind}"
        save_ckpt(ck, {k: v.clone() for k, v in model.state_dict().items()})
        build_pack(ck, root / f"pack-{kind}", cfg, jobs=1, progress=False)
        out[kind] = root / f"pack-{kind}"
    return out


@pytest.fixture
def plain_copy(packs, tmp_path):
    dst = tmp_path / "pack"
    shutil.copytree(packs["plain"], dst)
    return dst


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def _assert_unchanged(model, snap):
    sd, types = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    assert all(torch.equal(now[k], sd[k]) and now[k].dtype == sd[k].dtype for k in sd)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(isinstance(m, DuQuantLinear) for m in model.modules())


X = torch.randn(5, D, generator=torch.Generator().manual_seed(9))


def _replaced(model) -> list[str]:
    """Names of the DuQuantLinear modules, sorted."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, DuQuantLinear))


# --- name mapping -------------------------------------------------------------------------------

def test_exact_names(packs):
    model = _net()
    pack = load_pack(packs["plain"])
    assert pack.layer_names == PACKED
    with torch.no_grad():
        y_float = model(X)
    report = apply_pack(model, packs["plain"], abits=0)
    assert report.replaced == PACKED and report.skipped == []
    assert _replaced(model) == PACKED
    assert type(model.head) is nn.Linear and type(model.enc.layers[0].norm) is nn.LayerNorm
    with torch.no_grad():
        y = model(X)
    rel = float((y - y_float).norm() / y_float.norm())
    assert 1e-4 < rel < 0.2  # W4 weights, unquantized activations: close to the float model


def test_extra_model_prefix_is_matched_automatically(packs):
    ref = _net()
    apply_pack(ref, packs["plain"])
    model = _wrapped()
    report = apply_pack(model, packs["plain"])
    assert report.replaced == ["model." + n for n in PACKED]
    assert _replaced(model) == sorted(report.replaced)
    with torch.no_grad():
        ref(X[:2])  # static calibration: one call each on the same data
        model(X[:2])
        assert torch.equal(model(X), ref(X))


def test_pack_prefix_missing_in_model_is_matched_automatically(packs):
    assert load_pack(packs["prefixed"]).layer_names == ["model." + n for n in PACKED]
    model = _net()
    report = apply_pack(model, packs["prefixed"])
    assert report.replaced == PACKED and _replaced(model) == PACKED


class Renamed(nn.Module):
    """Same network, other names: backbone.blocks.N.* instead of enc.layers.N.*"""

    def __init__(self):
        super().__init__()
        net = _net()
        self.backbone = nn.Module()
        self.backbone.blocks = net.enc.layers
        self.head = net.head

    def forward(self, x):
        for blk in self.backbone.blocks:
            x = blk(x)
        return self.head(x)


def _rename(n: str) -> str:
    return n.replace("enc.layers.", "backbone.blocks.")


def test_unmatched_names_without_name_map_fail(packs):
    model = Renamed()
    snap = _snapshot(model)
    with pytest.raises(PackError, match=r"'enc\.layers\.0\.attn\.o' has no module"):
        apply_pack(model, packs["plain"])
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("kind", ["dict", "callable"])
def test_explicit_name_map(packs, kind):
    model = Renamed()
    name_map = {n: _rename(n) for n in PACKED} if kind == "dict" else _rename
    report = apply_pack(model, packs["plain"], name_map=name_map)
    assert report.replaced == [_rename(n) for n in PACKED]
    assert _replaced(model) == sorted(report.replaced)


def test_name_map_to_one_module_twice_is_an_error(packs):
    model = _net()
    snap = _snapshot(model)
    with pytest.raises(PackError, match="same module"):
        apply_pack(model, packs["plain"], name_map=lambda n: "enc.layers.0.attn.q")
    _assert_unchanged(model, snap)


class Twins(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _net()
        self.b = _net()


def test_ambiguous_match_names_candidates(packs):
    model = Twins()
    snap = _snapshot(model)
    with pytest.raises(PackError) as err:
        apply_pack(model, packs["plain"])
    msg = str(err.value)
    assert "a.enc.layers.0.attn.o" in msg and "b.enc.layers.0.attn.o" in msg and "name_map" in msg
    _assert_unchanged(model, snap)
    # name_map resolves it
    report = apply_pack(model, packs["plain"], name_map=lambda n: "b." + n)
    assert report.replaced == ["b." + n for n in PACKED]
    assert not any(isinstance(m, DuQuantLinear) for m in model.a.modules())


# --- missing modules, strict ------------------------------------------------------------------------

def _without_down1() -> Net:
    model = _net()
    del model.enc.layers[1].mlp.down
    model.enc.layers[1].mlp.down_renamed = nn.Linear(F, D)
    return model


def test_missing_module_strict_fails_and_model_unchanged(packs):
    model = _without_down1()
    snap = _snapshot(model)
    with pytest.raises(PackError, match=r"enc\.layers\.1\.mlp\.down.*no module"):
        apply_pack(model, packs["plain"])
    _assert_unchanged(model, snap)


def test_missing_module_non_strict_skips_and_reports(packs):
    model = _without_down1()
    report = apply_pack(model, packs["plain"], strict=False)
    assert report.skipped == [("enc.layers.1.mlp.down", "no such module")]
    rest = [n for n in PACKED if n != "enc.layers.1.mlp.down"]
    assert report.replaced == rest and _replaced(model) == rest
    assert type(model.enc.layers[1].mlp.down_renamed) is nn.Linear
    assert "7 layers replaced, 1 skipped" in report.summary()


# --- checks that refuse a pack ------------------------------------------------------------------

def test_shape_mismatch(packs):
    model = _net()
    model.enc.layers[1].mlp.down = nn.Linear(F, D + 1)
    snap = _snapshot(model)
    with pytest.raises(PackError, match=r"enc\.layers\.1\.mlp\.down.*\[97, 160\].*\[96, 160\]"):
        apply_pack(model, packs["plain"])
    _assert_unchanged(model, snap)


class NotLinear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x @ self.weight.t()


def test_module_not_linear(packs):
    model = _net()
    model.enc.layers[1].mlp.down = NotLinear(model.enc.layers[1].mlp.down.weight.detach().clone())
    snap = _snapshot(model)
    with pytest.raises(PackError, match=r"enc\.layers\.1\.mlp\.down.*NotLinear, not nn\.Linear"):
        apply_pack(model, packs["plain"])
    _assert_unchanged(model, snap)


def test_other_weights_refused_then_forced_with_warning(packs):
    model = _net()
    with torch.no_grad():
        model.enc.layers[1].mlp.up.weight[3, 7] += 1e-3  # one value differs from the pack's checkpoint
    snap = _snapshot(model)
    with pytest.raises(PackError, match=r"enc\.layers\.1\.mlp\.up.*other weights.*force=True"):
        apply_pack(model, packs["plain"])
    _assert_unchanged(model, snap)
    with pytest.warns(UserWarning, match=r"enc\.layers\.1\.mlp\.up.*applying anyway"):
        report = apply_pack(model, packs["plain"], force=True)
    assert report.replaced == PACKED and len(report.warnings) == 1 and "mlp.up" in report.warnings[0]


def test_bf16_cast_of_float32_checkpoint_is_refused_but_bf16_exact_values_match(packs, tmp_path):
    # the fingerprint identifies values, not dtypes: casting float32 weights to bf16 changes them
    # (refused), while bf16-exact values match whether the module holds them in bf16 or float32
    model = _net().to(torch.bfloat16)
    with pytest.raises(PackError, match="other weights"):
        apply_pack(model, packs["plain"])
    save_ckpt(tmp_path / "ck", {k: v.clone() for k, v in model.state_dict().items()})  # a bf16 checkpoint
    cfg, _ = resolve(None, include=r"enc\.layers\.\d+\.(attn|mlp)\.", exclude="", block=64)
    build_pack(tmp_path / "ck", tmp_path / "pack", cfg, jobs=1, progress=False)
    held_in_f32 = _net()
    held_in_f32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert apply_pack(held_in_f32, tmp_path / "pack").replaced == PACKED


def test_unknown_format_version(plain_copy):
    m = json.loads((plain_copy / "manifest.json").read_text())
    m["format_version"] = 3
    (plain_copy / "manifest.json").write_text(json.dumps(m))
    model = _net()
    snap = _snapshot(model)
    with pytest.raises(PackError, match="format version 3"):
        apply_pack(model, plain_copy)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("which", [0, -1])
def test_corrupt_layer_file(plain_copy, which):
    name = PACKED[which]  # the first or the last layer: nothing may be replaced either way
    entry = load_pack(plain_copy).entry(name)
    path = plain_copy / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    model = _net()
    snap = _snapshot(model)
    with pytest.raises(PackError, match="checksum mismatch"):
        apply_pack(model, plain_copy)
    _assert_unchanged(model, snap)


def test_missing_pack_dir(tmp_path):
    model = _net()
    with pytest.raises(PackError, match="does not exist"):
        apply_pack(model, tmp_path / "nope")


def test_applying_twice_fails_and_changes_nothing(packs):
    model = _net()
    apply_pack(model, packs["plain"])
    snap = _snapshot_dq(model)
    with pytest.raises(PackError, match="already a DuQuantLinear"):
        apply_pack(model, packs["plain"])
    assert _snapshot_dq(model)[1] == snap[1]
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap[0].items())


def _snapshot_dq(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: id(m) for n, m in model.named_modules()})


# --- report and options -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_report_bytes_and_names(packs, tmp_path, dtype):
    model = _net()
    if dtype == torch.bfloat16:  # a bf16 model needs a pack of its bf16 weights
        model = model.to(dtype)
        cfg, _ = resolve(None, include=r"enc\.layers\.\d+\.(attn|mlp)\.", exclude="", row_rot="restore", block=64)
        save_ckpt(tmp_path / "ck", {k: v.clone() for k, v in model.state_dict().items()})
        pack_dir = tmp_path / "pack"
        build_pack(tmp_path / "ck", pack_dir, cfg, jobs=1, progress=False)
    else:
        pack_dir = packs["plain"]
    mods = dict(model.named_modules())
    before = {n: mods[n].weight.numel() * mods[n].weight.element_size()
              + (mods[n].bias.numel() * mods[n].bias.element_size() if mods[n].bias is not None else 0)
              for n in PACKED}
    report = apply_pack(model, pack_dir)
    mods = dict(model.named_modules())
    after = {n: sum(v.numel() * v.element_size() for v in mods[n].state_dict().values()) for n in PACKED}
    assert report.replaced == PACKED
    assert report.bytes_before == sum(before.values())
    assert report.bytes_after == sum(after.values())
    assert report.per_layer_bytes == {n: (before[n], after[n]) for n in PACKED}
    assert all(mods[n].qweight.dtype == torch.uint8 for n in PACKED)  # packed int4
    assert mods["enc.layers.0.attn.q"].bias.dtype == dtype
    assert "8 layers replaced, 0 skipped" in report.summary()
    if dtype == torch.bfloat16:
        with torch.no_grad():
            model(X.to(dtype))  # calibration call
            assert model(X.to(dtype)).dtype == dtype


def test_options_reach_the_modules(packs):
    pack = load_pack(packs["plain"])
    assert pack.config["abits"] == 8
    model = _net()
    apply_pack(model, pack, act_mode="dynamic", device="cpu")  # a Pack object is accepted too
    q = model.enc.layers[0].attn.q
    assert (q.abits, q.act_mode, q.wbits, q.calib_steps) == (8, "dynamic", 4, pack.config["calib_steps"])
    m2 = _net()
    apply_pack(m2, packs["plain"], abits=0)
    assert m2.enc.layers[0].attn.q.abits == 0 and not m2.enc.layers[0].attn.q.calibrating
    m3 = _net()
    apply_pack(m3, packs["plain"])
    q3 = m3.enc.layers[0].attn.q
    assert q3.act_mode == "static" and q3.calibrating and q3.act_percentile == pack.config["act_percentile"]
    with pytest.raises(ValueError):
        apply_pack(_net(), packs["plain"], act_mode="per-channel")


def test_a_deepcopy_of_an_applied_model_runs(packs):
    model = _net()
    apply_pack(model, packs["plain"], act_mode="dynamic")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(X), model(X))
