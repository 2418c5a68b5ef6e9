"""`enable_duquant_if_configured(model)`: the OPENPI_DUQUANT_* drop-in of the openpi_duquant fork.

    model = PI0Pytorch(config)
    safetensors.torch.load_model(model, f"{ckpt}/model.safetensors")
    report = enable_duquant_if_configured(model)      # None when no OPENPI_DUQUANT_* is set

The variables are read when the function is called (never at import). DuQuant is on when any
OPENPI_DUQUANT_* variable other than PACKDIR is set. Then:

- PACKDIR (default ``./duquant_packed``) holds a pack (``manifest.json``): every variable that is
  set must agree with the pack's config (a disagreement is a `PackError` showing both values),
  and the pack is applied with `apply_pack`;
- PACKDIR holds old per-layer ``*.npz`` files: a `PackError` saying how to convert them;
- otherwise a pack is compiled in-process from the model's own weights with the compiler's code
  (``duquant_pack``, imported here and nowhere else in the runtime), written to PACKDIR, and
  applied; the next run loads it.

Unset variables take the old implementation's defaults, except SCOPE (old: ``policy.dit.``;
here ``''``, every module). DRYRUN=1 checks everything and returns a report whose ``planned``
lists the modules that would be replaced, changing nothing. DEBUG, PROFILE and
PRECACHE_WEIGHTS are accepted and ignored. Errors propagate: the model is never left silently
unquantized or half-quantized.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .apply import ApplyReport, apply_pack
from .errors import DuquantError, PackError
from .format import MANIFEST
from .linear import DuQuantLinear
from .pack import load_pack

PREFIX = "OPENPI_DUQUANT_"
DEFAULT_PACKDIR = "./duquant_packed"
# the old implementation's selection defaults (same text as duquant_pack.config.OLD_INCLUDE/OLD_EXCLUDE)
OLD_INCLUDE = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj).*"
OLD_EXCLUDE = r"(?:^|\.)(norm|ln|layernorm|emb)(?:\.|$)"
ACTION_HEAD = "action_out_proj"  # skipped unless INCLUDE_ACTION_HEAD=1
JOBS_VAR = "DUQUANT_JOBS"  # worker processes of an in-process compile (default 1)

# variable (without prefix) -> pack config field it sets
VAR_FIELDS = {
    "WBITS_DEFAULT": "wbits", "ABITS": "abits", "BLOCK": "block", "BLOCK_OUT": "block_out",
    "PERMUTE": "permute", "ROW_ROT": "row_rot", "LS": "lambda_smooth", "ACT_PCT": "act_percentile",
    "CALIB_STEPS": "calib_steps", "SCOPE": "scope", "INCLUDE": "include", "EXCLUDE": "exclude",
    "LAYERS": "layers", "WBITS": "layer_wbits", "SHARE_INPUTS": "share_inputs",
}
_FIELD_DEFAULTS = {"share_inputs": False}  # config fields a manifest omits at this value
OTHER_VARS = ("PACKDIR", "DRYRUN", "DEBUG", "PROFILE", "INCLUDE_ACTION_HEAD", "PRECACHE_WEIGHTS")
KNOWN_VARS = tuple(VAR_FIELDS) + OTHER_VARS


class EnvConfigError(DuquantError, ValueError):
    """An OPENPI_DUQUANT_* variable is unknown or has a malformed value."""


@dataclass(frozen=True)
class DuquantEnv:
    """The OPENPI_DUQUANT_* settings of one call, parsed and normalised."""

    fields: dict  # pack config fields (all of VAR_FIELDS' values), normalised as in a manifest
    set_vars: dict  # variable name (without prefix) -> raw value, for those present
    packdir: Path
    dry_run: bool
    include_action_head: bool
    jobs: int


def read_env(environ: Mapping[str, str] | None = None) -> DuquantEnv | None:
    """Parse the OPENPI_DUQUANT_* variables of `environ` (default: os.environ, read now).

    None when DuQuant is off (no variable other than PACKDIR is set). Raises `EnvConfigError`
    for an unknown variable or a malformed value.
    """
    env = os.environ if environ is None else environ
    raw = {k[len(PREFIX):]: v for k, v in env.items() if k.startswith(PREFIX)}
    if not any(k != "PACKDIR" for k in raw):
        return None
    unknown = sorted(set(raw) - set(KNOWN_VARS))
    if unknown:
        raise EnvConfigError(f"unknown variable(s) {', '.join(PREFIX + u for u in unknown)}; known: "
                             f"{', '.join(PREFIX + k for k in KNOWN_VARS)}")
    get = raw.get
    wbits = _bits("WBITS_DEFAULT", get("WBITS_DEFAULT"), 4)
    abits = _bits("ABITS", get("ABITS"), 8)
    block = _int("BLOCK", get("BLOCK"), 16, minimum=1)
    block_out = _int("BLOCK_OUT", get("BLOCK_OUT"), None, minimum=1)
    permute = _choice("PERMUTE", get("PERMUTE"), "1", {"1": "zigzag", "0": "none", "zigzag": "zigzag",
                                                        "interleave": "interleave", "none": "none"})
    if get("ROW_ROT", "").strip().lower() == "propagate":
        raise EnvConfigError(f"{PREFIX}ROW_ROT=propagate is refused: the old code rotated the weights in this "
                             "mode without restoring the output (wrong results); use restore or 0")
    row_rot = _choice("ROW_ROT", get("ROW_ROT"), "restore", {"restore": "restore", "0": "disabled",
                                                              "disabled": "disabled"})
    lambda_smooth = _float("LS", get("LS"), 0.15, 0.0, 1.0, low_open=False)
    act_pct = _float("ACT_PCT", get("ACT_PCT"), 99.9, 0.0, 100.0, low_open=True)
    calib_steps = _int("CALIB_STEPS", get("CALIB_STEPS"), 32, minimum=1)
    include = _regex("INCLUDE", get("INCLUDE"), OLD_INCLUDE)
    exclude = _regex("EXCLUDE", get("EXCLUDE"), OLD_EXCLUDE)
    layers = None
    if get("LAYERS") is not None:
        layers = [n.strip() for n in raw["LAYERS"].split(",") if n.strip()] or None
    layer_wbits = _layer_wbits(get("WBITS", ""))
    fields = {
        "wbits": wbits, "abits": abits, "block": block,
        "block_out": (block_out or block) if row_rot == "restore" else None,
        "permute": permute, "row_rot": row_rot, "lambda_smooth": lambda_smooth,
        "act_percentile": act_pct, "calib_steps": calib_steps, "scope": get("SCOPE", ""),
        "include": include, "exclude": exclude, "layers": layers, "layer_wbits": layer_wbits,
        # not in the old fork: one input transform per q/k/v and gate/up group (build --share-inputs)
        "share_inputs": _flag("SHARE_INPUTS", get("SHARE_INPUTS"), False),
    }
    # DEBUG, PROFILE, PRECACHE_WEIGHTS: accepted and ignored (the old code's logging and profiling
    # hooks; DuQuantLinear always precomputes its quantized weight)
    return DuquantEnv(fields=fields, set_vars=raw, packdir=Path(get("PACKDIR") or DEFAULT_PACKDIR),
                      dry_run=_flag("DRYRUN", get("DRYRUN"), False),
                      include_action_head=_flag("INCLUDE_ACTION_HEAD", get("INCLUDE_ACTION_HEAD"), False),
                      jobs=_int(JOBS_VAR, env.get(JOBS_VAR), 1, prefix=""))


def enable_duquant_if_configured(model: nn.Module, *, environ: Mapping[str, str] | None = None
                                 ) -> ApplyReport | None:
    """Apply (or compile, then apply) the DuQuant pack the OPENPI_DUQUANT_* variables describe.

    Returns None, touching nothing, when DuQuant is off; otherwise the `ApplyReport` (with
    ``compiled`` True when the pack was built in this call, ``planned`` filled for DRYRUN=1).
    """
    env = read_env(environ)
    if env is None:
        return None
    already = [n for n, m in model.named_modules() if isinstance(m, DuQuantLinear)]
    if already:
        raise PackError(f"the model already holds {len(already)} DuQuantLinear module(s) ({already[0]}, ...): "
                        "enable_duquant_if_configured was called twice?")
    packdir = env.packdir
    if packdir.exists() and not packdir.is_dir():
        raise PackError(f"{PREFIX}PACKDIR={packdir}: exists and is not a directory")
    if (packdir / MANIFEST).is_file():
        pack = load_pack(packdir)
        _check_agreement(env, pack.config, pack.layer_names, packdir)
        return apply_pack(model, pack, dry_run=env.dry_run)
    legacy = sorted(packdir.glob("*.npz")) if packdir.is_dir() else []
    if legacy:
        raise PackError(f"{PREFIX}PACKDIR={packdir} holds {len(legacy)} legacy openpi_duquant .npz file(s) and no "
                        f"{MANIFEST}; convert them with `duquant-pack import-legacy {packdir} --ckpt CKPT --out PACK` "
                        f"and set {PREFIX}PACKDIR=PACK (or point PACKDIR at an empty directory to compile a new "
                        "pack from the model)")
    return _compile_and_apply(model, env)


# --- agreement between the variables and an existing pack ----------------------------------------

def _check_agreement(env: DuquantEnv, config: dict, layer_names: list[str], packdir: Path) -> None:
    diffs = []
    for var, fld in VAR_FIELDS.items():
        have = config.get(fld, _FIELD_DEFAULTS.get(fld))
        if var in env.set_vars and env.fields[fld] != have:
            diffs.append(f"{PREFIX}{var}={env.set_vars[var]!r} gives {fld}={env.fields[fld]!r}, "
                         f"the pack has {fld}={have!r}")
    if "INCLUDE_ACTION_HEAD" in env.set_vars and not env.include_action_head:
        heads = [n for n in layer_names if ACTION_HEAD in n.split(".")]
        if heads:
            diffs.append(f"{PREFIX}INCLUDE_ACTION_HEAD={env.set_vars['INCLUDE_ACTION_HEAD']!r} excludes "
                         f"{ACTION_HEAD}, the pack has layer {heads[0]!r}")
    if diffs:
        raise PackError(f"{PREFIX}PACKDIR={packdir} holds a pack whose config disagrees with the "
                        f"environment: {'; '.join(diffs)}. Unset those variables to use the pack as built, "
                        "or point PACKDIR at another directory to compile a new pack")


# --- in-process compile ----------------------------------------------------------------------------

def _import_compiler():
    try:
        from duquant_pack.build import build_pack
        from duquant_pack.checkpoint import TensorInfo
        from duquant_pack.config import resolve
        from duquant_pack.errors import ConfigError
        from duquant_pack.safetensors_writer import write_streaming
        from duquant_pack.selection import select_layers
    except ImportError as err:
        raise PackError(f"no pack in {PREFIX}PACKDIR and the DuQuant compiler is not installed ({err}); "
                        "`pip install duquant` provides it (duquant_pack), or build a pack with "
                        "`duquant-pack build` elsewhere and point PACKDIR at it") from None
    return build_pack, TensorInfo, resolve, write_streaming, select_layers, ConfigError


_OPTION_VARS = {"--scope": "SCOPE", "--include": "INCLUDE", "--exclude": "EXCLUDE", "--layers": "LAYERS",
                "--layer-wbits": "WBITS"}
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F32"}
_TORCH_DTYPE = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class _ModelTensors:
    """The model's nn.Linear weights seen as checkpoint tensors ('<module>.weight'), so the
    compiler's own `select_layers` decides the selection (no copy of its rules here)."""

    def __init__(self, linears: dict[str, nn.Linear], tensor_info):
        self.path = Path("<model>")
        self.tensors = {}
        for name, mod in linears.items():
            w = mod.weight
            dtype = _ST_DTYPE.get(w.dtype, str(w.dtype).replace("torch.", ""))
            self.tensors[name + ".weight"] = tensor_info(name + ".weight", dtype, tuple(w.shape), self.path)

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str):
        return self.tensors[name]


def _compile_and_apply(model: nn.Module, env: DuquantEnv) -> ApplyReport:
    build_pack, TensorInfo, resolve, write_streaming, select_layers, ConfigError = _import_compiler()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and (env.include_action_head or ACTION_HEAD not in n.split("."))}
    if not linears:
        raise PackError("the model has no nn.Linear modules to quantize")
    heads = [n for n in env.fields["layers"] or () if ACTION_HEAD in n.split(".")]
    if heads and not env.include_action_head:
        raise EnvConfigError(f"{PREFIX}LAYERS names {heads[0]!r} but the action head is skipped unless "
                             f"{PREFIX}INCLUDE_ACTION_HEAD=1")
    try:
        cfg, _ = resolve(None, **{k: (tuple(v) if k == "layers" and v is not None else v)
                                  for k, v in env.fields.items()})
        selected = select_layers(_ModelTensors(linears, TensorInfo), cfg)
    except ConfigError as err:  # the compiler names its options; name the variables instead
        msg = str(err)
        for opt, var in _OPTION_VARS.items():
            msg = msg.replace(opt, PREFIX + var)
        raise EnvConfigError(f"selecting the model's nn.Linear modules: {msg}") from None
    if env.dry_run:
        return ApplyReport(pack=str(env.packdir), planned=[s.name for s in selected])
    with tempfile.TemporaryDirectory(prefix="duquant-model-") as tmp:
        _write_checkpoint(Path(tmp), [(s.name, linears[s.name].weight, s.dtype) for s in selected],
                          write_streaming)
        build_pack(tmp, env.packdir, cfg, jobs=env.jobs, progress=False)
    report = apply_pack(model, env.packdir)
    report.compiled = True
    return report


def _write_checkpoint(directory: Path, weights: list[tuple[str, torch.Tensor, str]], write_streaming) -> None:
    """Write the selected weights as a safetensors checkpoint, one tensor (row chunk) at a time:
    model.safetensors for one dtype, else one shard per dtype and model.safetensors.index.json."""
    by_dtype: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, w, dtype in weights:
        by_dtype.setdefault(dtype, []).append((name + ".weight", w))
    index = {}
    for dtype, items in sorted(by_dtype.items()):
        fname = "model.safetensors" if len(by_dtype) == 1 else f"model-{dtype.lower()}.safetensors"
        tensors = dict(items)

        def produce(name, shape, tensors=tensors):
            w = tensors[name].detach()
            rows = max(1, (16 << 20) // max(1, shape[1]))
            for i in range(0, shape[0], rows):
                chunk = w[i:i + rows].cpu()
                if chunk.dtype == torch.float64 and not torch.equal(chunk.float().double(), chunk):
                    raise PackError(f"module '{name[:-7]}' has float64 weights that are not exact in float32; "
                                    "cast the model to float32 or bf16 before packing")
                yield chunk
        write_streaming(directory / fname, [(n, tuple(t.shape)) for n, t in items], _TORCH_DTYPE[dtype], produce)
        index.update({n: fname for n, _ in items})
    if len(by_dtype) > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}, sort_keys=True))


# --- value parsing -----------------------------------------------------------------------------------

def _bad(var: str, value: str, what: str, prefix: str = PREFIX) -> EnvConfigError:
    return EnvConfigError(f"{prefix}{var}={value!r}: {what}")


def _int(var: str, value: str | None, default, *, minimum: int | None = None, prefix: str = PREFIX):
    if value is None:
        return default
    try:
        n = int(value.strip())
    except ValueError:
        raise _bad(var, value, "not an integer", prefix) from None
    if minimum is not None and n < minimum:
        raise _bad(var, value, f"must be >= {minimum}", prefix)
    return n


def _bits(var: str, value: str | None, default: int) -> int:
    n = _int(var, value, default)
    if n == 1:
        raise _bad(var, value, "1-bit symmetric quantization is not supported (2..15, or 0/16 for off)")
    return 0 if n <= 0 or n >= 16 else n


def _float(var: str, value: str | None, default: float, lo: float, hi: float, *, low_open: bool) -> float:
    if value is None:
        return default
    try:
        x = float(value.strip())
    except ValueError:
        raise _bad(var, value, "not a number") from None
    if not math.isfinite(x) or x > hi or x < lo or (low_open and x == lo):
        raise _bad(var, value, f"must be in {'(' if low_open else '['}{lo:g}, {hi:g}]")
    return x


def _choice(var: str, value: str | None, default: str, choices: dict) -> str:
    key = (default if value is None else value).strip().lower()
    if key not in choices:
        raise _bad(var, value, f"must be one of {', '.join(choices)}")
    return choices[key]


def _flag(var: str, value: str | None, default: bool) -> bool:
    if value is None:
        return default
    key = value.strip().lower()
    if key in ("1", "true", "yes", "on"):
        return True
    if key in ("0", "false", "no", "off", ""):
        return False
    raise _bad(var, value, "must be 1 or 0")


def _regex(var: str, value: str | None, default: str) -> str:
    if value is None:
        return default
    try:
        re.compile(value)
    except re.error as err:
        raise _bad(var, value, f"invalid regular expression ({err})") from None
    return value


def _layer_wbits(text: str) -> dict:
    """'name:bits,name:bits' -> {name: normalised bits}, sorted by name (as in a manifest)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, bits = item.rpartition(":")
        if not sep or not name.strip():
            raise _bad("WBITS", text, f"'{item}' is not NAME:BITS")
        try:
            n = int(bits.strip())
        except ValueError:
            raise _bad("WBITS", text, f"'{item}': bits '{bits}' is not an integer") from None
        if n == 1:
            raise _bad("WBITS", text, f"'{item}': 1-bit quantization is not supported (2..15, or 0/16 for off)")
        out[name.strip()] = 0 if n <= 0 or n >= 16 else n
    return dict(sorted(out.items()))


__all__ = ["enable_duquant_if_configured", "read_env", "DuquantEnv", "EnvConfigError", "KNOWN_VARS",
           "DEFAULT_PACKDIR"]
