"""duquant_pack.scales: per-row weight scales ('max' and the 'mse' grid search)."""

import pytest
import torch

import duquant_pack.scales as scales_mod
from duquant_pack.scales import MSE_ALPHAS, weight_scales
from duquant_runtime.quant import absmax_scales, fake_quantize_rows


def _heavy(out_f=32, in_f=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[:, 3] *= 20  # an outlier column: clipping helps 'mse'
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_never_worse_than_max_per_row(bits):
    w = _heavy(seed=bits)
    s_mse, e_mse = weight_scales(w, bits, "mse")
    s_max, e_max = weight_scales(w, bits, "max")
    assert bool((e_mse <= e_max).all())
    if bits <= 4:  # and strictly better somewhere on heavy tails at low bit widths
        assert float(e_mse.sum()) < float(e_max.sum())
    torch.testing.assert_close(s_max, absmax_scales(w, bits))


@pytest.mark.parametrize("method", ["mse", "max"])
def test_reported_error_is_the_rows_quantization_error(method):
    w = _heavy(seed=1)
    s, e = weight_scales(w, 4, method)
    assert s.dtype == torch.float32 and e.dtype == torch.float64 and s.shape == e.shape == (32,)
    recomputed = (fake_quantize_rows(w, s, 4) - w).double().pow(2).sum(dim=1)
    torch.testing.assert_close(e, recomputed, rtol=1e-6, atol=1e-12)


def test_mse_scales_come_from_the_alpha_grid_and_are_optimal():
    w = _heavy(seed=2)
    s, e = weight_scales(w, 4, "mse")
    base = absmax_scales(w, 4)
    for i in range(w.shape[0]):
        cands = [(base[i] / a).to(torch.float32) for a in MSE_ALPHAS]
        errs = [float((fake_quantize_rows(w[i:i + 1], c.reshape(1), 4) - w[i:i + 1]).double().pow(2).sum())
                for c in cands]
        assert any(float(s[i]) == float(c) for c in cands)
        assert float(e[i]) == pytest.approx(min(errs), rel=1e-6)


def test_ties_keep_the_earlier_alpha():
    w = torch.zeros(2, 8)  # a zero row: every alpha gives error 0 -> first alpha (0.5) kept
    w[1] = 1.0  # all ones: only alpha 1 (s = 1/7) is exact, so it wins over the earlier 0.5 and 0.75
    s, e = weight_scales(w, 4, "mse")
    assert float(s[0]) == pytest.approx(1.0 / MSE_ALPHAS[0])
    assert float(e[0]) == 0.0
    assert float(s[1]) == pytest.approx(1.0 / 7)
    assert float(e[1]) == pytest.approx(0.0, abs=1e-12)


def test_chunking_does_not_change_results(monkeypatch):
    w = _heavy(out_f=37, in_f=50, seed=4)
    ref = weight_scales(w, 4, "mse")
    monkeypatch.setattr(scales_mod, "_CHUNK_ELEMS", 120)  # 2 rows per chunk
    got = weight_scales(w, 4, "mse")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_unknown_method_rejected():
    with pytest.raises(ValueError):
        weight_scales(torch.ones(2, 2), 4, "percentile")
