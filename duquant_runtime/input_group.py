"""Layers that share one input transform run as one (GPU kernels, CPU integer GEMM).

    group = link_input_group([q, k, v])  # DuQuantLinear modules of one --share-inputs group
    q(x); k(x); v(x)                     # q's call runs the kernels for all three

A pack built with ``--share-inputs`` gives sibling layers that read the same activation (q/k/v,
gate/up) one permutation, one set of input rotations and one smoothing vector. Linking them makes
each member's ``qweight``, ``w_scale``, ``r_out`` and ``bias`` a view of one row-wise concatenated
tensor (no extra memory), so the fused kernels (kernels/w4a8.py), and on the CPU the integer GEMM
path of dynamic activations, transform and quantize the activation once and run one GEMM over
every member's rows.

Call protocol: the first member called with an activation ``x`` on one of those paths computes every
member's output (M, sum of out_features) and keeps it; another member called next with the same
tensor object (not modified in place since, where torch tracks versions) returns its columns of
that output: a view whose rows are strided by the group's total width. A call that cannot be
served so (a member called twice, another input) starts a new fused call. A member runs alone
on the float reference path, or while the members disagree (different activation scales, modes,
`use_fast`). Views that a device move copied apart are linked again at the next call. The
fused GEMM equals the members' own up to float32 accumulation order.

Caveat: tensors made under ``torch.inference_mode`` carry no version counter, so there an in-place
change of ``x`` between two members' calls is not detected; ``share_inputs=False`` in
`apply_pack` (or ``unlink``) turns the sharing off.
"""

from __future__ import annotations

import weakref

import torch

_LINKED = ("qweight", "w_scale", "r_out", "bias")  # concatenated along rows (dim 0)
_SHARED = ("perm", "r_in", "smooth")  # equal in every member


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # inference tensors track no version
        return None


def check_compatible(members: list) -> str | None:
    """None when `members` (DuQuantLinear) can be linked, else why not (one line)."""
    if len(members) < 2:
        return "a group needs two or more layers"
    m0 = members[0]
    for m in members:
        if m.in_features != m0.in_features:
            return f"'{m.name}' reads {m.in_features} features, '{m0.name}' {m0.in_features}"
        if m.qweight is None or m.qweight.dtype != torch.uint8 or m.group_size is not None:
            return f"'{m.name}' has no packed int4 weight with per-row scales"
        if (m.wbits, m.abits, m.act_mode) != (m0.wbits, m0.abits, m0.act_mode):
            return f"'{m.name}' has other bits or activation mode than '{m0.name}'"
        for key in _SHARED:
            if not _same(getattr(m, key), getattr(m0, key)):
                return f"'{m.name}' has another input transform ({key}) than '{m0.name}'"
        if (m.r_out is None) != (m0.r_out is None) or (m.bias is None) != (m0.bias is None):
            return f"'{m.name}' differs from '{m0.name}' in row rotation or bias"
        if m.r_out is not None and (m.r_out.shape[1:] != m0.r_out.shape[1:] or m.r_out.dtype != m0.r_out.dtype
                                    or m.out_features % m.r_out.shape[-1]):
            return f"'{m.name}': row rotation blocks differ or do not tile its outputs"
        if m.bias is not None and m.bias.dtype != m0.bias.dtype:
            return f"'{m.name}': bias dtype differs"
        if m.qweight.device != m0.qweight.device:
            return f"'{m.name}' is on another device than '{m0.name}'"
    return None


class _Output:
    """The group's output for one activation, until every member took its columns."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, first, kernel: str):
        self.x = weakref.ref(x)
        self.version = _version(x)
        self.y = y
        self.kernel = kernel
        self.served = {id(first)}


class InputGroup:
    """Linked members (in row order of the concatenation) and the pending output of the last call."""

    def __init__(self, members: list):
        self.members = list(members)
        self._columns = {}  # id(member) -> (first, last + 1) of its columns in the group's output
        start = 0
        for m in self.members:
            self._columns[id(m)] = (start, start + m.out_features)
            start += m.out_features
        self._checked_inputs: tuple | None = None  # data_ptrs of the input-side buffers found equal
        self._pending: _Output | None = None

    # --- linking -----------------------------------------------------------------------------

    def link(self) -> None:
        """Concatenate the members' row-wise buffers and make each member's buffer a view of it."""
        with torch.no_grad():
            for key in _LINKED:
                parts = [getattr(m, key) for m in self.members]
                if parts[0] is None:
                    continue
                cat = torch.cat([p.detach() for p in parts])
                offset = 0
                for m, p in zip(self.members, parts):
                    view = cat[offset: offset + p.shape[0]]
                    offset += p.shape[0]
                    if key == "bias":
                        m.bias = torch.nn.Parameter(view, requires_grad=False)
                    else:
                        setattr(m, key, view)
        self._checked_inputs = None
        self._pending = None

    def fused(self, key: str) -> torch.Tensor | None:
        """The concatenated buffer `key` (a strided view over the members' shared storage), or None
        when the members' buffers are no longer views of one tensor (e.g. after ``.to()``)."""
        parts = [getattr(m, key) for m in self.members]
        p0 = parts[0]
        if p0 is None:
            return None
        ptr, off, row = p0.untyped_storage().data_ptr(), p0.storage_offset(), p0[0].numel()
        rows = 0
        for p in parts:
            if (p.untyped_storage().data_ptr() != ptr or p.storage_offset() != off + rows * row
                    or not p.is_contiguous() or p.dtype != p0.dtype):
                raise _NotLinked
            rows += p.shape[0]
        return p0.detach().as_strided((rows, *p0.shape[1:]), p0.stride(), off)

    def _inputs_equal(self) -> bool:
        """The members' input-side buffers (and static activation scales) are equal; re-checked
        only when one of them was replaced (never while a CUDA graph is being captured)."""
        keys = tuple(t.data_ptr() if t is not None else 0 for m in self.members
                     for t in (m.perm, m.r_in, m.smooth, m.act_scale))
        if keys == self._checked_inputs:
            return True
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return False
        m0 = self.members[0]
        if not all(_same(getattr(m, k), getattr(m0, k)) for m in self.members for k in (*_SHARED, "act_scale")):
            return False
        self._checked_inputs = keys
        return True

    # --- forward -----------------------------------------------------------------------------

    def forward(self, member, x: torch.Tensor, kernel: str = "_kernel_forward") -> torch.Tensor | None:
        """`member`'s output for x from the group's fused call, or None (then it runs alone).
        kernel: the DuQuantLinear method that computes (M, rows) from x (M, in) and row-side
        buffers: "_kernel_forward" (the GPU kernels) or "_integer_kernel" (the CPU integer GEMM)."""
        if id(member) not in self._columns:
            return None
        a, b = self._columns[id(member)]
        p = self._pending
        if p is not None and p.x() is x and id(member) not in p.served and p.version == _version(x) \
                and p.kernel == kernel:
            p.served.add(id(member))
            if len(p.served) == len(self.members):
                self._pending = None
            return p.y[:, a:b].reshape(*x.shape[:-1], b - a)
        self._pending = None
        m0 = self.members[0]
        if not all(m.use_fast and not m.calibrating and m.act_mode == m0.act_mode and m.abits == m0.abits
                   for m in self.members):
            return None
        try:
            fused = {key: self.fused(key) for key in _LINKED}
        except _NotLinked:  # e.g. `.to()` copied the views apart: link again (not while capturing)
            if (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()) \
                    or check_compatible(self.members) is not None:
                return None
            self.link()
            fused = {key: self.fused(key) for key in _LINKED}
        if not self._inputs_equal():
            return None
        y = getattr(m0, kernel)(x.reshape(-1, m0.in_features), fused["qweight"], fused["w_scale"], fused["r_out"],
                                fused["bias"])
        self._pending = _Output(x, y, member, kernel)
        return y[:, a:b].reshape(*x.shape[:-1], b - a)


class _NotLinked(Exception):
    pass


def link_input_group(members: list) -> InputGroup:
    """Link DuQuantLinear `members` that share one input transform (see the module docstring);
    raises ValueError (why) when they cannot be. Returns the group (also set as each member's
    ``input_group``)."""
    why = check_compatible(members)
    if why is not None:
        raise ValueError(why)
    group = InputGroup(members)
    group.link()
    for m in members:
        m.input_group = group
    return group


def unlink(members: list) -> None:
    """Stop sharing: every member runs alone again (its buffers stay views; memory is unchanged)."""
    for m in members:
        m.input_group = None


__all__ = ["InputGroup", "link_input_group", "unlink", "check_compatible"]
