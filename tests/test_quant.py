"""duquant_runtime.quant: symmetric per-row integer quantization."""

import pytest
import torch

from duquant_runtime.quant import (absmax_scales, dequantize_rows, fake_quantize_rows, is_quantized, qrange,
                                   quantize_rows)


@pytest.mark.parametrize("bits,expect", [(2, (-2, 1)), (4, (-8, 7)), (8, (-128, 127)), (15, (-16384, 16383))])
def test_qrange(bits, expect):
    assert qrange(bits) == expect


@pytest.mark.parametrize("bits", [1, 0, 16, -3])
def test_qrange_rejects_unquantized_widths(bits):
    with pytest.raises(ValueError):
        qrange(bits)


@pytest.mark.parametrize("bits,expect", [(None, False), (0, False), (-1, False), (16, False), (32, False),
                                         (2, True), (4, True), (8, True), (15, True)])
def test_is_quantized(bits, expect):
    assert is_quantized(bits) is expect


def test_one_bit_counts_as_quantized_but_has_no_range():
    # documented: 0 < bits < 16 quantize; 1 is invalid and refused by qrange (config rejects it earlier)
    assert is_quantized(1) is True
    with pytest.raises(ValueError, match="2..15"):
        qrange(1)


def test_quantize_dequantize_round_half_even_and_clamp():
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 100.0, -100.0, 0.0]])
    s = torch.tensor([1.0])
    q = quantize_rows(w, s, 4)
    assert q.dtype == torch.int8
    assert q.tolist() == [[0, 2, 2, 0, -2, 7, -8, 0]]
    torch.testing.assert_close(dequantize_rows(q, s), q.float())
    torch.testing.assert_close(fake_quantize_rows(w, s, 4), dequantize_rows(q, s))


def test_int16_storage_above_8_bits():
    w = torch.randn(3, 10)
    assert quantize_rows(w, absmax_scales(w, 12), 12).dtype == torch.int16
    assert quantize_rows(w, absmax_scales(w, 8), 8).dtype == torch.int8


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_absmax_scales_reach_qmax_without_clipping(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 33, generator=g)
    s = absmax_scales(w, bits)
    qmin, qmax = qrange(bits)
    q = quantize_rows(w, s, bits)
    assert s.dtype == torch.float32 and s.shape == (6,)
    assert int(q.abs().amax()) == qmax  # the largest value of each row maps to +-qmax
    assert (q.to(torch.int32).abs().amax(dim=1) == qmax).all()
    # error per element at most half a step (no clipping happens with absmax scales)
    err = (fake_quantize_rows(w, s, bits) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


def test_absmax_scale_of_zero_row_is_one():
    w = torch.zeros(2, 5)
    w[1, 2] = 3.5
    s = absmax_scales(w, 4)
    assert s.tolist() == [1.0, pytest.approx(0.5)]
    assert torch.equal(fake_quantize_rows(w, s, 4)[0], torch.zeros(5))


def test_pack_int4_is_row_major_whatever_the_input_strides():
    """The GPU kernels index packed weights as row-major (N, K/2): a column-major input (as a
    transposed or GPU-computed tensor can be) must still give a contiguous, correct packing."""
    from duquant_runtime.quant import pack_int4, unpack_int4
    q = torch.randint(-8, 8, (40, 24), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    qt = q.t().contiguous().t()  # same values, column-major strides
    assert not qt.is_contiguous()
    p = pack_int4(qt)
    assert p.is_contiguous() and torch.equal(p, pack_int4(q))
    assert torch.equal(unpack_int4(p, 24), q)
