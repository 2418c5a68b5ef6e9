"""`DuQuantLinear`: a drop-in for `nn.Linear` that runs a pack's transforms with quantized weights.

    y = ((Q_a(x P BD(R_in))) Q_w(W_t)^T) BD(R_out)^T + b,   W_t = BD(R_out)^T W P BD(R_in)

Built once from the float module and the pack (`from_linear`): the transformed weight is quantized
with the pack's per-row scales and kept as int8 integers plus float32 scales; the float weight is
not kept. Transforms run in float32 (float64 when the input is float64); the output has the
input's dtype. With weights and activations unquantized it equals `nn.Linear` to rounding.

This is the CPU reference path (fake-quantized matmul in float); fast low-bit kernels are a
separate backend with the same numerics.
"""

from __future__ import annotations

import torch
from torch import nn

from .activation import ACT_MODES, TopKPercentile, fake_quantize_per_channel, fake_quantize_per_token
from .errors import PackError
from .pack import LayerPack
from .quant import is_quantized, qrange, quantize_rows, unpack_int4
from .transforms import input_transform, output_restore, transform_weight


_FLOAT32_BUFFERS = ("r_in", "r_out", "w_scale", "act_scale", "weight_t")


class DuQuantLinear(nn.Module):
    """Linear layer with DuQuant input/output rotations, int weights and quantized activations.

    Buffers (all in `state_dict`): ``perm`` int64 (in,) or absent; ``r_in`` float32 (nb, B, B);
    ``r_out`` float32 or absent; ``qweight`` int8 (out, in) and ``w_scale`` float32 (out,) when the
    weight is quantized, else ``weight_t`` (out, in) float; ``act_scale`` float32 (in,) once static
    activation scales are calibrated. ``bias`` stays a parameter in the original dtype.

    ``model.to(dtype)`` / ``.half()`` move these float buffers between devices but never narrow
    them (transforms stay float32; ``.double()`` widens them); the dtype change is recorded and reported by
    ``weight``: a data-free stand-in (meta tensor of shape (out, in)) for model code that reads
    ``layer.weight.dtype`` or ``.shape``; using its values fails loudly.
    """

    def __init__(self, in_features: int, out_features: int, *, wbits: int, abits: int,
                 act_mode: str = "static", act_percentile: float = 99.9, calib_steps: int = 32,
                 name: str = ""):
        super().__init__()
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
        for bits, what in ((wbits, "wbits"), (abits, "abits")):
            if bits and is_quantized(bits):
                qrange(bits)  # validates 2..15
        self.in_features = in_features
        self.out_features = out_features
        self.wbits = wbits if is_quantized(wbits) else 0
        self.abits = abits if is_quantized(abits) else 0
        self.act_mode = act_mode
        self.act_percentile = act_percentile
        self.calib_steps = calib_steps
        self.name = name
        self._observer: TopKPercentile | None = None
        self._weight_dtype = torch.float32
        self.calib_calls = 0
        for key in ("perm", "r_in", "r_out", "qweight", "w_scale", "weight_t", "act_scale"):
            self.register_buffer(key, None)
        self.bias: nn.Parameter | None = None

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, layer: LayerPack, *, abits: int = 0,
                    act_mode: str = "static", act_percentile: float = 99.9, calib_steps: int = 32,
                    act_scale: torch.Tensor | None = None) -> "DuQuantLinear":
        """Build from a float `nn.Linear` and its pack entry (shapes must agree).

        `abits` 0 leaves activations unquantized; `apply_pack` passes the pack's setting.
        """
        w = linear.weight
        if tuple(w.shape) != (layer.out_features, layer.in_features):
            raise PackError(f"layer '{layer.name}': module weight is {list(w.shape)}, pack expects "
                            f"[{layer.out_features}, {layer.in_features}]")
        m = cls(layer.in_features, layer.out_features, wbits=layer.wbits,
                abits=abits, act_mode=act_mode,
                act_percentile=act_percentile, calib_steps=calib_steps, name=layer.name)
        dev = w.device
        wdt = torch.float64 if w.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            perm = layer.perm.to(dev) if layer.perm is not None else None
            r_in = layer.r_in.to(dev, wdt)
            r_out = layer.r_out.to(dev, wdt) if layer.r_out is not None else None
            if m.wbits and layer.qweight is not None:  # stored integers: the float weight is not read
                q = layer.qweight
                m.qweight = (unpack_int4(q, layer.in_features) if m.wbits <= 4 else q.to(torch.int16 if m.wbits > 8 else torch.int8)).to(dev)
                m.w_scale = layer.weight_scale.to(dev, torch.float32)
            else:
                w_t = transform_weight(w.detach().to(wdt), perm, r_in, r_out)
                if m.wbits:
                    scale = layer.weight_scale.to(dev, torch.float32)
                    m.qweight = quantize_rows(w_t.to(torch.float32), scale, m.wbits)
                    m.w_scale = scale
                else:
                    m.weight_t = w_t
                del w_t
            m.perm = perm
            m._weight_dtype = w.dtype
            m.r_in = layer.r_in.to(dev, torch.float32)
            m.r_out = layer.r_out.to(dev, torch.float32) if layer.r_out is not None else None
            if linear.bias is not None:
                m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
            if act_scale is not None:
                m.set_act_scale(act_scale)
        return m

    def set_act_scale(self, act_scale: torch.Tensor) -> None:
        """Install calibrated static activation scales (in,) (float32, finite, > 0); ends calibration."""
        s = act_scale.detach().to(torch.float32)
        if s.shape != (self.in_features,) or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise PackError(f"layer '{self.name}': activation scales must be finite, positive, shape "
                            f"({self.in_features},)")
        self.act_scale = s.to(self.r_in.device if self.r_in is not None else s.device)
        self._observer = None
        self.calib_calls = self.calib_steps

    @property
    def weight(self) -> torch.Tensor:
        """Meta tensor (out, in) with the module's dtype: shape/dtype for model code, no data."""
        return torch.empty((self.out_features, self.in_features), dtype=self._weight_dtype, device="meta")

    def _apply(self, fn, recurse=True):
        keep = {k: self._buffers[k] for k in _FLOAT32_BUFFERS if self._buffers.get(k) is not None}
        dev = self.r_in.device if self.r_in is not None else torch.device("cpu")
        probe = fn(torch.empty(0, dtype=self._weight_dtype, device=dev))
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new.element_size() < old.element_size():  # narrowing cast: keep the values, follow the device
                self._buffers[k] = old.to(new.device)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self._weight_dtype = probe.dtype
        return self

    @property
    def calibrating(self) -> bool:
        """True while a static-mode layer still observes activations (the first calib_steps calls)."""
        return bool(self.abits) and self.act_mode == "static" and self.act_scale is None

    # --- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        r_in = self.r_in.to(cdt)
        xt = input_transform(x.to(cdt), self.perm, r_in)
        if self.abits:
            if self.act_mode == "dynamic":
                xt = fake_quantize_per_token(xt, self.abits)
            elif self.act_scale is not None:
                xt = fake_quantize_per_channel(xt, self.act_scale.to(cdt), self.abits)
            else:
                self._observe(xt)  # calibration calls run with unquantized activations
        if self.wbits:
            y = (xt @ self.qweight.to(cdt).t()) * self.w_scale.to(cdt)
        else:
            y = xt @ self.weight_t.to(cdt).t()
        y = output_restore(y, self.r_out.to(cdt) if self.r_out is not None else None)
        if self.bias is not None:
            y = y + self.bias.to(cdt)
        return y.to(out_dtype)

    @torch.compiler.disable
    def _observe(self, xt: torch.Tensor) -> None:
        if self._observer is None:
            self._observer = TopKPercentile(self.act_percentile, self.calib_steps)
        self._observer.update(xt)
        self.calib_calls += 1
        if self.calib_calls >= self.calib_steps:
            _, qmax = qrange(self.abits)
            s = self._observer.value() / qmax
            s = torch.where(s > 0, s, torch.ones_like(s)).to(xt.device, torch.float32)
            with torch.inference_mode(False):  # calibrated under inference_mode: store a normal tensor
                self.act_scale = s.clone()
            self._observer = None

    # --- reporting ---------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer and the bias (what this layer keeps resident)."""
        n = sum(b.numel() * b.element_size() for b in self.buffers())
        if self.bias is not None:
            n += self.bias.numel() * self.bias.element_size()
        return n

    def extra_repr(self) -> str:
        blk = self.r_in.shape[-1] if self.r_in is not None else "?"
        mode = self.act_mode if self.abits else "off"
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.wbits or 16}"
                f"A{self.abits or 16} ({mode}), block={blk}, row_rot={self.r_out is not None}, "
                f"bias={self.bias is not None}")
