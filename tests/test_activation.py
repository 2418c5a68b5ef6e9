"""duquant_runtime.activation: streaming percentile (TopKPercentile) and activation fake quantization."""

import math

import pytest
import torch

from duquant_runtime.activation import TopKPercentile, fake_quantize_per_channel, fake_quantize_per_token
from duquant_runtime.quant import qrange


def _batches(sizes, channels=24, seed=0, heavy=True):
    """Batches (n, channels) with a heavy tail and two massive channels, like real activations."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, channels, generator=g)
        if heavy:
            x = x / torch.rand(n, channels, generator=g).clamp_min(0.05)  # heavy tail
            x[:, 3] *= 100.0
            x[:, 7] *= 1000.0
        out.append(x)
    return out


def _quantile(batches, q):
    a = torch.cat(batches).abs().double()
    return torch.quantile(a, q, dim=0)


# --- TopKPercentile ------------------------------------------------------------------------------

@pytest.mark.parametrize("percentile", [99.9, 99.0, 95.0, 90.0, 50.0, 100.0])
@pytest.mark.parametrize("sizes", [[40, 40, 40, 40], [64, 13, 50, 1, 64], [7]])
def test_topk_percentile_exact_within_budget(percentile, sizes):
    batches = _batches(sizes, seed=len(sizes) + int(percentile))
    obs = TopKPercentile(percentile, steps=len(sizes))
    for b in batches:
        obs.update(b)
    # within budget: the rank the percentile needs is among the kept values
    d = (sum(sizes) - 1) * (1 - percentile / 100)
    assert math.floor(d) + 1 < obs.k or obs.k >= sum(sizes), "test setup: must be within budget"
    got = obs.value()
    want = _quantile(batches, percentile / 100)
    assert got.shape == (24,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    assert obs.count == sum(sizes)


def test_topk_percentile_memory_is_bounded():
    batches = _batches([200] * 8)
    obs = TopKPercentile(99.9, steps=8)
    for b in batches:
        obs.update(b)
    # k = ceil(0.001 * 200 * 8 * 2) + 2 = 6 values per channel, not 1600
    assert obs.top.shape == (obs.k, 24) and obs.k <= 8
    torch.testing.assert_close(obs.value().double(), _quantile(batches, 0.999), rtol=2e-6, atol=0)


@pytest.mark.parametrize("percentile", [99.9, 99.0, 90.0])
def test_topk_percentile_over_budget_never_underestimates(percentile):
    # the first batch is small, later ones large: k (set from the first batch) is too small
    sizes = [2, 2000, 2000, 2000]
    batches = _batches(sizes, seed=3)
    obs = TopKPercentile(percentile, steps=2)
    for b in batches:
        obs.update(b)
    d = (sum(sizes) - 1) * (1 - percentile / 100)
    assert d > obs.k, "test setup: must be over budget"
    got = obs.value().double()
    want = _quantile(batches, percentile / 100)
    assert bool((got >= want * (1 - 1e-6)).all())
    # and it is the smallest kept value: the k-th largest |x| of each channel
    kth = torch.cat(batches).abs().topk(obs.k, dim=0).values[-1].double()
    torch.testing.assert_close(got, kth, rtol=1e-6, atol=0)
    assert bool((got > want * 1.001).any())  # really over budget (overestimates somewhere)


def test_topk_percentile_3d_batches_and_no_data():
    obs = TopKPercentile(99.0, steps=2)
    with pytest.raises(RuntimeError):
        obs.value()
    x = _batches([2 * 30, 2 * 30], seed=5)
    obs.update(x[0].reshape(2, 30, 24))
    obs.update(x[1].reshape(2, 30, 24))
    torch.testing.assert_close(obs.value().double(), _quantile(x, 0.99), rtol=2e-6, atol=0)


# --- fake quantization ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_values_on_grid_and_error_bound(bits):
    qmin, qmax = qrange(bits)
    x = _batches([37], channels=50, seed=bits)[0].reshape(37, 50)
    q = fake_quantize_per_token(x, bits)
    assert q.shape == x.shape and q.dtype == x.dtype
    s = (x.abs().amax(dim=-1, keepdim=True) / qmax)
    k = q / s
    assert bool(((k - k.round()).abs() <= 1e-4).all())  # integer multiples of the token's step
    assert bool((k.round() >= qmin).all() and (k.round() <= qmax).all())
    assert bool(((x - q).abs() <= s / 2 * (1 + 1e-5)).all())  # absmax: everything is in range
    # the absmax element of each token is represented exactly (maps to +-qmax)
    idx = x.abs().argmax(dim=-1, keepdim=True)
    torch.testing.assert_close(q.gather(1, idx), x.gather(1, idx), rtol=1e-6, atol=0)


def test_per_token_works_on_leading_dims_and_zero_rows():
    x = torch.randn(2, 3, 16)
    x[1, 2] = 0.0
    x[0, 0, :] = 0.0
    q = fake_quantize_per_token(x, 8)
    assert q.shape == x.shape and bool(torch.isfinite(q).all())
    assert torch.equal(q[1, 2], torch.zeros(16)) and torch.equal(q[0, 0], torch.zeros(16))
    torch.testing.assert_close(q[0, 1], fake_quantize_per_token(x[0, 1][None], 8)[0])
    qz = fake_quantize_per_token(torch.zeros(4, 8), 4)
    assert torch.equal(qz, torch.zeros(4, 8))


def test_per_token_bf16_keeps_dtype():
    x = torch.randn(5, 32).to(torch.bfloat16)
    q = fake_quantize_per_token(x, 8)
    assert q.dtype == torch.bfloat16 and bool(torch.isfinite(q.float()).all())


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_grid_error_bound_and_clamp(bits):
    qmin, qmax = qrange(bits)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 20, generator=g) * torch.linspace(0.1, 10, 20)
    s = (torch.quantile(x.abs(), 0.9, dim=0) / qmax).to(torch.float32)  # 10% of values clip
    q = fake_quantize_per_channel(x, s, bits)
    k = q / s
    assert bool(((k - k.round()).abs() <= 1e-4).all())
    kr = k.round()
    assert bool((kr >= qmin).all() and (kr <= qmax).all())
    inside = (x >= qmin * s) & (x <= qmax * s)
    assert bool(inside.any()) and bool((~inside).any())
    assert bool(((x - q).abs()[inside] <= (s.expand_as(x) / 2 * (1 + 1e-5))[inside]).all())
    # outside the range: clamped to the end of the grid, with the sign of x
    top = torch.where(x > 0, qmax * s, qmin * s).expand_as(x)
    torch.testing.assert_close(q[~inside], top[~inside], rtol=1e-6, atol=0)


def test_per_channel_round_half_to_even_and_zero_rows():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 200.0, -200.0, 0.0],
                      [0.0] * 8])
    q = fake_quantize_per_channel(x, torch.ones(8), 8)
    assert q.tolist() == [[0.0, 2.0, 2.0, 0.0, -2.0, 127.0, -128.0, 0.0], [0.0] * 8]
