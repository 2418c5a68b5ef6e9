"""duquant_pack.gptq: GPTQ lowers the proxy loss tr(dW H dW^T) against round-to-nearest with the same
scales; the transformed Hessian is M^T H M."""

import torch

from duquant_pack.gptq import gptq_quantize, proxy_loss, transformed_hessian
from duquant_pack.hadamard import random_rotations
from duquant_pack.scales import weight_scales
from duquant_runtime.quant import fake_quantize_rows
from duquant_runtime.transforms import input_transform


def _layer(out_f=32, in_f=96, tokens=400):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3  # correlated inputs
    x[:, 3] *= 10
    return w, (x.double().T @ x.double())


def test_gptq_lowers_the_proxy_loss_vs_rtn():
    w, h = _layer()
    for bits in (3, 4):
        scale = weight_scales(w, bits, "mse")[0]
        rtn = fake_quantize_rows(w, scale, bits)
        q, s = gptq_quantize(w, h, bits, row_scale=scale)
        assert q.dtype == torch.int8 and torch.equal(s, scale)
        gptq = q.float() * s[:, None]
        assert proxy_loss(gptq, w, h) < 0.8 * proxy_loss(rtn, w, h)
        q2, _ = gptq_quantize(w, h, bits, row_scale=scale)
        assert torch.equal(q, q2)  # deterministic


def test_grouped_gptq_scales_and_range():
    w, h = _layer()
    q, s = gptq_quantize(w, h, 4, group_size=40)
    assert s.shape == (32, 3) and bool((s > 0).all())
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    full = gptq_quantize(w, h, 4)[0]
    w_hat = q.float() * s.repeat_interleave(40, 1)[:, :96]
    assert proxy_loss(w_hat, w, h) < proxy_loss(full.float() * weight_scales(w, 4, "mse")[0][:, None], w, h)


def test_transformed_hessian_is_the_second_moment_of_transformed_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 20, generator=g, dtype=torch.float64)
    smooth = torch.rand(20, generator=g) + 0.5
    perm = torch.randperm(20, generator=g)
    r = random_rotations(20, 8, seed=0)
    xt = input_transform(x / smooth.double(), perm, r)
    h_t = transformed_hessian(x.T @ x, smooth, perm, r)
    torch.testing.assert_close(h_t, xt.T @ xt, rtol=1e-10, atol=1e-10)
