"""duquant_runtime.input_group: linking layers that share an input transform, the fused call
protocol (one launch per group and activation), its fallbacks, and apply_pack's linking."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_runtime import DuQuantLinear, apply_pack
from duquant_runtime.input_group import check_compatible, link_input_group
from duquant_runtime.transforms import input_transform, output_restore

from _util import save_ckpt

D, F, KV = 128, 256, 64
QKV = ("q_proj", "k_proj", "v_proj")


class Block(nn.Module):
    """Llama-style names: attn.{q,k,v,o}_proj (q/k/v with bias), mlp.{gate,up,down}_proj."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q_proj, self.attn.k_proj, self.attn.v_proj = nn.Linear(D, D), nn.Linear(D, KV), nn.Linear(D, KV)
        self.attn.o_proj = nn.Linear(D + 2 * KV, D, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(D, F, bias=False), nn.Linear(D, F, bias=False)
        self.mlp.down_proj = nn.Linear(F, D, bias=False)

    def forward(self, x):
        a = self.attn
        x = x + a.o_proj(torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1))
        return x + self.mlp.down_proj(torch.relu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.layers = nn.ModuleList([Block(), Block()])
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p[:, torch.randperm(p.shape[1])[:3]] *= 12.0  # outlier input channels
    return m


@pytest.fixture(scope="module")
def shared_pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    ck = root / "ckpt"
    save_ckpt(ck, {k: v.clone() for k, v in _model().state_dict().items()})
    cfg, _ = resolve(None, include=r"layers\.\d+\.(attn|mlp)\.", exclude="", row_rot="restore", block=64,
                     share_inputs=True)
    build_pack(ck, root / "pack", cfg, jobs=1, progress=False)
    return root / "pack"


def _applied(pack, **kw):
    m = _model()
    report = apply_pack(m, pack, act_mode="dynamic", **kw)
    return m, report


def _fused_reference(self, x2d, qweight, w_scale, r_out, bias):
    """CPU stand-in for the Triton kernels with the same signature: the float reference of the
    dynamic W4A8 path on the given (possibly concatenated) row-side buffers."""
    from duquant_runtime.activation import fake_quantize_per_token
    from duquant_runtime.quant import unpack_int4
    calls.append(qweight.shape[0])
    xt = fake_quantize_per_token(input_transform(x2d.float(), self.perm, self.r_in.float()), self.abits)
    y = (xt @ unpack_int4(qweight, self.in_features).float().t()) * w_scale
    y = output_restore(y, r_out.float() if r_out is not None else None)
    return (y + bias.float() if bias is not None else y).to(x2d.dtype)


calls: list[int] = []


@pytest.fixture
def fake_kernels(monkeypatch):
    calls.clear()
    monkeypatch.setattr(DuQuantLinear, "_kernel_forward", _fused_reference)
    return calls


def test_apply_links_every_group_without_extra_memory(shared_pack):
    m, report = _applied(shared_pack)
    assert sorted(map(tuple, report.input_groups)) == sorted(
        [tuple(f"layers.{i}.attn.{n}" for n in QKV) for i in range(2)]
        + [(f"layers.{i}.mlp.gate_proj", f"layers.{i}.mlp.up_proj") for i in range(2)])
    assert "4 input groups linked" in report.summary()
    a = m.layers[0].attn
    for key in ("qweight", "w_scale", "r_out"):
        ptrs = {getattr(getattr(a, n), key).untyped_storage().data_ptr() for n in QKV}
        assert len(ptrs) == 1, key  # views of one tensor
    assert a.q_proj.bias.untyped_storage().data_ptr() == a.v_proj.bias.untyped_storage().data_ptr()
    m2, report2 = _applied(shared_pack, share_inputs=False)
    assert report2.input_groups == [] and report2.bytes_after == report.bytes_after
    storages = {}  # every byte the linked modules keep is in the report: no hidden copy
    for mod in m.modules():
        if isinstance(mod, DuQuantLinear):
            for b in [*mod.buffers(), *([mod.bias] if mod.bias is not None else [])]:
                storages[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    assert sum(storages.values()) == report.bytes_after
    assert a.q_proj.input_group is a.k_proj.input_group is not None and m2.layers[0].attn.q_proj.input_group is None
    x = torch.randn(3, 5, D)
    with torch.no_grad():  # linked or not, the same block output
        assert torch.allclose(m.layers[0](x), m2.layers[0](x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linked_groups_request_only_the_reported_bytes_on_cuda(shared_pack):
    """On the GPU, the bytes the linked model asks the allocator for are the report's: the
    concatenation frees the members' own buffers (memory_allocated may still count the caching
    allocator's unsplit remainders of reused blocks, which later allocations can use)."""
    gc.collect()  # earlier tests' unreachable CUDA tensors are freed now, not inside the measured interval
    warm = torch.ones(8, 8, device="cuda")
    warm @ warm  # cuBLAS takes its 32 MiB workspace from the allocator at its first GEMM: not ours
    torch.cuda.synchronize()
    req0, alloc0 = torch.cuda.memory_stats()["requested_bytes.all.current"], torch.cuda.memory_allocated()
    m, report = _applied(shared_pack, device="cuda")
    torch.cuda.synchronize()
    req = torch.cuda.memory_stats()["requested_bytes.all.current"] - req0
    alloc = torch.cuda.memory_allocated() - alloc0
    print(f"report {report.bytes_after} requested {req} allocated {alloc}")
    assert report.input_groups and req == report.bytes_after


def test_cpu_integer_path_runs_one_gemm_per_group(shared_pack, monkeypatch):
    """Dynamic activations on the CPU (the integer GEMM path): one transform and one _int_mm per
    group and activation, the same outputs as the unlinked layers; without activation
    quantization (the float reference path) each layer runs alone."""
    m, _ = _applied(shared_pack)
    ref, _ = _applied(shared_pack, share_inputs=False)
    rows = []
    real = DuQuantLinear._integer_kernel

    def counting(self, x2d, qweight, *rest):
        rows.append(qweight.shape[0])
        return real(self, x2d, qweight, *rest)

    monkeypatch.setattr(DuQuantLinear, "_integer_kernel", counting)
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        a, ra = m.layers[0].attn, ref.layers[0].attn
        assert a.q_proj.uses_integer_gemm(x)
        ys = [getattr(a, n)(x) for n in QKV]
        assert rows == [D + 2 * KV]
        rows.clear()
        ys_ref = [getattr(ra, n)(x) for n in QKV]
        assert rows == [D, KV, KV]
        for y, y_ref in zip(ys, ys_ref):
            assert y.shape == y_ref.shape and torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        rows.clear()
        s_model = _model()
        apply_pack(s_model, shared_pack, act_mode="static", abits=0)  # no activation quantization: reference path
        [getattr(s_model.layers[0].attn, n)(x) for n in QKV]
        assert rows == []


def test_one_fused_call_per_group_and_activation(shared_pack, fake_kernels):
    m, _ = _applied(shared_pack)
    ref, _ = _applied(shared_pack, share_inputs=False)
    a, ra = m.layers[1].attn, ref.layers[1].attn
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        outs = [getattr(a, n)._fast_forward(x) for n in QKV]
        assert fake_kernels == [D + 2 * KV]  # one call over q, k and v's rows
        for n, y in zip(QKV, outs):
            alone = getattr(ra, n)._fast_forward(x)
            assert y.shape == alone.shape == (2, 7, getattr(a, n).out_features)
            assert torch.allclose(y, alone, rtol=1e-5, atol=1e-5), n
            getattr(ra, n).use_fast = False
            assert torch.allclose(y, getattr(ra, n)(x), rtol=1e-4, atol=1e-4), n  # the module's own reference
        fake_kernels.clear()
        a.k_proj._fast_forward(x)  # every member was served: a new round starts, from k
        y1 = a.q_proj._fast_forward(x)  # served from k's launch
        y1b = a.q_proj._fast_forward(x)  # q twice: a new launch
        x2 = torch.randn(2, 7, D)
        y2 = a.k_proj._fast_forward(x2)  # another input: a new launch, correct for x2
        assert fake_kernels == [D + 2 * KV] * 3
        assert torch.allclose(y2, ra.k_proj(x2), rtol=1e-4, atol=1e-4)
        assert torch.allclose(y1, ra.q_proj(x), rtol=1e-4, atol=1e-4) and torch.equal(y1, y1b)


def test_in_place_change_of_the_input_is_not_served_stale(shared_pack, fake_kernels):
    m, _ = _applied(shared_pack)
    ref, _ = _applied(shared_pack, share_inputs=False)
    g, rg = m.layers[0].mlp, ref.layers[0].mlp
    x = torch.randn(4, D)
    with torch.no_grad():
        g.gate_proj._fast_forward(x)
        x.mul_(2.0)
        y = g.up_proj._fast_forward(x)
    assert fake_kernels == [2 * F, 2 * F]  # recomputed for the changed input
    rg.up_proj.use_fast = False
    assert torch.allclose(y, rg.up_proj(x), rtol=1e-4, atol=1e-4)


def test_broken_views_are_linked_again(shared_pack, fake_kernels):
    m, _ = _applied(shared_pack)
    g = m.layers[0].mlp
    g.up_proj.qweight = g.up_proj.qweight.clone()  # what a device move does to the views
    x = torch.randn(4, D)
    with torch.no_grad():
        g.gate_proj._fast_forward(x)
    assert fake_kernels == [2 * F]
    assert g.up_proj.qweight.untyped_storage().data_ptr() == g.gate_proj.qweight.untyped_storage().data_ptr()


def test_different_activation_scales_run_alone(shared_pack, fake_kernels):
    m, _ = _applied(shared_pack)
    g = m.layers[0].mlp
    g.gate_proj.act_scale = torch.full((D,), 0.1)
    g.up_proj.act_scale = torch.full((D,), 0.2)
    with torch.no_grad():
        g.gate_proj._fast_forward(torch.randn(3, D))
    assert fake_kernels == [F]


def test_incompatible_layers_are_refused(shared_pack):
    m, _ = _applied(shared_pack, share_inputs=False)
    a = m.layers[0].attn
    assert check_compatible([a.q_proj, a.k_proj]) is None
    assert "input transform" in check_compatible([a.q_proj, m.layers[1].attn.k_proj])
    assert "needs two" in check_compatible([a.q_proj])
    assert "features" in check_compatible([a.q_proj, a.o_proj])
    with pytest.raises(ValueError, match="input transform"):
        link_input_group([a.q_proj, m.layers[0].mlp.gate_proj])


def test_incomplete_group_is_reported_not_linked(shared_pack):
    m = _model()
    report = apply_pack(m, shared_pack, strict=False, name_map=lambda n: None if n.endswith("v_proj") else n)
    assert len(report.input_groups) == 2  # the gate/up groups
    assert sum("not linked: not every member" in w for w in report.warnings) == 2


def test_linked_layers_compile_fullgraph_and_run_alone_there(shared_pack):
    """torch.compile of a linked layer (CPU integer path): no graph break, the same output as
    eager; inside the compiled graph the layer runs alone (the group protocol is Python state)."""
    m, _ = _applied(shared_pack)
    k = m.layers[0].attn.k_proj
    torch._dynamo.reset()
    c = torch.compile(k, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, D)
    with torch.no_grad():
        torch.testing.assert_close(c(x), k(x), rtol=1e-5, atol=1e-6)
        m.layers[0].attn.q_proj(x)  # eager q starts a group call; the compiled k does not take it
        torch.testing.assert_close(c(x), k(x), rtol=1e-5, atol=1e-6)
