"""duquant_runtime.collect_stats: statistics equal their definitions, and the same batches give the
same file, byte for byte."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from duquant_runtime import collect_stats
from duquant_runtime.errors import DuquantError
from duquant_runtime.stats import STATS_FORMAT_NAME, stats_datasets_sha256


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8))


def _batches():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 5, 24, generator=g) for _ in range(4)]
    xs[2][0, 1, 7] = 50.0  # an outlier channel
    return xs


def test_stats_match_definitions(tmp_path):
    model, xs = _model(), _batches()
    out = collect_stats(model, xs, out=tmp_path / "s.h5", second_moment=True, percentiles=(50.0, 100.0),
                        sample_tokens=7)
    x = torch.cat([b.reshape(-1, 24) for b in xs]).double()
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == STATS_FORMAT_NAME and f.attrs["batches"] == 4
        assert set(f.keys()) == {"0", "2"}
        g = f["0"]
        assert g.attrs["tokens"] == 60
        np.testing.assert_array_equal(g["absmax"][()], x.abs().amax(0).float().numpy())
        np.testing.assert_allclose(g["xtx"][()], (x.T @ x).numpy(), rtol=1e-12)
        assert g["xtx"].compression == "gzip" and g["xtx"].dtype == np.float64
        np.testing.assert_array_equal(g["sample"][()], x[:7].float().numpy())
        p = g["percentiles"][()]
        np.testing.assert_allclose(p[0], torch.quantile(x.abs().float(), 0.5, dim=0).numpy(), rtol=1e-6)
        np.testing.assert_array_equal(p[1], g["absmax"][()])
        assert g.attrs["data_sha256"] == stats_datasets_sha256({k: g[k][()] for k in g.keys()})
        assert f["2"]["absmax"].shape == (40,)


def test_two_runs_of_the_same_batches_are_identical(tmp_path):
    a = collect_stats(_model(), _batches(), out=tmp_path / "a.h5", second_moment=True)
    b = collect_stats(_model(), _batches(), out=tmp_path / "b.h5", second_moment=True)
    assert a.read_bytes() == b.read_bytes()
    c = collect_stats(_model(), _batches()[:3], out=tmp_path / "c.h5", second_moment=True)
    assert c.read_bytes() != a.read_bytes()


def test_layer_selection_and_errors(tmp_path):
    out = collect_stats(_model(), _batches(), out=tmp_path / "s.h5", layers=["2"])
    with h5py.File(out, "r") as f:
        assert set(f.keys()) == {"2"} and "xtx" not in f["2"]
    with pytest.raises(DuquantError, match="no nn.Linear named"):
        collect_stats(_model(), _batches(), out=tmp_path / "x.h5", layers=["9"])
    with pytest.raises(DuquantError, match="selects no"):
        collect_stats(_model(), _batches(), out=tmp_path / "x.h5", layers=r"^nothing$")
