"""Smoothing (duquant_pack.smoothing) with each rotation, built into a pack and applied with
quantization off, reproduces nn.Linear to float32 rounding; the smoothing factors follow their formula."""

import copy

import pytest
import torch
from torch import nn

from duquant_pack.act_stats import stats_file_id
from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_pack.smoothing import smoothing_factors
from duquant_runtime import DuQuantLinear, apply_pack, collect_stats, load_pack

from _util import save_ckpt


def _model_and_data(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 40))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 48, generator=g) for _ in range(3)]
    for x in xs:
        x[:, 5] *= 40  # outlier channel
    save_ckpt(tmp_path / "ckpt", {k: v for k, v in model.state_dict().items()})
    stats = collect_stats(model, xs, out=tmp_path / "stats.h5", second_moment=True)
    return model, xs, stats


def test_smoothing_factors_formula():
    act = torch.tensor([4.0, 0.0, 1.0])
    w = torch.tensor([[2.0, 1.0, 0.0], [-1.0, 3.0, 0.0]])
    s = smoothing_factors(act, w, 0.5)
    assert torch.allclose(s, torch.tensor([(4.0 ** 0.5) / (2.0 ** 0.5), 1.0, 1.0]))
    assert torch.allclose(smoothing_factors(act, w, 1.0), torch.tensor([4.0, 1.0, 1.0]))


@pytest.mark.parametrize("rotation", ["svd", "hadamard", "random", "greedy"])
def test_smoothing_and_rotation_with_quantization_off_is_exact(tmp_path, rotation):
    model, xs, stats = _model_and_data(tmp_path)
    cfg, _ = resolve(None, include=r"^\d+$", exclude="", wbits=16, abits=0, rotation=rotation,
                     row_rot="restore", block=32, lambda_smooth=0.5, act_stats=stats_file_id(stats))
    build_pack(tmp_path / "ckpt", tmp_path / "pack", cfg, jobs=1, progress=False, act_stats=stats)
    pack = load_pack(tmp_path / "pack")
    lp = pack.layer("0")
    assert lp.smooth is not None and not torch.allclose(lp.smooth, torch.ones(48))
    m = copy.deepcopy(model)
    apply_pack(m, pack, abits=0)
    assert isinstance(m[0], DuQuantLinear) and m[0].smooth is not None
    x = torch.cat(xs)
    with torch.no_grad():
        ref, y = model(x), m(x)
    assert float((y - ref).abs().max() / ref.abs().max()) < 2e-6
