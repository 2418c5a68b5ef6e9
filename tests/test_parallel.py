"""Backends of the per-layer work (duquant_pack.parallel) and builds through them: a Dask cluster on
loopback and (with CUDA) the GPU build give the same pack as a local build."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_pack.errors import BuildError
from duquant_pack.parallel import run_unordered
from duquant_runtime import load_pack

from _util import tree_bytes as pack_bytes

SMALL = r"language_model\.layers\.0\.(self_attn|mlp)\.[a-z_]+_proj$|gemma_expert\.model\.layers\.1\.mlp\."


def _slow_square(x, delay):
    time.sleep(delay)
    return x * x


@pytest.mark.parametrize("backend, jobs", [("local", 1), ("local", 2), ("threads", 3)])
def test_run_unordered_returns_every_result(backend, jobs):
    args = [(i, 0.02 * (5 - i)) for i in range(6)]
    got = list(run_unordered(_slow_square, args, backend=backend, jobs=jobs))
    assert sorted(got) == [i * i for i in range(6)]


def test_threads_bound_tasks_in_flight():
    live, peak, lock = [0], [0], threading.Lock()

    def task(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.01)
        with lock:
            live[0] -= 1
        return i

    assert sorted(run_unordered(task, [(i,) for i in range(20)], backend="threads", jobs=3)) == list(range(20))
    assert peak[0] <= 3


def test_threads_propagate_errors():
    def boom(i):
        if i == 2:
            raise ValueError("layer 2 failed")
        return i

    with pytest.raises(ValueError, match="layer 2 failed"):
        list(run_unordered(boom, [(i,) for i in range(5)], backend="threads", jobs=2))


def test_unknown_backend_and_missing_scheduler(synth2, tmp_path):
    cfg, _ = resolve("pi05-llm", include=SMALL)
    with pytest.raises(BuildError, match="unknown backend 'spark'"):
        build_pack(synth2, tmp_path / "p", cfg, backend="spark", progress=False)
    with pytest.raises(BuildError, match="needs --scheduler"):
        build_pack(synth2, tmp_path / "p", cfg, backend="dask", progress=False)
    with pytest.raises(BuildError, match="is not 'cpu', 'cuda' or 'cuda:N'"):
        build_pack(synth2, tmp_path / "p", cfg, device="tpu", progress=False)
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_device_without_cuda_is_a_clean_error(synth2, tmp_path):
    cfg, _ = resolve("pi05-llm", include=SMALL)
    with pytest.raises(BuildError, match="no CUDA device is available"):
        build_pack(synth2, tmp_path / "p", cfg, device="cuda", progress=False)
    assert not (tmp_path / "p").exists()


def test_dask_cluster_on_loopback_gives_the_local_pack(synth2, tmp_path):
    distributed = pytest.importorskip("distributed")
    cfg, _ = resolve("pi05-llm-expert", include=SMALL)
    local = build_pack(synth2, tmp_path / "local", cfg, jobs=1, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=40) as cluster:
        remote = build_pack(synth2, tmp_path / "dask", cfg, backend="dask", scheduler=cluster.scheduler_address,
                            progress=False)
        assert remote.computed == local.layers
        again = build_pack(synth2, tmp_path / "dask", cfg, backend="dask", scheduler=cluster.scheduler_address,
                           progress=False)
        assert again.reused == local.layers  # incremental through the cluster too
    assert pack_bytes(tmp_path / "dask") == pack_bytes(tmp_path / "local")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_matches_cpu_build_up_to_rounding(synth2, tmp_path):
    cfg, _ = resolve("pi05-llm-expert", include=SMALL, store_qweights=True)
    build_pack(synth2, tmp_path / "cpu", cfg, jobs=1, progress=False)
    build_pack(synth2, tmp_path / "gpu", cfg, device="cuda", progress=False)
    build_pack(synth2, tmp_path / "gpu2", cfg, device="cuda", jobs=2, progress=False)
    assert pack_bytes(tmp_path / "gpu") == pack_bytes(tmp_path / "gpu2")  # GPU builds are reproducible
    cpu, gpu = load_pack(tmp_path / "cpu"), load_pack(tmp_path / "gpu")
    assert gpu.manifest["tool"]["device"] == "cuda" and "device" not in cpu.manifest["tool"]
    for name in cpu.layer_names:
        a, b = cpu.layer(name), gpu.layer(name)
        assert torch.equal(a.perm, b.perm)
        assert float((a.r_in - b.r_in).abs().max()) < 1e-5
        if a.r_out is not None:
            assert float((a.r_out - b.r_out).abs().max()) < 1e-5
        # the MSE scale search picks, per row, the best of a grid of clipping ratios: where two are
        # within float32 rounding of each other the GPU may pick the other one (docs/algorithm.md §13)
        rel = ((a.weight_scale - b.weight_scale) / a.weight_scale).abs()
        same = rel < 1e-5
        assert float(same.float().mean()) > 0.98, (name, float(same.float().mean()))
        qa, qb = a.qweight.numpy(), b.qweight.numpy()  # (packed) integers, one row per output
        rows = same.numpy()
        assert np.mean(qa[rows] != qb[rows]) < 1e-4  # integers agree except for rounding ties
