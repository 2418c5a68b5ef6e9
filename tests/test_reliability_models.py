"""Reliability: a pack applied to a model it does not fit (docs/reliability.md §4).

Every mismatch raises `PackError` naming the module and leaves the model exactly as it was
(values, dtypes, module types and identities), even when the mismatch is in the last layer of the
pack, after the others passed their checks. The explicit overrides do what they say and no more:
`strict=False` skips missing modules, `force=True` accepts other weights (with a warning) but
never another shape, `name_map` maps names.
"""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import torch
from torch import nn

from duquant_runtime import DuQuantLinear, PackError, apply_pack, load_pack

from _reliability_util import (SMALL_NAMES, assert_unchanged, build_small_pack, model_from_tensors, small_tensors,
                               snapshot)

LAST = SMALL_NAMES[-1]  # net.b.up_proj: checked after the three others passed


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    return build_small_pack(d / "ckpt", d / "pack")


def _model(**replace):
    """The small checkpoint's model with some modules replaced ({dotted name: module or None})."""
    model = model_from_tensors(small_tensors())
    for name, mod in replace.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if mod is None:
            delattr(parent, attr)
        else:
            setattr(parent, attr, mod)
    return model


def _other_weights(name, delta_index=(0, 0)):
    """The module `name` with one weight value moved to the next representable number of its dtype."""
    t = small_tensors()
    w = t[name + ".weight"].clone()
    w[delta_index] = torch.nextafter(w[delta_index].float(), torch.tensor(float("inf"))).to(w.dtype)
    if w[delta_index] == t[name + ".weight"][delta_index]:  # bf16/f16: one step of the narrow dtype
        w[delta_index] = (w[delta_index].float() * 1.01).to(w.dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=name + ".bias" in t, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if lin.bias is not None:
            lin.bias.copy_(t[name + ".bias"])
    assert not torch.equal(lin.weight, t[name + ".weight"])
    return lin


def _refused(model, pack, pattern, **kw):
    snap = snapshot(model)
    with pytest.raises(PackError) as ei:
        apply_pack(model, pack, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
    assert_unchanged(model, snap)
    return msg


# --- the mismatches ----------------------------------------------------------------------------------

SHAPE = r"module 'net\.b\.up_proj' has weight \[32, 33\], pack layer expects \[32, 32\]"
CASES = {
    "layer of another width": (lambda: _model(**{LAST: nn.Linear(33, 32, dtype=torch.float16)}), SHAPE),
    "layer transposed": (lambda: _model(**{"net.a.q_proj": nn.Linear(24, 41, dtype=torch.bfloat16)}),
                         r"module 'net\.a\.q_proj' has weight \[41, 24\], pack layer expects \[24, 41\]"),
    "missing module": (lambda: _model(**{LAST: None}),
                       r"pack layer 'net\.b\.up_proj' has no module in the model \(strict=False skips it"),
    "module of another type": (lambda: _model(**{LAST: nn.Conv1d(32, 32, 1)}),
                               r"module 'net\.b\.up_proj' is a Conv1d, not nn\.Linear"),
    "weights differ by one value": (lambda: _model(**{LAST: _other_weights(LAST)}),
                                    r"module 'net\.b\.up_proj' holds other weights than the checkpoint the pack "
                                    r"was built from \(fingerprint .*\); rebuild the pack for these weights, or force=True"),
    "weights of another seed": (lambda: model_from_tensors(small_tensors(seed=1)),
                                r"module 'net\.a\.down_proj' holds other weights"),
    "NaN in a model weight": (lambda: _model(**{LAST: _nan_linear()}), r"module 'net\.b\.up_proj' has NaN/Inf weights"),
    "unrelated model": (lambda: nn.Sequential(nn.Linear(41, 24), nn.ReLU(), nn.Linear(24, 41)),
                        r"pack layer 'net\.a\.down_proj' has no module in the model"),
}


def _nan_linear():
    lin = _other_weights(LAST)
    with torch.no_grad():
        lin.weight[3, 3] = float("nan")
    return lin


@pytest.mark.parametrize("case", list(CASES))
def test_mismatch_refused_model_unchanged(case, small):
    make, pattern = CASES[case]
    _refused(make(), small, pattern)


@pytest.mark.parametrize("case", ["layer of another width", "layer transposed", "module of another type",
                                  "NaN in a model weight"])
def test_no_override_applies_a_wrong_shape_or_type(case, small):
    """force and strict=False relax weights and missing modules, never shapes, types or values."""
    make, pattern = CASES[case]
    _refused(make(), small, pattern, force=True, strict=False)


def test_strict_false_skips_the_missing_module_only(small):
    model = _model(**{LAST: None})
    report = apply_pack(model, small, strict=False)
    assert report.skipped == [(LAST, "no such module")]
    assert sorted(report.replaced) == sorted(SMALL_NAMES[:-1])
    assert all(isinstance(model.get_submodule(n), DuQuantLinear) for n in SMALL_NAMES[:-1])


def test_force_applies_other_weights_with_a_warning(small):
    model = _model(**{LAST: _other_weights(LAST)})
    with pytest.warns(UserWarning, match=r"net\.b\.up_proj.*applying anyway \(force=True\)"):
        report = apply_pack(model, small, force=True)
    assert sorted(report.replaced) == sorted(SMALL_NAMES)
    assert len(report.warnings) == 1 and LAST in report.warnings[0]


def test_same_values_in_another_dtype_are_the_same_weights(small):
    """Not a mismatch: the fingerprint is of the values (a bf16 checkpoint held in float32)."""
    t = {k: v.float() for k, v in small_tensors().items()}
    report = apply_pack(model_from_tensors(t), small)
    assert sorted(report.replaced) == sorted(SMALL_NAMES) and report.warnings == []


def test_pack_applied_twice_is_refused_and_the_first_application_kept(small):
    model = model_from_tensors(small_tensors())
    apply_pack(model, small)
    before = {n: id(m) for n, m in model.named_modules()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PackError, match=r"module 'net\.a\.down_proj' is already a DuQuantLinear \(pack applied twice\?\)"):
        apply_pack(model, small)
    assert {n: id(m) for n, m in model.named_modules()} == before
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


class _TwoCandidates(nn.Module):
    """Two modules whose names both end with '.net.a.q_proj': the automatic match is ambiguous."""

    def __init__(self):
        super().__init__()
        self.left = model_from_tensors(small_tensors())
        self.right = model_from_tensors(small_tensors())


def test_ambiguous_names_refused_and_name_map_resolves(small):
    model = _TwoCandidates()
    _refused(model, small, r"pack layer 'net\.a\.down_proj' matches several modules \(left\.net\.a\.down_proj, "
                           r"right\.net\.a\.down_proj\); pass name_map")
    report = apply_pack(model, small, name_map=lambda n: "right." + n)
    assert sorted(report.replaced) == sorted("right." + n for n in SMALL_NAMES)
    assert not any(isinstance(m, DuQuantLinear) for m in model.left.modules())


def test_name_map_to_a_missing_module_is_refused(small):
    model = model_from_tensors(small_tensors())
    _refused(model, small, r"pack layer 'net\.a\.down_proj' has no module", name_map={"net.a.down_proj": "nope"})


# --- the wrong architecture: a pi0.5 pack on a pi0 model -------------------------------------------

@pytest.fixture(scope="module")
def pi0_model(tmp_path_factory):
    """pi0 (not pi0.5) with the same layer names and shapes as the pi05-llm-expert pack of `built_pack`
    (synthetic weights depend on the seed and the tensor name only: another seed, other weights)."""
    from duquant_pack.synth import write_synth
    from safetensors.torch import load_file
    d = tmp_path_factory.mktemp("pi0")
    path = write_synth(d, "pi0", layers=2, width_div=8, seed=1,
                       include=r"(language_model|gemma_expert\.model)\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
    return model_from_tensors(load_file(str(path)))


def test_pi05_pack_on_a_pi0_model_refused_then_forced(built_pack, pi0_model):
    model = copy.deepcopy(pi0_model)
    names = load_pack(built_pack).layer_names
    assert sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear)) == sorted(names)
    _refused(model, built_pack, r"holds other weights than the checkpoint the pack was built from")
    with pytest.warns(UserWarning):
        report = apply_pack(model, built_pack, force=True, abits=0)
    assert len(report.replaced) == len(report.warnings) == 28


def test_pi05_pack_on_a_wider_model_refused_even_forced(built_pack):
    """Same names, other widths (another size of the architecture): a shape error, whatever the override."""
    pack = load_pack(built_pack)
    root = nn.Module()
    for name in pack.layer_names:
        e = pack.entry(name)
        *parents, leaf = name.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        mod.add_module(leaf, nn.Linear(e["in_features"] * 2, e["out_features"] * 2, bias=False))
    _refused(root, built_pack, r"has weight \[\d+, \d+\], pack layer expects \[\d+, \d+\]", force=True, strict=False)


def test_failure_in_a_layer_file_after_other_checks_passed(small, tmp_path):
    """A layer file that fails its checks while the modules all fit: still nothing replaced."""
    pack = tmp_path / "pack"
    shutil.copytree(small, pack)
    e = load_pack(pack).entry(LAST)
    (pack / e["file"]).write_bytes(b"\x00" * 64)
    _refused(model_from_tensors(small_tensors()), pack, r"checksum mismatch \(file changed or corrupt; layer 'net\.b\.up_proj'\)")
