"""`DuQuantLinear`: a drop-in for `nn.Linear` that runs a pack's transforms with quantized weights.

    y = ((Q_a(x P BD(R_in))) Q_w(W_t)^T) BD(R_out)^T + b,   W_t = BD(R_out)^T W P BD(R_in)

Built once from the float module and the pack (`from_linear`): the transformed weight is quantized
with the pack's per-row scales and kept as int8 integers plus float32 scales; the float weight is
not kept. Transforms run in float32 (float64 when the input is float64); the output has the
input's dtype. With weights and activations unquantized it equals `nn.Linear` to rounding.

`forward` runs the float reference path (fake-quantized matmul in float32; what CI tests) or,
for CUDA bf16/fp16 inputs, the Triton kernels of `kernels/w4a8.py` (same function with
16-bit/tf32 operands; `fast_path_reason` says which and why).
"""

from __future__ import annotations

import torch
from torch import nn

from .activation import (ACT_MODES, TopKPercentile, fake_quantize_per_channel, fake_quantize_per_token,
                         per_token_codes)
from .errors import PackError
from .grouped import dequantize_grouped, quantize_grouped
from .pack import LayerPack
from .quant import is_quantized, pack_int4, qrange, quantize_rows, unpack_int4
from .transforms import input_transform, output_restore, transform_weight


_FLOAT32_BUFFERS = ("r_in", "r_out", "w_scale", "act_scale", "weight_t", "smooth")
# codes per chunk when int codes are unpacked for a matmul (CPU integer GEMM, reference path), in
# whole weight rows (at least 64). 2-core Xeon, torch 2.13, M = 1: a 16384 x 2048 layer took 27 ms
# (integer) / 56.7 ms (float) unpacked at once, 18 / 24.8 ms in 2048-row chunks; a 2048 x 16384
# layer 23.7 / 60.1 ms at once, 14.8 / 21.9 ms in 256-row chunks.
_CPU_CODES = 1 << 22


def _chunk_rows(in_features: int) -> int:
    return max(64, _CPU_CODES // in_features)


class DuQuantLinear(nn.Module):
    """Linear layer with DuQuant input/output rotations, int weights and quantized activations.

    Buffers (all in `state_dict`): ``perm`` int64 (in,) or absent; ``r_in`` float32 (nb, B, B);
    ``r_out`` float32 or absent (float16 when built with rot_dtype=torch.float16, the GPU
    path's choice); ``qweight`` (the integer codes of W_t: uint8 (out, ceil(in/2)) packed two per
    byte for wbits <= 4 (quant.pack_int4), int8/int16 (out, in) above; `int_codes()` unpacks) and
    ``w_scale`` float32 (out,) when the weight is quantized, else ``weight_t`` (out, in) float; ``act_scale`` float32 (in,) once static
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
        _keep_out_of_compiled_graphs()
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
        for key in ("perm", "r_in", "r_out", "qweight", "w_scale", "weight_t", "act_scale", "smooth"):
            self.register_buffer(key, None)
        self.group_size: int | None = None  # w_scale (out, n_groups) over groups of columns (grouped.py)
        self.use_fast = True  # CUDA bf16/fp16 inputs run the fused kernels when they can (fast_path_reason)
        self.input_group = None  # input_group.InputGroup when linked with layers reading the same input
        # GPU kernel path: write y token-minor (strides (1, s), s >= M) at M > 16, for a consumer whose kernels
        # read it without a transpose (mlp_layout.py: gate/up before down_proj); same values
        self.token_minor_output = False
        self.bias: nn.Parameter | None = None

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, layer: LayerPack, *, abits: int = 0,
                    act_mode: str = "static", act_percentile: float = 99.9, calib_steps: int = 32,
                    act_scale: torch.Tensor | None = None, device: torch.device | str | None = None,
                    rot_dtype: torch.dtype | None = None) -> "DuQuantLinear":
        """Build from a float `nn.Linear` and its pack entry (shapes must agree).

        `abits` 0 leaves activations unquantized; `apply_pack` passes the pack's setting.
        With the pack's stored integers the float weight is never read: it may live on the meta
        device. `device`: where the buffers go (default: the weight's device; CPU for a meta weight).
        `rot_dtype`: dtype of the kept r_in/r_out blocks (default float32; float16 halves them
        for the GPU path, at ~2.4e-4 rounding of their entries: see docs/benchmarks.md).
        """
        w = linear.weight
        if tuple(w.shape) != (layer.out_features, layer.in_features):
            raise PackError(f"layer '{layer.name}': module weight is {list(w.shape)}, pack expects "
                            f"[{layer.out_features}, {layer.in_features}]")
        m = cls(layer.in_features, layer.out_features, wbits=layer.wbits,
                abits=abits, act_mode=act_mode,
                act_percentile=act_percentile, calib_steps=calib_steps, name=layer.name)
        dev = torch.device(device) if device is not None else (w.device if w.device.type != "meta" else torch.device("cpu"))
        stored = bool(m.wbits) and layer.qweight is not None
        if w.device.type == "meta" and not stored:
            raise PackError(f"layer '{layer.name}': the module weight has no data (meta device) and the pack "
                            "stores no integers for it (build with --store-qweights)")
        wdt = torch.float64 if w.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            perm = layer.perm.to(dev) if layer.perm is not None else None
            r_in = layer.r_in.to(dev, wdt)
            r_out = layer.r_out.to(dev, wdt) if layer.r_out is not None else None
            m.smooth = layer.smooth.to(dev, torch.float32) if layer.smooth is not None else None  # x / smooth
            m.group_size = layer.group_size
            if stored:  # stored integers (packed int4 for wbits <= 4): the float weight is not read
                m.qweight = layer.qweight.to(dev).contiguous()
                m.w_scale = layer.weight_scale.to(dev, torch.float32)
            else:
                w_in = w.detach().to(dev, wdt) if m.smooth is None else w.detach().to(dev, wdt) * m.smooth.to(wdt)
                w_t = transform_weight(w_in, perm, r_in, r_out)
                del w_in
                if m.wbits:
                    scale = layer.weight_scale.to(dev, torch.float32)
                    q = (quantize_rows(w_t.to(torch.float32), scale, m.wbits) if m.group_size is None else
                         quantize_grouped(w_t.to(torch.float32), scale, m.wbits, m.group_size))
                    m.qweight = pack_int4(q) if m.wbits <= 4 else q.contiguous()  # int4: two codes per byte
                    del q
                    m.w_scale = scale
                else:
                    m.weight_t = w_t
                del w_t
            m.perm = perm
            m._weight_dtype = w.dtype
            rdt = rot_dtype or torch.float32
            m.r_in = layer.r_in.to(dev, rdt).contiguous()
            m.r_out = layer.r_out.to(dev, rdt).contiguous() if layer.r_out is not None else None
            if linear.bias is not None:
                m.bias = nn.Parameter(linear.bias.detach().to(dev, copy=True), requires_grad=False)
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
            if new.dtype != old.dtype and new.element_size() <= old.element_size():  # narrowing (or fp16<->bf16):
                # keep the values, follow the device
                self._buffers[k] = old.to(new.device)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self._weight_dtype = probe.dtype
        return self

    @property
    def calibrating(self) -> bool:
        """True while a static-mode layer still observes activations (the first calib_steps calls)."""
        return bool(self.abits) and self.act_mode == "static" and self.act_scale is None

    # --- forward -----------------------------------------------------------------------------

    def _codes(self, r: int, n: int) -> torch.Tensor:
        """Integer codes (int8/int16) of weight rows r .. r + n - 1, unpacked."""
        rows = self.qweight[r:r + n]
        return unpack_int4(rows, self.in_features) if rows.dtype == torch.uint8 else rows

    def int_codes(self) -> torch.Tensor:
        """The weight's integer codes as int8/int16 (out, in) (unpacks packed int4)."""
        if self.qweight is None:
            raise ValueError(f"layer '{self.name}': weight is not quantized")
        return unpack_int4(self.qweight, self.in_features) if self.qweight.dtype == torch.uint8 else self.qweight

    def fast_path_reason(self, x: torch.Tensor) -> str | None:
        """None when `forward(x)` runs the fused GPU kernels (kernels/w4a8.py), else why it does not.

        The kernels take: a CUDA bf16/fp16 input without autograd, packed int4 weights with one
        scale per row (grouped scales run the reference path), abits 0 or 2..8, calibrated or
        dynamic activation scales, in_features a multiple of 128, blocks of 16..128 dividing the
        features. Set ``use_fast = False`` to force the float reference path.
        """
        if not self.use_fast:
            return "use_fast is False"
        if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
            return "input is not a CUDA bf16/fp16 tensor"
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return "autograd"
        if self.qweight is None or self.qweight.dtype != torch.uint8 or self.group_size is not None:
            return "weight is not packed int4 with per-row scales"
        if not all(t.is_contiguous() for t in (self.qweight, self.w_scale, self.r_in, self.r_out, self.perm,
                                               self.act_scale, self.smooth) if t is not None):
            return "a buffer is not contiguous (the kernels read row-major buffers)"
        if self.abits > 8 or self.calibrating:
            return "activation bits > 8 or static scales still calibrating"
        from .kernels import fast_path_available, triton_available
        if not triton_available():
            return "Triton is not available"
        if not fast_path_available(x.device):
            return "the GPU is older than compute capability 8.0"
        from .kernels.w4a8 import supports
        return supports(self.in_features, self.out_features, self.r_in.shape[-1],
                        self.r_out.shape[-1] if self.r_out is not None else None)

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._through(x, "_kernel_forward", grouped=True)

    def _through(self, x: torch.Tensor, kernel: str, grouped: bool) -> torch.Tensor:
        """x (..., in) -> (..., out) by the row-side `kernel` method, through the linked group
        (input_group.py: layers that read the same input) when `grouped` and linked."""
        if grouped and self.input_group is not None:
            y = self.input_group.forward(self, x, kernel)
            if y is not None:
                return y
        y = getattr(self, kernel)(x.reshape(-1, self.in_features), self.qweight, self.w_scale, self.r_out, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _kernel_forward(self, x2d: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                        r_out: torch.Tensor | None, bias: torch.Tensor | None, up: torch.Tensor | None = None,
                        act: str | None = None) -> torch.Tensor:
        """The fused kernels on x2d (M, in) with this layer's input side and the given row-side
        buffers (this layer's, or a linked group's concatenation); returns (M, rows). act: the
        layer's input is act(x2d) * up (up (M, in) or None), computed by the kernels."""
        from .kernels import w4a8
        mode = (w4a8.MODE_NONE if not self.abits else
                w4a8.MODE_DYNAMIC if self.act_mode == "dynamic" else w4a8.MODE_STATIC)
        qmin, qmax = qrange(self.abits) if self.abits else (-128, 127)
        return w4a8.w4_linear(x2d, qweight=qweight, w_scale=w_scale, r_in=self.r_in, perm=self.perm, r_out=r_out,
                              bias=bias, smooth=self.smooth, mode=mode, qmin=qmin, qmax=qmax,
                              act_scale=self.act_scale if mode == w4a8.MODE_STATIC else None,
                              token_minor_out=self.token_minor_output and w4a8.token_minor_pays(x2d.shape[0]),
                              up=up, act=act)

    def forward_product(self, gate: torch.Tensor, up: torch.Tensor | None, act: str) -> torch.Tensor:
        """``self(act(gate) * up)`` (up None: ``self(act(gate))``) for act in
        `mlp_activation.ACTIVATIONS` ("gelu_tanh", "silu"): an MLP's down_proj on its
        producers' outputs (`mlp_activation.fuse_mlp_activations`). On the GPU kernel path the
        prep launch computes the product from the loaded tiles (kernels/hidden.py: torch's values);
        elsewhere, or with hooks on this module (which must see the input), torch computes it first."""
        from .mlp_activation import ACTIVATIONS, hidden
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if (gate.is_cuda and self.fast_path_reason(gate) is None and self.input_group is None and not self._has_hooks()
                and (up is None or (up.shape == gate.shape and up.dtype == gate.dtype and up.device == gate.device))):
            return self._fast_product(gate, up, act)
        return self(hidden(gate, up, act))

    def _has_hooks(self) -> bool:
        """Whether a forward (pre-)hook, of this module or global, would see its input."""
        from torch.nn.modules import module as mod
        return bool(self._forward_hooks or self._forward_pre_hooks or mod._global_forward_hooks
                    or mod._global_forward_pre_hooks)

    def _fast_product(self, gate: torch.Tensor, up: torch.Tensor | None, act: str) -> torch.Tensor:
        g2 = gate.reshape(-1, self.in_features)
        u2 = up.reshape(-1, self.in_features) if up is not None else None
        y = self._kernel_forward(g2, self.qweight, self.w_scale, self.r_out, self.bias, up=u2, act=act)
        return y.reshape(*gate.shape[:-1], self.out_features)

    def uses_integer_gemm(self, x: torch.Tensor) -> bool:
        """True when `forward(x)` on the CPU runs the integer GEMM (`torch._int_mm`, exact int32
        sums of int8 codes) instead of the float reference matmul: dynamic per-token activations
        of 2..8 bits, weights of 2..8 bits with one scale per row, a float32/bf16/fp16 input without
        autograd. Same numerics as the reference path up to float32 rounding (`use_fast = False`
        forces the reference)."""
        return bool(self.use_fast and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    and 0 < self.abits <= 8 and self.act_mode == "dynamic" and 0 < self.wbits <= 8
                    and self.group_size is None and self.qweight is not None
                    and not (torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)))
                    and hasattr(torch, "_int_mm"))

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """CPU W(<=8)A(<=8) dynamic path: float32 transforms, int8 codes, int32 GEMM, float32 restore.
        The group's call protocol is Python state, so a compiled graph runs each layer alone."""
        return self._through(x, "_integer_kernel", grouped=not torch.compiler.is_compiling())

    def _integer_kernel(self, x2d: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                        r_out: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """The CPU integer path on x2d (M, in) with this layer's input side and the given row-side
        buffers (this layer's, or a linked group's concatenation); returns (M, rows) in x's dtype."""
        xc = x2d.to(torch.float32) if self.smooth is None else x2d.to(torch.float32) / self.smooth.to(torch.float32)
        xt = input_transform(xc, self.perm, self.r_in.to(torch.float32))
        q, s = per_token_codes(xt, self.abits)
        q = q.to(torch.int8)
        acc = torch.empty((q.shape[0], qweight.shape[0]), dtype=torch.int32, device=q.device)
        step = _chunk_rows(self.in_features)
        for r in range(0, qweight.shape[0], step):  # unpack and multiply cache-sized row chunks
            rows = qweight[r:r + step]
            codes = unpack_int4(rows, self.in_features) if rows.dtype == torch.uint8 else rows
            acc[:, r:r + step] = torch._int_mm(q, codes.t())
        y = acc.to(torch.float32) * s * w_scale.to(torch.float32)
        y = output_restore(y, r_out.to(torch.float32) if r_out is not None else None)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x2d.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.fast_path_reason(x) is None:
            return self._fast_forward(x)
        if self.uses_integer_gemm(x):
            return self._integer_forward(x)
        out_dtype = x.dtype
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        r_in = self.r_in.to(cdt)
        xc = x.to(cdt) if self.smooth is None else x.to(cdt) / self.smooth.to(cdt)
        xt = input_transform(xc, self.perm, r_in)
        if self.abits:
            if self.act_mode == "dynamic":
                xt = fake_quantize_per_token(xt, self.abits)
            elif self.act_scale is not None:
                xt = fake_quantize_per_channel(xt, self.act_scale.to(cdt), self.abits)
            else:
                self._observe(xt)  # calibration calls run with unquantized activations
        if self.wbits and self.group_size is not None:
            y = xt @ dequantize_grouped(self.int_codes(), self.w_scale, self.group_size).to(cdt).t()
        elif self.wbits:  # codes unpacked and multiplied in row chunks (cache-sized; same products)
            step = _chunk_rows(self.in_features)
            y = torch.cat([xt @ self._codes(r, step).to(cdt).t() for r in range(0, self.out_features, step)],
                          dim=-1) * self.w_scale.to(cdt)
        else:
            y = xt @ self.weight_t.to(cdt).t()
        y = output_restore(y, self.r_out.to(cdt) if self.r_out is not None else None)
        if self.bias is not None:
            y = y + self.bias.to(cdt)
        return y.to(out_dtype)

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


_EAGER_METHODS = ("_fast_forward", "_fast_product", "_observe")  # Triton launches; calibration state
_eager_wrapped = False


def _keep_out_of_compiled_graphs() -> None:
    """Mark `DuQuantLinear`'s eager-only methods with `torch.compiler.disable`, once, when the first
    layer is made (not at import: that imports torch._dynamo, ~1.7 s, for every user of the
    runtime, the compiler's CLI included). Layers always exist before a model is compiled."""
    global _eager_wrapped
    if _eager_wrapped:
        return
    for name in _EAGER_METHODS:
        setattr(DuQuantLinear, name, torch.compiler.disable(getattr(DuQuantLinear, name)))
    _eager_wrapped = True
