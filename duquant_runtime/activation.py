"""Activation quantization (pure functions) and the streaming percentile used to calibrate it.

Modes, on the transformed activations x_t (..., in):
- ``dynamic``: per token, s = max_j |x_t[..., j]| / qmax (the DuQuant paper's choice);
- ``static``: per input channel, s_j = P_p(|x_t[:, j]|) / qmax, the p-th percentile over every
  token of the first `calib_steps` forward calls (the existing workflow's scheme, done right).
Values are quantized symmetrically to [-2^(b-1), 2^(b-1)-1] with round-half-to-even and returned
dequantized (q * s), in the dtype of the input.
"""

from __future__ import annotations

import math

import torch

from .quant import qrange

ACT_MODES = ("static", "dynamic")


def per_token_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (last-dim absmax) symmetric quantization of x (..., in): integer-valued
    codes (..., in) in x's dtype and scales (..., 1), x ~ codes * scales."""
    qmin, qmax = qrange(bits)
    s = x.abs().amax(dim=-1, keepdim=True) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(x / s), qmin, qmax), s


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic per-token (last-dim absmax) symmetric fake quantization of x (..., in)."""
    q, s = per_token_codes(x, bits)
    return q * s


def fake_quantize_per_channel(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Static per-channel symmetric fake quantization of x (..., in) with scale (in,) > 0."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


class TopKPercentile:
    """Exact per-channel upper percentile of |x| over a stream of batches, in bounded memory.

    Keeps the k largest |x| per channel, with k fixed after the first batch from the expected
    number of tokens (first batch tokens x `steps` x 2, a factor 2 of headroom). The percentile
    uses linear interpolation (numpy's default, = torch.quantile): exact as long as the rank it
    needs lies within the kept values; beyond that it uses the smallest kept value, which can
    only overestimate the scale. Memory: channels x k float32 values.
    """

    def __init__(self, percentile: float, steps: int):
        self.q = percentile / 100.0
        self.steps = steps
        self.count = 0  # tokens seen
        self.top: torch.Tensor | None = None  # (k, channels) descending
        self.k = 0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).abs().to(torch.float32)
        if self.top is None:
            self.k = max(2, math.ceil((1 - self.q) * a.shape[0] * self.steps * 2) + 2)
            cur = a
        else:
            cur = torch.cat([self.top, a], dim=0)
        k = min(self.k, cur.shape[0])
        self.top = torch.topk(cur, k, dim=0, largest=True, sorted=True).values
        self.count += a.shape[0]

    def value(self) -> torch.Tensor:
        """The per-channel percentile (channels,) of everything seen so far."""
        if self.top is None:
            raise RuntimeError("no data observed")
        d = (self.count - 1) * (1 - self.q)  # position counted from the largest
        lo = min(int(math.floor(d)), self.top.shape[0] - 1)
        hi = min(lo + 1, self.top.shape[0] - 1)
        frac = d - math.floor(d) if int(math.floor(d)) == lo else 0.0
        # descending order: position d lies between top[lo] (larger) and top[hi]
        return self.top[lo] + (self.top[hi] - self.top[lo]) * frac
