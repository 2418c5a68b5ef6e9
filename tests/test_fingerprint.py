"""duquant_runtime.fingerprint: canonical weight fingerprints across float dtypes."""

import hashlib

import pytest
import torch

import duquant_runtime.fingerprint as fpmod
from duquant_runtime.fingerprint import weight_fingerprint


def _bf16_values(shape=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def test_same_values_bf16_and_float32_same_fingerprint():
    w = _bf16_values()
    fp_bf16 = weight_fingerprint(w)
    fp_f32 = weight_fingerprint(w.to(torch.float32))
    assert fp_bf16 == fp_f32
    assert fp_bf16.startswith("bf16:")


def test_float16_and_float64_with_bf16_exact_values_match():
    w = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]])  # exact in bf16, fp16, fp32, fp64
    ref = weight_fingerprint(w.to(torch.bfloat16))
    assert weight_fingerprint(w.to(torch.float16)) == ref
    assert weight_fingerprint(w.to(torch.float64)) == ref
    assert weight_fingerprint(w) == ref


def test_bf16_digest_is_documented_encoding():
    w = _bf16_values((3, 4))
    expect = hashlib.sha256(b"shape=3x4;" + w.contiguous().view(torch.int16).numpy().astype("<i2").tobytes())
    assert weight_fingerprint(w) == "bf16:" + expect.hexdigest()


def test_f32_prefix_for_values_not_exact_in_bf16():
    w = torch.tensor([[1.0 + 2.0 ** -10, 2.0], [3.0, 4.0]], dtype=torch.float32)
    fp = weight_fingerprint(w)
    assert fp.startswith("f32:")
    expect = hashlib.sha256(b"shape=2x2;" + w.numpy().astype("<f4").tobytes()).hexdigest()
    assert fp == "f32:" + expect
    # rounding it to bf16 gives other values, hence another fingerprint
    assert weight_fingerprint(w.to(torch.bfloat16)) != fp


def test_single_changed_value_changes_fingerprint():
    w = _bf16_values((16, 16)).to(torch.float32)
    base = weight_fingerprint(w)
    for idx in [(0, 0), (7, 3), (15, 15)]:
        w2 = w.clone()
        w2[idx] = w2[idx] * 2 + 1
        assert weight_fingerprint(w2) != base
    # a one-ulp change in float32 too
    w3 = w.clone()
    w3[3, 3] = torch.nextafter(w3[3, 3], torch.tensor(float("inf")))
    f3 = weight_fingerprint(w3)
    assert f3 != base and f3.startswith("f32:")


def test_shape_is_part_of_the_fingerprint():
    w = _bf16_values((4, 6))
    assert weight_fingerprint(w) != weight_fingerprint(w.reshape(6, 4))
    assert weight_fingerprint(w) != weight_fingerprint(w.reshape(-1))


def test_non_contiguous_input_same_as_contiguous():
    w = _bf16_values((6, 8)).to(torch.float32)
    t = w.t()  # non-contiguous view
    assert not t.is_contiguous()
    assert weight_fingerprint(t) == weight_fingerprint(t.contiguous())


def test_chunking_does_not_change_the_result(monkeypatch):
    mixed = torch.randn(9, 11, generator=torch.Generator().manual_seed(1))  # not bf16-exact
    exact = _bf16_values((9, 11)).to(torch.float32)
    exact_but_last = exact.clone()
    exact_but_last[-1, -1] += 2.0 ** -20  # only the very last element breaks bf16 exactness
    ref = [weight_fingerprint(t) for t in (mixed, exact, exact_but_last)]
    monkeypatch.setattr(fpmod, "_CHUNK", 4)
    got = [weight_fingerprint(t) for t in (mixed, exact, exact_but_last)]
    assert got == ref
    assert [g[:4] for g in got] == ["f32:", "bf16", "f32:"]


def test_deterministic_and_well_formed():
    w = _bf16_values((5, 5))
    a, b = weight_fingerprint(w), weight_fingerprint(w.clone())
    assert a == b
    prefix, digest = a.split(":")
    assert prefix == "bf16" and len(digest) == 64 and int(digest, 16) >= 0


def test_float64_not_exact_in_float32_is_rejected():
    w = torch.tensor([[1.0 + 2.0 ** -40]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not exact in float32"):
        weight_fingerprint(w)


def test_non_float_tensor_is_rejected():
    with pytest.raises(TypeError):
        weight_fingerprint(torch.ones(2, 2, dtype=torch.int32))
