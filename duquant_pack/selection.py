"""Which checkpoint tensors become DuQuant layers (the OPENPI_DUQUANT_* selection semantics).

A layer name is a checkpoint key minus ``.weight`` (the runtime module name). A name is selected
when it starts with `scope` and, unless `layers` (an exact whitelist) is given, matches `include`
(``re.search``) and does not match `exclude` (an empty exclude excludes nothing). Selected
tensors must be 2-D float weights. Per-layer bits come from `layer_wbits`, else `wbits`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .checkpoint import Checkpoint, FLOAT_DTYPES, natural_key
from .config import BuildConfig
from .errors import ConfigError


@dataclass(frozen=True)
class SelectedLayer:
    name: str  # module name
    key: str  # checkpoint tensor name
    out_features: int
    in_features: int
    dtype: str
    wbits: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def _nearest(word: str, names: list[str], n: int = 3) -> str:
    near = difflib.get_close_matches(word, names, n=n, cutoff=0.0)
    return ", ".join(near) if near else "(none)"


def _nearest_for_pattern(pattern: str, names: list[str], n: int = 3) -> str:
    """Names whose dotted components look like the literal words of a regex (e.g. 'q_prjo' -> q_proj)."""
    words = [w for w in re.split(r"[^A-Za-z0-9_]+", pattern) if len(w) > 1]
    comps: dict[str, str] = {}
    for name in names:
        for c in name.split("."):
            comps.setdefault(c, name)
    found: list[str] = []
    for w in words:
        for c in difflib.get_close_matches(w, list(comps), n=n, cutoff=0.6):
            if comps[c] not in found:
                found.append(comps[c])
    return ", ".join(found[:n]) if found else _nearest(pattern, names, n)


def select_layers(ckpt: Checkpoint, cfg: BuildConfig) -> list[SelectedLayer]:
    """The selected layers in natural name order; raises ConfigError when the selection is unusable."""
    names = sorted((k[: -len(".weight")] for k in ckpt.names() if k.endswith(".weight")), key=natural_key)
    if not names:
        raise ConfigError(f"{ckpt.path}: no '*.weight' tensors in the checkpoint")
    scoped = [n for n in names if n.startswith(cfg.scope)]
    if not scoped:
        raise ConfigError(f"--scope '{cfg.scope}' matches no layer name; nearest names: "
                          f"{_nearest(cfg.scope, [n[: len(cfg.scope)] for n in names])}")
    if cfg.layers is not None:
        known = set(scoped)
        for name in cfg.layers:
            if name not in known:
                raise ConfigError(f"--layers: no layer '{name}' (under scope '{cfg.scope}'); "
                                  f"nearest: {_nearest(name, scoped)}")
        wanted = set(cfg.layers)
        chosen = [n for n in scoped if n in wanted]
    else:
        inc = re.compile(cfg.include)
        exc = re.compile(cfg.exclude) if cfg.exclude else None
        chosen = [n for n in scoped if inc.search(n) and not (exc and exc.search(n))]
        if not chosen:
            raise ConfigError(f"no layer matches --include {cfg.include!r} (scope '{cfg.scope}', "
                              f"exclude {cfg.exclude!r}); nearest names: {_nearest_for_pattern(cfg.include, scoped)}")
    chosen_set = set(chosen)
    for name in cfg.layer_wbits:
        if name not in chosen_set:
            raise ConfigError(f"--layer-wbits: '{name}' is not a selected layer; nearest: {_nearest(name, chosen)}")
    out = []
    for name in chosen:
        info = ckpt.info(name + ".weight")
        if len(info.shape) != 2:
            raise ConfigError(f"selected tensor '{info.name}' has shape {list(info.shape)}: not a 2-D linear "
                              f"weight; narrow --include or add --exclude")
        if info.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"selected tensor '{info.name}' has dtype {info.dtype}; only "
                              f"{', '.join(FLOAT_DTYPES)} weights can be packed")
        if 0 in info.shape:
            raise ConfigError(f"selected tensor '{info.name}' is empty (shape {list(info.shape)})")
        out.append(SelectedLayer(name=name, key=info.name, out_features=info.shape[0],
                                 in_features=info.shape[1], dtype=info.dtype,
                                 wbits=cfg.layer_wbits.get(name, cfg.wbits)))
    return out
