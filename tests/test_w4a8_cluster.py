"""The one-launch cluster activation codes (kernels/w4a8_cluster.py).

- On an sm_90 GPU (skipped without, and without Gluon): codes and scales bit-identical to
  `w4a8_act` (same products and sums) where that kernel runs, within quantization ties of the
  Triton prep + quantize launches on every pi0.5 activation shape (row-major and token-minor x,
  M = 1 / 50 / 800); cluster sizes and tile heights agree; the whole layer within bf16 rounding;
  repeated launches (CUDA graph replays) give the same codes.
- Without a GPU (Triton installed): which operands the kernel takes, and the sm_90 code Triton
  generates offline (cluster barriers, cp.async, bf16 wgmma).
"""

from __future__ import annotations

import pytest
import torch

from _util import assert_codes_within_ties, hard_rows, layer_err_vs_triton_launches, w4a8_operands
from duquant_runtime.kernels import device_capability, fast_path_available, triton_available


def _cluster_ready() -> bool:
    if not (torch.cuda.is_available() and fast_path_available("cuda")):
        return False
    from duquant_runtime.kernels import w4a8 as K
    dev = torch.device("cuda")
    return (tuple(device_capability("cuda")) == (9, 0) and K._hopper_module(dev, "w4a8_cluster") is not None
            and K._hopper_module(dev, "w4a8_act") is not None)


needs_cluster = pytest.mark.skipif(not _cluster_ready(), reason="needs an sm_90 GPU, Triton and Gluon")
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton not installed")

# (M, K, token-minor x): the pi0.5 activation shapes (expert M = 50: K 1024 / 2048 / 4096; LLM
# M = 800: K 2048; M = 1) and a token count that is not a multiple of 8
SHAPES = [(50, 1024, False), (50, 2048, False), (50, 4096, True), (800, 2048, False), (1, 2048, False),
          (136, 4096, True), (200, 1024, False)]


def _kw(r_in, perm):
    from duquant_runtime.kernels import w4a8 as K
    return dict(r_in=r_in, perm=perm, smooth=None, mode=K.MODE_DYNAMIC)  # noqa: C408


@needs_cluster
@pytest.mark.parametrize(("m", "k", "token_minor"), SHAPES)
def test_codes_and_scales_match_the_triton_launches(m, k, token_minor):
    from duquant_runtime.kernels import w4a8 as K
    x, perm, r_in = w4a8_operands(m, k, token_minor, m + k)
    cfg = dict(K.pick_config(m, 2048, k, K.MODE_DYNAMIC))
    codes, s = K.prepare_activation(x, cfg={**cfg, "ACT": "cluster"}, **_kw(r_in, perm))
    ref_codes, ref_s = K.prepare_activation(x, cfg={**cfg, "ACT": None}, **_kw(r_in, perm))
    torch.cuda.synchronize()
    assert_codes_within_ties(codes, s, ref_codes, ref_s)
    # the codes follow the rotation: a transposed R_in gives other codes almost everywhere
    bad, _ = K.prepare_activation(x, cfg={**cfg, "ACT": "cluster"},
                                  **_kw(r_in.transpose(1, 2).contiguous(), perm))
    assert float((bad != ref_codes).float().mean()) > 0.5


@needs_cluster
@pytest.mark.parametrize(("m", "k", "token_minor", "f16"), [(800, 2048, False, False), (128, 4096, True, False),
                                                           (64, 1024, False, False), (800, 2048, False, True),
                                                           (128, 4096, True, True), (64, 1024, False, True)])
def test_codes_are_bit_identical_to_the_two_pass_kernel(m, k, token_minor, f16):
    """The same sums as `w4a8_act` with the same R_in operand form (bf16 terms, or ACT_F16's
    scaled float16 rows, here also on rows float16 cannot hold as they are)."""
    from duquant_runtime.kernels import w4a8 as K
    x, perm, r_in = w4a8_operands(m, k, token_minor, 3 * m + k)
    if f16:
        x = hard_rows(x)
        x = x.t().contiguous().t() if token_minor else x.contiguous()
    cfg = dict(K.pick_config(max(m, 65), 2048, k, K.MODE_DYNAMIC), XLOAD="transpose", ACT_F16=f16)
    codes, s = K.prepare_activation(x, cfg={**cfg, "ACT": "cluster"}, **_kw(r_in, perm))
    two, s2 = K.prepare_activation(x, cfg={**cfg, "ACT": "wgmma"}, **_kw(r_in, perm))
    assert torch.equal(s, s2)
    assert torch.equal(codes, two)


@needs_cluster
@pytest.mark.parametrize(("cl", "bm", "warps"), [(4, 64, 4), (16, 128, 4), (8, 64, 4), (8, 128, 4)])
def test_cluster_sizes_and_tiles_give_the_same_codes(cl, bm, warps):
    from duquant_runtime.kernels import w4a8 as K
    m, k = 300, 2048
    x, perm, r_in = w4a8_operands(m, k, False, 9)
    cfg = dict(K.pick_config(m, 2048, k, K.MODE_DYNAMIC), ACT="cluster")
    base, s0 = K.prepare_activation(x, cfg=cfg, **_kw(r_in, perm))
    codes, s = K.prepare_activation(x, cfg={**cfg, "CL": cl, "CL_BM": bm, "CL_WARPS": warps}, **_kw(r_in, perm))
    assert torch.equal(s, s0)
    assert torch.equal(codes, base)


@needs_cluster
def test_graph_replays_give_the_same_codes():
    """The partial maxima and the scratch are written before they are read in every launch: a
    CUDA graph replayed on new inputs (with PDL, as the runtime launches) gives their codes."""
    from duquant_runtime.kernels import w4a8 as K
    m, k = 50, 2048
    x, perm, r_in = w4a8_operands(m, k, False, 21)
    cfg = dict(K.pick_config(m, 1024, k, K.MODE_DYNAMIC), ACT="cluster")
    static = x.clone()
    K.prepare_activation(static, cfg=cfg, **_kw(r_in, perm))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.prepare_activation(static, cfg=cfg, **_kw(r_in, perm))
    for seed in (1, 2, 3):
        x2, _, _ = w4a8_operands(m, k, False, seed)
        static.copy_(x2)
        graph.replay()
        ref = K.prepare_activation(x2, cfg=cfg, **_kw(r_in, perm))
        torch.cuda.synchronize()
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@needs_cluster
@pytest.mark.parametrize(("m", "n", "k"), [(50, 1024, 2048), (50, 1024, 4096), (800, 2048, 2048), (50, 2560, 1024)])
def test_layer_with_cluster_codes_matches_the_triton_path(m, n, k):
    x, perm, r_in = w4a8_operands(m, k, False, 3)
    assert layer_err_vs_triton_launches(x, n, k, r_in, perm, "cluster") < 2e-3


@needs_triton
def test_usable_takes_only_operands_the_kernel_reads_correctly():
    from duquant_runtime.kernels import w4a8_cluster as C
    x = torch.zeros(50, 2048, dtype=torch.bfloat16)
    r_in = torch.zeros(32, 64, 64, dtype=torch.float16)
    assert C.usable(x, r_in, None, 127, 256, {})
    assert C.usable(x.t().contiguous().t(), r_in, None, 127, 256, {})  # token-minor
    assert not C.usable(x[:, ::2], torch.zeros(16, 64, 64, dtype=torch.float16), None, 127, 256, {})  # strided
    assert not C.usable(x.float(), r_in, None, 127, 256, {})
    assert not C.usable(x, r_in.float(), None, 127, 256, {})  # float32 R_in: hi + lo would not be exact
    assert not C.usable(x, torch.zeros(64, 32, 32, dtype=torch.float16), None, 127, 256, {})
    assert not C.usable(x, r_in, torch.ones(2048), 127, 256, {})  # smoothing is the Triton prep's
    assert not C.usable(x, r_in, None, 32767, 256, {})
    assert not C.usable(x, r_in, None, 127, 32, {})  # a 64-wide block would span two GEMM K tiles
    assert not C.usable(torch.zeros(50, 16384, dtype=torch.bfloat16), torch.zeros(256, 64, 64, dtype=torch.float16),
                        None, 127, 256, {})  # 16 blocks per program: more than shared memory holds
    assert not C.usable(x, r_in, None, 127, 256, {"CL": 4, "CL_BM": 128})  # 8 blocks of 128 tokens: too
    assert C.usable(x, r_in, None, 127, 256, {"CL": 4, "CL_BM": 64})
    assert not C.usable(x, r_in, None, 127, 256, {"CL_BM": 64, "CL_WARPS": 8})  # 8 warps need 128 tokens
    assert C.usable(x, r_in, None, 127, 256, {"CL_BM": 128, "CL_WARPS": 8})
    assert C.cluster_size(2048, {"CL": 16}) == 16 and C.cluster_size(1024, {"CL": 32}) == 16
    assert C.cluster_size(128, {}) == 2 and C.cluster_size(2048, {}) == 16


@needs_triton
def test_offline_sm90_code():
    """benchmarks/compile_w4a8.py `cluster_report` compiles the kernel for sm_90 without a GPU."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compile_w4a8
    for xt, k, f16 in ((False, 2048, False), (True, 4096, False), (False, 2048, True)):
        r = compile_w4a8.cluster_report(k, xt, f16=f16)
        assert r["wgmma"] == ["m64n64k16.f32.f16.f16" if f16 else "m64n64k16.f32.bf16.bf16"], r
        assert r["cluster_barriers"] == 2, r  # after the transpose, after the partial maxima
        assert r["cp_async_bytes"] == [16], r
        assert r["registers"] and r["shared_bytes"] > 0, r
        assert "st.global.v4.b32" in r["global_stores"], r  # the codes in 16-byte vectors


@needs_triton
def test_a_refused_cluster_launch_returns_none_and_is_not_retried(monkeypatch):
    """A GPU that cannot schedule the cluster (CUDA_ERROR_CLUSTER_OUT_OF_RESOURCES) gets None, so
    that `prepare_activation` runs its other launches, and the size is not tried again there."""
    from duquant_runtime.kernels import w4a8_cluster as C
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("Triton Error [CUDA]: cluster out of resources")

    monkeypatch.setattr(C, "_launch_clusters", refuse)
    monkeypatch.setattr(C, "_REFUSED", set())
    x = torch.zeros(50, 2048, dtype=torch.bfloat16)
    r_in = torch.zeros(32, 64, 64, dtype=torch.float16)
    assert C.act_codes(x, None, r_in, 256, -128, 127, {"CL": 16}) is None
    assert C.act_codes(x, None, r_in, 256, -128, 127, {"CL": 16}) is None
    assert len(calls) == 1
    assert C.act_codes(x, None, r_in, 256, -128, 127, {"CL": 8}) is None  # another size is tried
    assert len(calls) == 2
