"""Reading an activation-statistics file (duquant_runtime.collect_stats) in the compiler, and the
offline static activation scales a build writes from it.

    sid = stats_file_id("stats.h5")                  # "sha256:<hex>": recorded as config.act_stats
    st = read_layer_stats("stats.h5", name, xtx=True)  # LayerStats (checked against its digest)

A layer's statistics are identified by the group's ``data_sha256`` attribute (see
duquant_runtime/stats.py); it enters the layer's key, so the same file reuses finished layers and
a different one recomputes exactly the layers whose statistics changed. Any problem with the file
raises BuildError with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import h5py
import torch

from duquant_runtime.format import file_sha256
from duquant_runtime.quant import qrange
from duquant_runtime.stats import STATS_FORMAT_NAME, STATS_FORMAT_VERSION, stats_datasets_sha256
from duquant_runtime.transforms import input_transform

from .errors import BuildError


@dataclass
class LayerStats:
    """One layer's activation statistics (CPU tensors)."""

    name: str
    digest: str  # the group's data_sha256
    tokens: int
    absmax: torch.Tensor  # float32 (in,)
    percentiles: torch.Tensor  # float32 (n_p, in)
    sample: torch.Tensor  # float32 (n, in)
    xtx: torch.Tensor | None  # float64 (in, in), when read with xtx=True and present


def stats_file_id(path) -> str:
    """The identity recorded in the config: "sha256:" + sha256 of the file's bytes."""
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"{p}: activation statistics file does not exist")
    return "sha256:" + file_sha256(p)


def _open(path):
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise BuildError(f"{path}: not a readable HDF5 statistics file ({err})") from None
    if f.attrs.get("format") != STATS_FORMAT_NAME or f.attrs.get("format_version") != STATS_FORMAT_VERSION:
        f.close()
        raise BuildError(f"{path}: not a duquant activation statistics file (version {STATS_FORMAT_VERSION})")
    return f


def layer_stats_digest(path, name: str) -> str:
    """The `data_sha256` of layer `name` (no data read)."""
    with _open(path) as f:
        if name not in f:
            raise BuildError(f"{path}: no statistics for layer '{name}' (collect them with layers= covering it)")
        return str(f[name].attrs["data_sha256"])


def read_layer_stats(path, name: str, in_features: int, *, xtx: bool = False) -> LayerStats:
    """Read and check layer `name`'s statistics (all datasets hashed against `data_sha256`)."""
    with _open(path) as f:
        if name not in f:
            raise BuildError(f"{path}: no statistics for layer '{name}' (collect them with layers= covering it)")
        g = f[name]
        arrays = {k: g[k][()] for k in g.keys()}
        digest = str(g.attrs["data_sha256"])
        tokens = int(g.attrs["tokens"])
    if stats_datasets_sha256(arrays) != digest:
        raise BuildError(f"{path}: statistics of '{name}' do not match their checksum (corrupt file)")
    for key, shape in (("absmax", (in_features,)), ("percentiles", None), ("sample", None)):
        a = arrays.get(key)
        if a is None or a.shape[-1] != in_features or (shape and a.shape != shape):
            raise BuildError(f"{path}: statistics of '{name}' lack '{key}' of width {in_features}")
    if xtx and "xtx" not in arrays:
        raise BuildError(f"{path}: layer '{name}' has no X^T X; collect_stats(..., second_moment=True) "
                         "is needed for --rounding gptq")
    x = arrays.get("xtx") if xtx else None
    if x is not None and x.shape != (in_features, in_features):
        raise BuildError(f"{path}: X^T X of '{name}' is {x.shape}, expected ({in_features}, {in_features})")
    return LayerStats(name=name, digest=digest, tokens=tokens, absmax=torch.from_numpy(arrays["absmax"]),
                      percentiles=torch.from_numpy(arrays["percentiles"]),
                      sample=torch.from_numpy(arrays["sample"]),
                      xtx=torch.from_numpy(x) if x is not None else None)


def offline_act_scale(sample: torch.Tensor, smooth, perm, r_in, percentile: float, abits: int) -> torch.Tensor:
    """Static per-channel scale (in,) float32 of x_t = (x / s) P BD(R_in) over the stored sample tokens:
    the `percentile` of |x_t| per channel (torch.quantile, linear interpolation) / qmax; 0 -> 1."""
    x = sample.to(torch.float32)
    if smooth is not None:
        x = x / smooth
    xt = input_transform(x, perm, r_in).abs()
    _, qmax = qrange(abits)
    s = torch.quantile(xt, percentile / 100.0, dim=0) / qmax if xt.shape[0] > 1 else xt[0] / qmax
    return torch.where(s > 0, s, torch.ones_like(s)).to(torch.float32)


def write_offline_calibration(out: Path, entries: list[dict], stats_path, cfg) -> dict | None:
    """Compute every layer's static activation scales from the statistics' sample tokens and the
    written transforms, and write them as the pack's saved calibration (format.md §10) with the
    config's abits, act_percentile and calib_steps; returns the manifest's `calibration` object
    (None when activations are not quantized or the file holds no sample tokens)."""
    from duquant_runtime.calibration import _write_scales
    from duquant_runtime.format import CALIBRATION_DIR
    from duquant_runtime.pack import read_layer

    if not cfg.abits:
        return None
    layers, keys = [], []
    for e in entries:
        st = read_layer_stats(stats_path, e["name"], e["in_features"])
        if st.sample.shape[0] == 0:
            return None
        lp = read_layer(out, e)
        scale = offline_act_scale(st.sample, lp.smooth, lp.perm, lp.r_in, cfg.act_percentile, cfg.abits)
        layers.append((e["name"], SimpleNamespace(act_scale=scale)))
        keys.append(e["layer_key"])
    cal_dir = out / CALIBRATION_DIR
    cal_dir.mkdir(exist_ok=True)
    settings = {"abits": cfg.abits, "act_percentile": cfg.act_percentile, "calib_steps": cfg.calib_steps,
                "act_mode": "static"}
    rel, digest = _write_scales(cal_dir, layers, keys, settings)
    return {"file": rel, "sha256": digest, "layers": len(layers), **settings}


__all__ = ["LayerStats", "check_stats_file", "stats_file_id", "layer_stats_digest", "read_layer_stats", "offline_act_scale",
           "write_offline_calibration"]


def check_stats_file(cfg, path) -> str | None:
    """The statistics path as a string when `cfg.act_stats` is set and the file has that id; else None.
    A missing file, or one with another id, is a BuildError."""
    if cfg.act_stats is None:
        for opt, bad in (("--rotation greedy", cfg.rotation == "greedy"), ("--rounding gptq", cfg.rounding == "gptq")):
            if bad:
                raise BuildError(f"{opt} needs activation statistics (--act-stats stats.h5, from "
                                 "duquant_runtime.collect_stats)")
        if path is not None:
            raise BuildError("an activation statistics file was given but the config has no act_stats "
                             "(resolve the config with act_stats=stats_file_id(path))")
        return None
    if path is None:
        raise BuildError(f"the config needs the activation statistics file {cfg.act_stats[:19]}... (--act-stats)")
    sid = stats_file_id(path)
    if sid != cfg.act_stats:
        raise BuildError(f"{path}: is not the statistics file of the config ({sid[:19]} vs {cfg.act_stats[:19]})")
    with _open(path):
        pass
    return str(path)
