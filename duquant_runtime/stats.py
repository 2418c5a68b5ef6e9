"""Activation statistics of a float model's linear layers, for activation-aware pack builds.

    from duquant_runtime import collect_stats
    collect_stats(model, batches, out="stats.h5", layers=r"mlp\\.down_proj$", second_moment=True)
    # then: duquant-pack build CKPT --act-stats stats.h5 --lambda-smooth 0.5 --rounding gptq ...

Runs the float model on the user's batches (each `model(**b)` for a dict, `model(*b)` for a
tuple/list, else `model(b)`; or `forward(model, b)`) with forward pre-hooks on the selected
`nn.Linear` modules, and stores per layer, over every token (row of the flattened input):

- ``absmax`` float32 (in,): max |x_j|;
- ``percentiles`` float32 (n_p, in): the per-channel percentiles `percentiles` of |x_j|
  (exact while the rank lies in the kept top values; see activation.TopKPercentile);
- ``sample`` float32 (n, in): the first `sample_tokens` tokens (for offline static scales);
- ``xtx`` float64 (in, in), only with `second_moment=True`: X^T X, accumulated in float64 on the
  input's device. In memory that is 8 in^2 bytes per layer while collecting (2 GiB for a 16384-wide
  down_proj: collect wide layers a few at a time with `layers=`); on disk it is chunked
  (512 x 512) and gzip-compressed (level 4, with shuffle), typically 85-95% of the raw size since
  float64 sums compress poorly.

File layout (HDF5, no timestamps, so the same batches give the same bytes): root attributes
``format`` = "duquant-act-stats", ``format_version`` = 1, ``percentiles`` (JSON list),
``batches`` (int); one group per layer, named by the module name, with the datasets above and the
attributes ``tokens`` (int) and ``data_sha256`` (sha256 over the group's datasets, as the layer
files' `data_sha256`: name, dtype, shape, little-endian bytes, in sorted name order). The pack
compiler keys each layer on that digest, so a different statistics file recomputes exactly the
layers whose statistics differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Callable, Iterable

import h5py
import numpy as np
import torch
from torch import nn

from .atomic import atomic_file
from .errors import DuquantError

STATS_FORMAT_NAME = "duquant-act-stats"
STATS_FORMAT_VERSION = 1
DEFAULT_PERCENTILES = (99.0, 99.9, 99.99)
_XTX_CHUNK = 512


class _LayerAccumulator:
    """Streaming statistics of one layer's inputs."""

    def __init__(self, in_features: int, percentiles, steps: int, second_moment: bool, sample_tokens: int):
        self.in_features = in_features
        self.q = [p / 100.0 for p in percentiles]
        self.steps = steps
        self.tokens = 0
        self.absmax = None
        self.top = None  # (k, in) descending |x|
        self.k = 0
        self.xtx = None if not second_moment else "pending"
        self.sample_tokens = sample_tokens
        self.sample: list[torch.Tensor] = []
        self.sampled = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        a = x.abs().to(torch.float32)
        amax = a.amax(dim=0) if a.shape[0] else torch.zeros(a.shape[1], device=a.device)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.top is None:
            self.k = max(2, math.ceil((1 - min(self.q)) * a.shape[0] * self.steps * 2) + 2)
            cur = a
        else:
            cur = torch.cat([self.top, a], dim=0)
        self.top = torch.topk(cur, min(self.k, cur.shape[0]), dim=0, largest=True, sorted=True).values
        if self.xtx is not None:
            x64 = x.to(torch.float64)
            if isinstance(self.xtx, str):
                self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.xtx.addmm_(x64.t(), x64)
        if self.sampled < self.sample_tokens:
            take = x[: self.sample_tokens - self.sampled].to("cpu", torch.float32).clone()
            self.sample.append(take)
            self.sampled += take.shape[0]
        self.tokens += x.shape[0]

    def percentiles(self) -> torch.Tensor:
        """(n_p, in) float32, linear interpolation between order statistics (torch.quantile's rule)."""
        out = []
        for q in self.q:
            d = (self.tokens - 1) * (1 - q)
            lo = min(int(math.floor(d)), self.top.shape[0] - 1)
            hi = min(lo + 1, self.top.shape[0] - 1)
            frac = d - math.floor(d) if int(math.floor(d)) == lo else 0.0
            out.append(self.top[lo] + (self.top[hi] - self.top[lo]) * frac)
        return torch.stack(out).to("cpu", torch.float32)

    def arrays(self) -> dict:
        d = {"absmax": self.absmax.to("cpu", torch.float32).numpy(), "percentiles": self.percentiles().numpy(),
             "sample": (torch.cat(self.sample) if self.sample else torch.zeros(0, self.in_features)).numpy()}
        if self.xtx is not None and not isinstance(self.xtx, str):
            d["xtx"] = self.xtx.cpu().numpy()
        return d


def stats_datasets_sha256(arrays: dict) -> str:
    """sha256 over named arrays: for each name in sorted order, "name:dtype:shape;" then little-endian bytes."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _select(model: nn.Module, layers) -> dict[str, nn.Linear]:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is None:
        return linears
    if isinstance(layers, str):
        rx = re.compile(layers)
        chosen = {n: m for n, m in linears.items() if rx.search(n)}
    else:
        missing = [n for n in layers if n not in linears]
        if missing:
            raise DuquantError(f"collect_stats: no nn.Linear named {', '.join(missing[:3])}")
        chosen = {n: linears[n] for n in layers}
    if not chosen:
        raise DuquantError(f"collect_stats: layers={layers!r} selects no nn.Linear module")
    return chosen


def collect_stats(model: nn.Module, batches: Iterable, out="stats.h5", layers=None, *,
                  second_moment: bool = False, percentiles=DEFAULT_PERCENTILES, sample_tokens: int = 2048,
                  steps: int | None = None, forward: Callable | None = None) -> Path:
    """Run `model` on `batches` (no grad) and write the statistics of the selected linear layers' inputs.

    layers: None (every nn.Linear), a list of module names, or a regex (re.search on names).
    steps: the number of batches, to size the exact-percentile buffers (default len(batches), else 64).
    Returns the path written (atomically).
    """
    chosen = _select(model, layers)
    if steps is None:
        steps = len(batches) if hasattr(batches, "__len__") else 64
    for p in percentiles:
        if not 0 < p <= 100:
            raise DuquantError(f"collect_stats: percentile {p} is not in (0, 100]")
    acc = {n: _LayerAccumulator(m.in_features, percentiles, max(1, steps), second_moment, sample_tokens)
           for n, m in chosen.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: acc[name].update(args[0]))
             for n, m in chosen.items()]
    n_batches = 0
    try:
        with torch.no_grad():
            for b in batches:
                if forward is not None:
                    forward(model, b)
                elif isinstance(b, dict):
                    model(**b)
                elif isinstance(b, (tuple, list)):
                    model(*b)
                else:
                    model(b)
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    unseen = [n for n, a in acc.items() if a.tokens == 0]
    if unseen:
        raise DuquantError(f"collect_stats: layer(s) {', '.join(unseen[:3])} never ran on the batches")
    path = Path(out)
    with atomic_file(path) as t:
        with h5py.File(t.tmp, "w", libver="earliest", track_order=False) as f:
            f.attrs["format"] = STATS_FORMAT_NAME
            f.attrs["format_version"] = STATS_FORMAT_VERSION
            f.attrs["percentiles"] = json.dumps([float(p) for p in percentiles])
            f.attrs["batches"] = n_batches
            for name in sorted(acc):
                arrays = acc[name].arrays()
                g = f.create_group(name)
                g.attrs["tokens"] = acc[name].tokens
                g.attrs["data_sha256"] = stats_datasets_sha256(arrays)
                for key, arr in sorted(arrays.items()):
                    kw = {}
                    if key == "xtx":
                        c = min(_XTX_CHUNK, arr.shape[0])
                        kw = {"chunks": (c, c), "compression": "gzip", "compression_opts": 4, "shuffle": True}
                    elif key == "sample" and arr.size:
                        kw = {"chunks": (min(256, arr.shape[0]), arr.shape[1]), "compression": "gzip",
                              "compression_opts": 4, "shuffle": True}
                    g.create_dataset(key, data=np.ascontiguousarray(arr), track_times=False, **kw)
                del arrays
                acc[name] = None  # free the float64 accumulator early
    return path


__all__ = ["collect_stats", "STATS_FORMAT_NAME", "STATS_FORMAT_VERSION", "stats_datasets_sha256"]
