"""An MLP's hidden activation, act(gate) * up, computed where down_proj's prep loads its input.

In ``down_proj(act(gate_proj(x)) * up_proj(x))`` torch runs the activation and the product as
two elementwise launches between our GEMMs. `hidden` computes the same values inside the prep
launch of `w4a8._prep_kernel` from the loaded gate and up tiles (`w4a8.prepare_activation(up=,
act=)`), so down_proj's input is never written. Where down_proj's first launch does not read its
input through that prep (the Gluon activation passes of the language model's down_proj above 64
tokens), `hidden_launch` computes it in one elementwise launch instead of torch's two (the hidden
written once, gate and up read once).

Numerics are torch's CUDA kernels' for 16-bit inputs, bit for bit (GPU test): the activation in
float32 rounded to the input's dtype, then the product of the two 16-bit values (exact in
float32) rounded again:
- "gelu_tanh" (`F.gelu(approximate="tanh")`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
  tanh as libdevice's tanhf computes it (what torch's kernel calls) but without its branch;
- "silu" (`F.silu`): x / (1 + exp(-x)), libdevice's expf and a correctly rounded division.
Not "gelu" with erf: libdevice's erff differs from the one torch's kernel was built with in the
last bit for ~1.6% of bf16 inputs (measured on an H200), so such MLPs stay unfused.
The CPU interpreter (tests) has no libdevice and takes float64 formulas, equal up to float32
rounding.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# activation name -> the prep kernel's ACT constexpr (0: none)
ACT_CODES = {"gelu_tanh": 1, "silu": 2}
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


EX2_ASM = tl.constexpr("ex2.approx.ftz.f32 $0, $1;")
RCP_ASM = tl.constexpr("rcp.approx.ftz.f32 $0, $1;")


@triton.jit
def _tanh_hw(z):
    """tanh of float32 z, the value of libdevice's (and nvcc's) tanhf without its branch: both of
    its paths for every element, then a select. Inside a tile every element's branch was taken
    apart, which serialized them (the prep launch took 2x as long). |z| < 0.6: an odd polynomial;
    else 1 - 2 / (2^(2|z| log2 e) + 1) by ex2.approx and rcp.approx, 1 from |z| >= 9.01, z's sign."""
    t = tl.abs(z)
    e = tl.inline_asm_elementwise(EX2_ASM, "=r,r", [t * 2.885390043258667], dtype=tl.float32, is_pure=True, pack=1)
    r = tl.inline_asm_elementwise(RCP_ASM, "=r,r", [e + 1.0], dtype=tl.float32, is_pure=True, pack=1)
    big = tl.where(t >= 9.010913848876953, 1.0, tl.fma(r, -2.0, 1.0))
    big = (big.to(tl.uint32, bitcast=True) | (z.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32, bitcast=True)
    z2 = z * z
    p = tl.fma(tl.fma(tl.fma(tl.fma(0.01573968306183815, z2, -0.05230396240949631), z2, 0.13315297663211823), z2,
                      -0.33332768082618713), z2, 0.0)
    return tl.where(t < 0.6000000238418579, tl.fma(p, z, z), big)


@triton.jit
def _tanh_sw(z):
    """tanh of float32 z through float64 exp (the CPU interpreter): 1 - 2 / (e^2z + 1)."""
    e = tl.exp(2.0 * tl.minimum(tl.maximum(z.to(tl.float64), -40.0), 40.0))  # |z| > 40: +-1 in float32 anyway
    return (1.0 - 2.0 / (e + 1.0)).to(tl.float32)


@triton.jit
def _exp_hw(z):
    return libdevice.exp(z)


@triton.jit
def _exp_sw(z):
    return tl.exp(z.to(tl.float64)).to(tl.float32)


@triton.jit
def _round_hw(v, dtype: tl.constexpr):
    """float32 v rounded to the 16-bit `dtype` (to nearest even: cvt.rn)."""
    return v.to(dtype)


@triton.jit
def _round_sw(v, dtype: tl.constexpr):
    """`_round_hw` for the CPU interpreter, whose float32 -> bf16 conversion does not round to
    nearest even: the bf16 rounding done on the bits, then an exact conversion."""
    if dtype == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        v = b.to(tl.float32, bitcast=True)
    return v.to(dtype)


_tanh = _tanh_sw if _INTERPRET else _tanh_hw
_round = _round_sw if _INTERPRET else _round_hw
_exp = _exp_sw if _INTERPRET else _exp_hw


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """act(x) of float32 x, in float32 (ACT: `ACT_CODES`), in the order of torch's CUDA kernels."""
    if ACT == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
        y = 0.5 * x * (1.0 + _tanh(inner))
    else:  # ACT == 2
        y = tl.math.div_rn(x, 1.0 + _exp(-x))
    return y


@triton.jit
def hidden(gate, up, ACT: tl.constexpr, HAS_UP: tl.constexpr):
    """act(gate) * up (HAS_UP) or act(gate), for 16-bit tensors gate and up of one shape: the value
    torch computes, in gate's dtype (the activation rounded to it, then the product)."""
    h = _round(_activation(gate.to(tl.float32), ACT), gate.dtype)
    if HAS_UP:
        h = _round(h.to(tl.float32) * up.to(tl.float32), gate.dtype)
    return h


@triton.jit
def _hidden_kernel(g_ptr, u_ptr, out_ptr, n, zero_ptr, n_zero, ACT: tl.constexpr, HAS_UP: tl.constexpr,
                   BLOCK: tl.constexpr, PDL_WAIT: tl.constexpr, PDL: tl.constexpr, ZERO: tl.constexpr):
    """out[i] = hidden(g[i], u[i]) over a storage span of n elements, BLOCK per program. PDL_WAIT:
    launched early, wait for the producer of g and u first; PDL: let the next launch start (it
    waits for this one itself). ZERO: also zero zero_ptr float32 (n_zero,) (a consumer's scratch)."""
    if PDL_WAIT:
        gdc_wait()
    if PDL:
        gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0) if HAS_UP else g
    tl.store(out_ptr + offs, hidden(g, u, ACT, HAS_UP), mask=ok)
    if ZERO:
        tl.store(zero_ptr + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < n_zero)


def storage_span(t: torch.Tensor) -> int | None:
    """Elements from t's first to one past its last, for a t whose elements do not overlap, with
    positive strides and at most as many gaps as elements (a contiguous tensor, a permutation of one's
    dimensions such as a token-minor (M, K) = (K, M)^T, or that with padded rows: `w4a8.w4_gemm`'s
    token-minor output); else None."""
    if t.numel() == 0:
        return 0
    reach = 1
    for st, sz in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if st < reach:  # overlapping (or a zero stride)
            return None
        reach += st * (sz - 1)
    return reach if reach <= 2 * t.numel() else None


def _launch_span(gate: torch.Tensor, up: torch.Tensor | None) -> int | None:
    """gate's `storage_span` where `hidden_launch` takes these operands, else None."""
    if gate.dtype not in (torch.bfloat16, torch.float16):
        return None
    if up is not None and (up.shape != gate.shape or up.dtype != gate.dtype or up.stride() != gate.stride()):
        return None
    return storage_span(gate)


def launchable(gate: torch.Tensor, up: torch.Tensor | None) -> bool:
    """Whether `hidden_launch` takes these operands: 16-bit, a `storage_span`, up (if any) with
    gate's shape, dtype and strides."""
    return _launch_span(gate, up) is not None


def hidden_launch(gate: torch.Tensor, up: torch.Tensor | None, act: str, *, early: bool = False,
                  pdl: bool = False, zero: torch.Tensor | None = None, block: int = 2048) -> torch.Tensor:
    """act(gate) * up (up None: act(gate)) in one launch: a tensor of gate's shape, dtype and
    strides with torch's values (`hidden`), for operands `launchable` accepts. The launch runs over
    the storage span, gaps included (what lies in gate's gaps gives the output's gaps, unread). early:
    launched with PDL, it waits for its producer; pdl: it lets the next launch start early. zero: a
    float32 buffer it zeroes too (at most gate.numel() elements)."""
    if act not in ACT_CODES:
        raise ValueError(f"hidden_launch: act must be one of {sorted(ACT_CODES)}, got {act!r}")
    n = _launch_span(gate, up)
    if n is None:
        raise ValueError(f"hidden_launch: needs a 16-bit gate without overlaps or wide gaps and an up like it, got "
                         f"{gate.dtype} strides "
                         f"{gate.stride()} and {None if up is None else (up.dtype, up.stride())}")
    out = torch.empty_strided(gate.shape, gate.stride(), dtype=gate.dtype, device=gate.device)
    if n == 0:
        return out
    if zero is not None and zero.numel() > gate.numel():
        raise ValueError(f"hidden_launch: zero has {zero.numel()} elements, more than the {n} programs cover")
    _hidden_kernel[(triton.cdiv(n, block),)](
        gate, up if up is not None else gate, out, n, zero if zero is not None else out,
        zero.numel() if zero is not None else 0, ACT=ACT_CODES[act], HAS_UP=up is not None, BLOCK=block,
        PDL_WAIT=early, PDL=pdl, ZERO=zero is not None, num_warps=4, **({"launch_pdl": True} if early else {}))
    return out


__all__ = ["ACT_CODES", "hidden", "hidden_launch", "launchable"]
