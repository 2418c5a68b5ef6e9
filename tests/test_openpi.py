"""duquant_runtime.openpi: the OPENPI_DUQUANT_* drop-in `enable_duquant_if_configured`."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import duquant_pack.build
from duquant_pack.config import OLD_EXCLUDE, OLD_INCLUDE, resolve
from duquant_runtime import DuQuantLinear, EnvConfigError, PackError, enable_duquant_if_configured, load_pack
from duquant_runtime import openpi
from duquant_runtime.openpi import KNOWN_VARS, read_env

from _util import max_rel, tree_bytes

LM = "paligemma_with_expert.paligemma.model.language_model.layers"
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LM_NAMES = [f"{LM}.{i}.{p}" for i in range(2) for p in PROJ]  # the 14 linears the defaults select


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, 32, bias=False)
        self.v_proj = nn.Linear(d, 32, bias=False)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        return self.o_proj(self.q_proj(x) + torch.cat([self.k_proj(x), self.v_proj(x)], -1))


class MLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = Attn(d)
        self.mlp = MLP(d, h)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(x)


class Toy(nn.Module):
    """pi0.5-like names (nested modules), widths 64/128, two decoder layers and an action head."""

    def __init__(self, d=64, h=128, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.paligemma_with_expert = nn.Module()
        self.paligemma_with_expert.paligemma = nn.Module()
        self.paligemma_with_expert.paligemma.model = nn.Module()
        lm = self.paligemma_with_expert.paligemma.model.language_model = nn.Module()
        lm.layers = nn.ModuleList([Layer(d, h) for _ in range(2)])
        self.action_out_proj = nn.Linear(d, 32)

    def forward(self, x):
        for layer in self.paligemma_with_expert.paligemma.model.language_model.layers:
            x = layer(x)
        return self.action_out_proj(x)


@pytest.fixture(scope="module")
def toy():
    return Toy()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """The tests pass variables explicitly; none may leak in from the real environment."""
    for k in list(__import__("os").environ):
        if k.startswith("OPENPI_DUQUANT_") or k == "DUQUANT_JOBS":
            monkeypatch.delenv(k)


def _x(seed=1, shape=(3, 7, 64)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _env(packdir, **kw):
    env = {"OPENPI_DUQUANT_PACKDIR": str(packdir)}
    env.update({f"OPENPI_DUQUANT_{k}": str(v) for k, v in kw.items()})
    return env


def _kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, DuQuantLinear))}


W16A0 = dict(WBITS_DEFAULT=16, ABITS=0)


# --- off ------------------------------------------------------------------------------------------

def test_no_variables_returns_none_and_touches_nothing(toy, tmp_path, monkeypatch):
    model = copy.deepcopy(toy)
    before = _kinds(model)
    assert enable_duquant_if_configured(model, environ={}) is None
    assert enable_duquant_if_configured(model, environ={"OPENPI_DUQUANT_PACKDIR": str(tmp_path / "p"),
                                                        "OTHER": "1"}) is None
    monkeypatch.chdir(tmp_path)
    assert enable_duquant_if_configured(model) is None  # os.environ, cleaned by the fixture
    assert _kinds(model) == before and not (tmp_path / "p").exists() and not (tmp_path / "duquant_packed").exists()


# --- compile, then load -----------------------------------------------------------------------------

def test_w16a0_compiles_exact_pack_and_second_call_loads_it(toy, tmp_path, monkeypatch):
    packdir = tmp_path / "pack"
    env = _env(packdir, **W16A0)
    model = copy.deepcopy(toy)
    x = _x()
    with torch.no_grad():
        ref = toy(x)
        report = enable_duquant_if_configured(model, environ=env)
        y = model(x)
    assert report.compiled and sorted(report.replaced) == sorted(LM_NAMES) and report.skipped == []
    assert isinstance(model.action_out_proj, nn.Linear)  # INCLUDE_ACTION_HEAD=0 by default
    assert max_rel(y, ref) < 1e-5
    cfg = load_pack(packdir).config
    # unset variables take the old defaults (BLOCK 16, ROW_ROT restore, LS 0.15), except SCOPE ''
    assert (cfg["wbits"], cfg["abits"], cfg["block"], cfg["block_out"], cfg["row_rot"], cfg["permute"]) == \
        (0, 0, 16, 16, "restore", "zigzag")
    assert (cfg["scope"], cfg["lambda_smooth"], cfg["act_percentile"], cfg["calib_steps"]) == ("", 0.15, 99.9, 32)
    assert (cfg["include"], cfg["exclude"]) == (OLD_INCLUDE, OLD_EXCLUDE)

    files = tree_bytes(packdir)

    def no_build(*a, **k):
        raise AssertionError("build_pack called although the pack exists")
    monkeypatch.setattr(duquant_pack.build, "build_pack", no_build)
    model2 = copy.deepcopy(toy)
    with torch.no_grad():
        report2 = enable_duquant_if_configured(model2, environ=env)
        y2 = model2(x)
    assert not report2.compiled and sorted(report2.replaced) == sorted(LM_NAMES)
    assert torch.equal(y2, y)
    assert tree_bytes(packdir) == files  # nothing rewritten


def test_compiled_packs_are_deterministic(toy, tmp_path):
    for d in ("a", "b"):
        enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(tmp_path / d, ABITS=8, BLOCK=32))
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert a == b and len([k for k in a if k.startswith("layers/")]) == 14
    ck = load_pack(tmp_path / "a").manifest["checkpoint"]["files"]
    assert [f["name"] for f in ck] == ["model.safetensors"]  # only the 14 selected weights, float32
    assert ck[0]["size"] < 14 * 128 * 64 * 4 + 4096


def test_w4a8_differs_but_stays_close(toy, tmp_path):
    model = copy.deepcopy(toy)
    env = _env(tmp_path / "pack", WBITS_DEFAULT=4, ABITS=8, CALIB_STEPS=1, BLOCK=32)
    with torch.no_grad():
        report = enable_duquant_if_configured(model, environ=env)
        model(_x(seed=5))  # the one calibration call
        assert not any(m.calibrating for m in model.modules() if isinstance(m, DuQuantLinear))
        x = _x()
        y, ref = model(x), toy(x)
    assert len(report.replaced) == 14
    err = max_rel(y, ref)
    assert 1e-3 < err < 0.3, err
    q = dict(model.named_modules())[LM_NAMES[0]]
    assert (q.wbits, q.abits, q.act_mode, q.r_in.shape[-1]) == (4, 8, "static", 32)


def test_variables_are_read_when_called(toy, tmp_path, monkeypatch):
    model = copy.deepcopy(toy)
    monkeypatch.setenv("OPENPI_DUQUANT_PACKDIR", str(tmp_path / "pack"))
    monkeypatch.setenv("OPENPI_DUQUANT_WBITS_DEFAULT", "16")
    monkeypatch.setenv("OPENPI_DUQUANT_ABITS", "0")
    monkeypatch.setenv("OPENPI_DUQUANT_LAYERS", f"{LM_NAMES[0]}, {LM_NAMES[6]}")
    report = enable_duquant_if_configured(model)
    assert sorted(report.replaced) == sorted([LM_NAMES[0], LM_NAMES[6]])
    assert load_pack(tmp_path / "pack").config["layers"] == [LM_NAMES[0], LM_NAMES[6]]


def test_selection_variables_and_per_layer_bits(toy, tmp_path):
    model = copy.deepcopy(toy)
    env = _env(tmp_path / "pack", SCOPE=f"{LM}.1.", INCLUDE=r"mlp\.", EXCLUDE="gate", ABITS=0,
               WBITS=f"{LM}.1.mlp.down_proj:8", ROW_ROT=0, PERMUTE=0, DEBUG=1, PROFILE=1, PRECACHE_WEIGHTS=1)
    report = enable_duquant_if_configured(model, environ=env)
    assert sorted(report.replaced) == [f"{LM}.1.mlp.down_proj", f"{LM}.1.mlp.up_proj"]
    pack = load_pack(tmp_path / "pack")
    assert {e["name"]: e["wbits"] for e in pack.manifest["layers"]} == \
        {f"{LM}.1.mlp.down_proj": 8, f"{LM}.1.mlp.up_proj": 4}
    assert all(e["block_out"] is None and not e["permuted"] for e in pack.manifest["layers"])
    assert (pack.config["row_rot"], pack.config["permute"], pack.config["block_out"]) == ("disabled", "none", None)


def test_action_head_only_with_include_action_head(toy, tmp_path):
    model = copy.deepcopy(toy)
    env = _env(tmp_path / "pack", INCLUDE_ACTION_HEAD=1, **W16A0)
    report = enable_duquant_if_configured(model, environ=env)
    assert "action_out_proj" in report.replaced and len(report.replaced) == 15
    # the pack holds the head: asking explicitly to skip it is a disagreement, not a silent skip
    env["OPENPI_DUQUANT_INCLUDE_ACTION_HEAD"] = "0"
    fresh = copy.deepcopy(toy)
    with pytest.raises(PackError, match="INCLUDE_ACTION_HEAD='0' excludes action_out_proj.*'action_out_proj'"):
        enable_duquant_if_configured(fresh, environ=env)
    assert _kinds(fresh) == _kinds(toy)


def test_mixed_dtype_model_compiles_from_a_sharded_checkpoint(toy, tmp_path):
    model = copy.deepcopy(toy)
    mods = dict(model.named_modules())
    mods[LM_NAMES[0]].to(torch.bfloat16)
    mods[LM_NAMES[1]].to(torch.float16)
    env = _env(tmp_path / "pack", LAYERS=",".join(LM_NAMES[:3]), **W16A0)
    report = enable_duquant_if_configured(model, environ=env)
    assert sorted(report.replaced) == sorted(LM_NAMES[:3])
    dtypes = {e["name"]: e["source_dtype"] for e in load_pack(tmp_path / "pack").manifest["layers"]}
    assert dtypes == {LM_NAMES[0]: "BF16", LM_NAMES[1]: "F16", LM_NAMES[2]: "F32"}
    files = [f["name"] for f in load_pack(tmp_path / "pack").manifest["checkpoint"]["files"]]
    assert files == ["model-bf16.safetensors", "model-f16.safetensors", "model-f32.safetensors"]


def test_jobs_from_duquant_jobs(toy, tmp_path, monkeypatch):
    seen = {}
    real = duquant_pack.build.build_pack

    def spy(*a, **k):
        seen["jobs"] = k["jobs"]
        return real(*a, **k)
    monkeypatch.setattr(duquant_pack.build, "build_pack", spy)
    env = _env(tmp_path / "pack", LAYERS=LM_NAMES[0], **W16A0)
    env["DUQUANT_JOBS"] = "2"
    enable_duquant_if_configured(copy.deepcopy(toy), environ=env)
    assert seen["jobs"] == 2
    enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(tmp_path / "p2", LAYERS=LM_NAMES[0]))
    assert seen["jobs"] == 1


# --- an existing pack -----------------------------------------------------------------------------

@pytest.fixture
def w4_pack(toy, tmp_path):
    packdir = tmp_path / "w4"
    enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(packdir, WBITS_DEFAULT=4, ABITS=8))
    return packdir


def test_disagreement_with_existing_pack_shows_both_values(toy, w4_pack):
    model = copy.deepcopy(toy)
    files = tree_bytes(w4_pack)
    env = _env(w4_pack, WBITS_DEFAULT=3, ABITS=8, BLOCK=32, ACT_PCT=99.0)
    with pytest.raises(PackError) as exc:
        enable_duquant_if_configured(model, environ=env)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "OPENPI_DUQUANT_WBITS_DEFAULT='3' gives wbits=3, the pack has wbits=4" in msg
    assert "OPENPI_DUQUANT_BLOCK='32' gives block=32, the pack has block=16" in msg
    assert "act_percentile=99.0, the pack has act_percentile=99.9" in msg
    assert "ABITS" not in msg  # agrees
    assert _kinds(model) == _kinds(toy) and tree_bytes(w4_pack) == files


def test_share_inputs_compiles_linked_groups_and_is_compared(toy, tmp_path):
    packdir = tmp_path / "shared"
    report = enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(packdir, SHARE_INPUTS=1))
    assert report.compiled and len(report.input_groups) == 4  # q/k/v and gate/up of two layers
    assert load_pack(packdir).config["share_inputs"] is True
    again = enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(packdir, SHARE_INPUTS=1, ABITS=8))
    assert not again.compiled and len(again.input_groups) == 4
    with pytest.raises(PackError, match="SHARE_INPUTS='0' gives share_inputs=False, the pack has share_inputs=True"):
        enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(packdir, SHARE_INPUTS=0))


def test_unset_variables_are_not_compared(toy, w4_pack):
    """Only set variables are compared: a pack built with other defaults still loads."""
    report = enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(w4_pack, ABITS=8))
    assert len(report.replaced) == 14 and not report.compiled


def test_dryrun_changes_nothing(toy, w4_pack, tmp_path):
    model = copy.deepcopy(toy)
    files = tree_bytes(w4_pack)
    report = enable_duquant_if_configured(model, environ=_env(w4_pack, DRYRUN=1))
    assert report.replaced == [] and sorted(report.planned) == sorted(LM_NAMES)
    assert "dry run: 14 layers" in report.summary()
    # no pack yet: the plan comes from the compiler's selection; nothing is written
    fresh = tmp_path / "none"
    report = enable_duquant_if_configured(model, environ=_env(fresh, DRYRUN=1, LAYERS=LM_NAMES[3]))
    assert report.replaced == [] and report.planned == [LM_NAMES[3]] and not fresh.exists()
    assert _kinds(model) == _kinds(toy) and tree_bytes(w4_pack) == files


def test_calling_twice_on_one_model_is_an_error(toy, w4_pack):
    model = copy.deepcopy(toy)
    enable_duquant_if_configured(model, environ=_env(w4_pack, ABITS=8))
    with pytest.raises(PackError, match="already holds 14 DuQuantLinear"):
        enable_duquant_if_configured(model, environ=_env(w4_pack, ABITS=8))


def test_pack_from_other_weights_is_refused(w4_pack):
    other = Toy(seed=1)
    with pytest.raises(PackError, match="other weights"):
        enable_duquant_if_configured(other, environ=_env(w4_pack, ABITS=8))
    assert all(isinstance(m, nn.Linear) for n, m in other.named_modules() if n in LM_NAMES)


# --- errors ---------------------------------------------------------------------------------------

def test_unknown_variable_lists_known_ones(toy, tmp_path):
    with pytest.raises(EnvConfigError) as exc:
        enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(tmp_path / "p", WBITS_DEFALT=4))
    msg = str(exc.value)
    assert "OPENPI_DUQUANT_WBITS_DEFALT" in msg and all(f"OPENPI_DUQUANT_{k}" in msg for k in KNOWN_VARS)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("var,value,match", [
    ("ABITS", "eight", "not an integer"), ("WBITS_DEFAULT", "1", "1-bit"), ("BLOCK", "0", ">= 1"),
    ("PERMUTE", "2", "one of"), ("ROW_ROT", "propagate", "refused"), ("ROW_ROT", "yes", "one of"),
    ("ACT_PCT", "0", r"\(0, 100\]"), ("ACT_PCT", "nan", r"\(0, 100\]"), ("LS", "2", r"\[0, 1\]"),
    ("CALIB_STEPS", "0", ">= 1"), ("INCLUDE", "(", "regular expression"), ("WBITS", "q_proj", "NAME:BITS"),
    ("WBITS", "q_proj:x", "not an integer"), ("DRYRUN", "maybe", "1 or 0"),
])
def test_malformed_values(toy, tmp_path, var, value, match):
    model = copy.deepcopy(toy)
    with pytest.raises(EnvConfigError, match=match):
        enable_duquant_if_configured(model, environ=_env(tmp_path / "p", **{var: value}))
    assert _kinds(model) == _kinds(toy) and not (tmp_path / "p").exists()


def test_legacy_npz_dir_says_how_to_convert(toy, tmp_path):
    legacy = tmp_path / "old"
    legacy.mkdir()
    np.savez(legacy / f"{LM_NAMES[0]}.npz", weight_scale=np.ones(64, np.float32))
    model = copy.deepcopy(toy)
    with pytest.raises(PackError, match=r"legacy openpi_duquant \.npz.*duquant-pack import-legacy .*--ckpt CKPT --out PACK"):
        enable_duquant_if_configured(model, environ=_env(legacy, ABITS=8))
    assert _kinds(model) == _kinds(toy) and sorted(p.name for p in legacy.iterdir()) == [f"{LM_NAMES[0]}.npz"]


def test_selection_errors_propagate_and_leave_model_unchanged(toy, tmp_path):
    model = copy.deepcopy(toy)
    with pytest.raises(EnvConfigError, match="OPENPI_DUQUANT_LAYERS: no layer 'nope'"):
        enable_duquant_if_configured(model, environ=_env(tmp_path / "p", LAYERS="nope"))
    with pytest.raises(EnvConfigError, match="no layer matches OPENPI_DUQUANT_INCLUDE 'fc9'"):
        enable_duquant_if_configured(model, environ=_env(tmp_path / "p", INCLUDE="fc9"))
    with pytest.raises(EnvConfigError, match="LAYERS names 'action_out_proj' .* unless OPENPI_DUQUANT_INCLUDE_ACTION_HEAD=1"):
        enable_duquant_if_configured(model, environ=_env(tmp_path / "p", LAYERS="action_out_proj"))
    with pytest.raises(EnvConfigError, match="OPENPI_DUQUANT_WBITS: 'x' is not a selected layer"):
        enable_duquant_if_configured(model, environ=_env(tmp_path / "p", WBITS="x:8"))
    assert _kinds(model) == _kinds(toy) and not (tmp_path / "p").exists()


def test_missing_compiler_says_how_to_install(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "duquant_pack.build", None)  # import fails
    with pytest.raises(PackError, match="`pip install duquant` provides it"):
        enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(tmp_path / "p", ABITS=8))


def test_packdir_that_is_a_file(toy, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PackError, match="not a directory"):
        enable_duquant_if_configured(copy.deepcopy(toy), environ=_env(tmp_path / "f", ABITS=8))


# --- parsing and consistency with the compiler ----------------------------------------------------

def test_defaults_match_the_compiler_and_the_old_table():
    assert (openpi.OLD_INCLUDE, openpi.OLD_EXCLUDE) == (OLD_INCLUDE, OLD_EXCLUDE)
    env = read_env({"OPENPI_DUQUANT_DEBUG": "1"})
    assert env.packdir.as_posix() == "duquant_packed" and not env.dry_run and not env.include_action_head
    assert env.jobs == 1
    assert env.fields == {"wbits": 4, "abits": 8, "block": 16, "block_out": 16, "permute": "zigzag",
                          "row_rot": "restore", "lambda_smooth": 0.15, "act_percentile": 99.9,
                          "calib_steps": 32, "scope": "", "include": OLD_INCLUDE, "exclude": OLD_EXCLUDE,
                          "layers": None, "layer_wbits": {}, "share_inputs": False}


@pytest.mark.parametrize("env", [
    {},
    {"WBITS_DEFAULT": "16", "ABITS": "0", "BLOCK": "64", "BLOCK_OUT": "32", "PERMUTE": "0", "LS": "0.5"},
    {"WBITS_DEFAULT": "-1", "ABITS": "4", "ROW_ROT": "0", "BLOCK_OUT": "8", "ACT_PCT": "99",
     "CALIB_STEPS": "3", "LAYERS": "a, b,", "WBITS": "b:8,a:20", "SCOPE": "x.", "EXCLUDE": ""},
])
def test_parsed_fields_equal_the_compilers_resolved_config(env):
    """What an existing pack is compared with is exactly what a compile would record."""
    parsed = read_env({"OPENPI_DUQUANT_" + k: v for k, v in env.items()} | {"OPENPI_DUQUANT_DEBUG": "0"})
    fields = dict(parsed.fields)
    fields["layers"] = tuple(fields["layers"]) if fields["layers"] else None
    cfg = resolve(None, **fields)[0].to_dict()
    assert {k: cfg.get(k, openpi._FIELD_DEFAULTS.get(k)) for k in parsed.fields} == json.loads(json.dumps(parsed.fields))


def test_importing_the_runtime_pulls_in_no_compiler():
    code = ("import sys, duquant_runtime, duquant_runtime.openpi, duquant_runtime.calibration; "
            "bad = [m for m in ('duquant_pack', 'click', 'joblib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
