"""How fast can an int8 GEMM be here? The ceiling the W4A8 GEMM (kernels/w4a8.py) is judged by.

    PYTHONPATH=. python3 benchmarks/int8_ceiling.py [--out FILE] [--repeats N]

For the pi0.5 LLM shapes at M = 800 (gate/up linked: N = 32768, K = 2048; down_proj: N = 2048,
K = 16384), CUDA-graph replays over enough weight instances to exceed L2, same run:
- bf16 `torch.mm` (cuBLAS), int8 `torch._int_mm` (cuBLAS int8, int8 weights: 2x the int4 bytes);
- a plain Triton int8 x int8 GEMM (both operands int8 in memory, shared-memory operands, the
  compiler's software pipeline), per tile configuration;
- the same in Gluon (Triton's explicit dialect): a TMA ring of STAGES shared-memory buffers and
  one wgmma kept in flight (`wgmma.wait_group 1`), which Triton 3.6 does not generate itself;
- the W4A8 GEMM launch alone (`w4_gemm` on int8 codes, packed int4 weights).
Writes JSON; prints TOPS per variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_results  # noqa: E402
from runtime_gpu import graph_time  # noqa: E402
from w4a8_cases import instances  # noqa: E402
from duquant_runtime.kernels import w4a8 as K  # noqa: E402
from duquant_runtime.kernels.w4a8_rs import grouped_tile  # noqa: E402


@triton.jit
def _int8_mm(a_ptr, w_ptr, c_ptr, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             GROUP: tl.constexpr):
    """c (M, N) int32 = a (M, K) int8 @ w (N, K)^T int8."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    per_group = GROUP * num_m
    first_n = (pid // per_group) * GROUP
    group_n = min(num_n - first_n, GROUP)
    pid_n = first_n + ((pid % per_group) % group_n)
    pid_m = (pid % per_group) // group_n
    offs_m = (pid_m * BM + tl.arange(0, BM)) % M
    offs_n = (pid_n * BN + tl.arange(0, BN)) % N
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        acc = tl.dot(tl.load(a_ptrs + k0), tl.trans(tl.load(w_ptrs + k0)), acc, out_dtype=tl.int32)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@gluon.jit
def _gl_int8_mm(a_desc, w_desc, c_ptr, M, N, K, STAGES: gl.constexpr, INSTR_N: gl.constexpr,
                WARPS_M: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    pid = gl.program_id(0)
    off_m, off_n = grouped_tile(pid, M, N, BM, BN, 8)
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS_M, num_warps // WARPS_M],
                                                         instr_shape=[16, INSTR_N, 32])
    acc = gl.zeros((BM, BN), dtype=gl.int32, layout=mma_layout)
    nk = K // BK
    nbytes: gl.constexpr = a_desc.block_type.nbytes + w_desc.block_type.nbytes
    for p in gl.static_range(STAGES - 1):
        mbarrier.expect(bars.index(p), nbytes)
        tma.async_copy_global_to_shared(a_desc, [off_m, p * BK], bars.index(p), a_bufs.index(p))
        tma.async_copy_global_to_shared(w_desc, [off_n, p * BK], bars.index(p), w_bufs.index(p))
    for i in range(nk):
        st = i % STAGES
        mbarrier.wait(bars.index(st), (i // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(st), w_bufs.index(st).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        j = i + STAGES - 1
        if j < nk:  # the stage of iteration i - 1, whose wgmma has finished
            sj = j % STAGES
            mbarrier.expect(bars.index(sj), nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, j * BK], bars.index(sj), a_bufs.index(sj))
            tma.async_copy_global_to_shared(w_desc, [off_n, j * BK], bars.index(sj), w_bufs.index(sj))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(q))
    offs_m = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma_layout))
    offs_n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
    gl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _descs(a, w, bm, bn, bk):
    la = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)
    lw = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)
    return (TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk], la),
            TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk], lw))



def gluon_int8_mm(a, w, cfg):
    m, k = a.shape
    n = w.shape[0]
    bm, bn, bk, stages, warps, warps_m, instr_n = cfg
    ad, wd = _descs(a, w, bm, bn, bk)
    c = torch.empty((m, n), device=a.device, dtype=torch.int32)
    _gl_int8_mm[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](ad, wd, c, m, n, k, STAGES=stages, INSTR_N=instr_n,
                                                            WARPS_M=warps_m, num_warps=warps)
    return c


def int8_mm(a, w, cfg):
    m, k = a.shape
    n = w.shape[0]
    c = torch.empty((m, n), device=a.device, dtype=torch.int32)
    bm, bn, bk, warps, stages = cfg
    _int8_mm[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](a, w, c, m, n, K=k, BM=bm, BN=bn, BK=bk, GROUP=8,
                                                        num_warps=warps, num_stages=stages)
    return c


GLUON_TILES = [(128, 256, 128, 4, 8, 8, 128), (128, 128, 128, 4, 4, 4, 128), (128, 256, 64, 5, 8, 8, 128),
               (128, 128, 128, 4, 8, 8, 128), (64, 256, 128, 4, 4, 4, 128), (128, 128, 256, 3, 8, 8, 128),
               (128, 128, 64, 6, 8, 8, 128)]
TILES = [(128, 128, 128, 4, 4), (128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3),
         (128, 256, 64, 8, 4), (64, 256, 128, 4, 4), (128, 128, 256, 8, 3)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_ceiling.json"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    res = {"benchmark": "int8_ceiling", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "shapes": []}
    g = torch.Generator(device="cpu").manual_seed(0)
    for label, m, n, k in (("llm gate_up", 800, 32768, 2048), ("llm down", 800, 2048, 16384)):
        count = instances(n, k, 256 << 20)
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(dev)
        ab = a.to(torch.bfloat16)
        w8 = [torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8).to(dev) for _ in range(count)]
        wb = [w.to(torch.bfloat16) for w in w8]
        wp = [torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(dev) for _ in range(count)]
        ws = torch.rand(n, generator=g).to(dev)
        ts = torch.rand(m, generator=g).to(dev)
        ops = 2.0 * m * n * k
        row = {"label": label, "M": m, "N": n, "K": k, "instances": count}
        t = {"bf16_mm": graph_time([lambda x, w=w: torch.mm(x, w.t()) for w in wb], ab, args.repeats),
             "int_mm_cublas": graph_time([lambda x, w=w: torch._int_mm(x, w.t()) for w in w8], a, args.repeats)}
        cfg = K.pick_config(m, n, k, K.MODE_DYNAMIC)
        t["w4a8_gemm"] = graph_time([lambda x, w=w: K.w4_gemm(x, ts, qweight=w, w_scale=ws, r_out=None, bias=None,
                                                           out_dtype=torch.bfloat16, cfg=cfg) for w in wp], a,
                                    args.repeats)
        ref = torch._int_mm(a, w8[0].t())
        for kind, mm, tiles in (("triton_int8", int8_mm, TILES), ("gluon_int8", gluon_int8_mm, GLUON_TILES)):
            for tile in tiles:
                try:
                    assert torch.equal(mm(a, w8[0], tile), ref)
                    t[f"{kind}_{'x'.join(map(str, tile))}"] = graph_time(
                        [lambda x, w=w, tile=tile, mm=mm: mm(x, w, tile) for w in w8], a, args.repeats)
                except Exception as err:  # a tile that does not fit is skipped
                    print(f"  {kind} {tile}: {type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}")
        row["times_s"] = t
        row["tops"] = {key: ops / v / 1e12 for key, v in t.items()}
        res["shapes"].append(row)
        for key, v in t.items():
            print(f"{label:12s} {key:32s} {v * 1e6:8.1f} us {ops / v / 1e12:7.0f} TOPS", flush=True)
        del w8, wb, wp
        torch.cuda.empty_cache()
    write_results(args.out, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
