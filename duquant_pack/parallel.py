"""Where the per-layer work runs: local worker processes, threads feeding a GPU, or a Dask cluster.

    for result in run_unordered(fn, [args, ...], backend="local", jobs=2):
        ...   # results in completion order

- ``local``: joblib's loky process pool (``jobs`` processes; 1 = in this process).
- ``threads``: a thread pool in this process (the CUDA build: threads overlap reading, hashing and
  writing with the GPU work, which torch runs without the GIL).
- ``dask``: joblib's Dask backend on an existing cluster (``scheduler`` = its address, e.g.
  ``tcp://10.0.0.5:8786``). Every worker must have duquant installed and see the checkpoint and
  the output directory at the same paths (a shared file system): workers read their layers and
  write their layer files themselves; only small manifest entries travel back.

Results never depend on the backend: each task computes single-threaded from its own inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from .errors import BuildError

BACKENDS = ("local", "dask")


def run_unordered(fn: Callable, arg_list: Sequence[tuple], *, backend: str, jobs: int,
                  scheduler: str | None = None) -> Iterator:
    """fn(*args) for every args in `arg_list`, yielded as they complete."""
    if not arg_list:
        return iter(())
    if backend == "local":
        if jobs == 1:
            return (fn(*a) for a in arg_list)
        from joblib import Parallel, delayed
        return Parallel(n_jobs=min(jobs, len(arg_list)), backend="loky",
                        return_as="generator_unordered")(delayed(fn)(*a) for a in arg_list)
    if backend == "threads":
        return _threads(fn, arg_list, jobs)
    if backend == "dask":
        return _dask(fn, arg_list, scheduler)
    raise BuildError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")


def _threads(fn: Callable, arg_list: Sequence[tuple], jobs: int) -> Iterator:
    """At most `jobs` tasks in flight (bounds memory), results as they complete."""
    limit_malloc_arenas()
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="duquant-layer") as pool:
        pending, it = set(), iter(arg_list)
        for a in it:
            pending.add(pool.submit(fn, *a))
            if len(pending) >= jobs:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.add(pool.submit(fn, *nxt))


M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 2


def limit_malloc_arenas(n: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process before starting worker threads.

    By default glibc gives each thread its own arena (up to 8 per core) and keeps freed
    layer-sized buffers there: a CUDA build with 8 threads peaked at 12.4 GiB RSS on the H100
    machine, 1.8 GiB with 2 arenas, at the same speed (docs/benchmarks.md). The same as setting
    MALLOC_ARENA_MAX; an explicit MALLOC_ARENA_MAX wins. No-op (False) off glibc."""
    import ctypes
    import os

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError):
        return False


def _dask(fn: Callable, arg_list: Sequence[tuple], scheduler: str | None) -> Iterator:
    if not scheduler:
        raise BuildError("--backend dask needs --scheduler ADDRESS (the address of a running Dask scheduler)")
    try:
        from dask.distributed import Client
        from joblib import Parallel, delayed, parallel_config
    except ImportError:
        raise BuildError("--backend dask needs the 'distributed' package: pip install 'duquant[dask]'") from None
    try:
        client = Client(scheduler, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise BuildError(f"--scheduler {scheduler}: cannot connect to a Dask scheduler ({err})") from None
    try:
        with parallel_config(backend="dask", client=client):
            yield from Parallel(n_jobs=-1, return_as="generator_unordered")(delayed(fn)(*a) for a in arg_list)
    finally:
        client.close()
