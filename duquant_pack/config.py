"""Build configuration: defaults < preset file < command-line options, resolved and validated.

The resolved config is a flat dict recorded in the manifest (and hashed). Bits >= 16 or <= 0 are
normalised to 0 ("not quantized"). `block_out` defaults to `block`; it is recorded as None when
the row rotation is disabled.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources

from .errors import ConfigError
from .layer import LayerSpec

OLD_INCLUDE = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj).*"
OLD_EXCLUDE = r"(?:^|\.)(norm|ln|layernorm|emb)(?:\.|$)"
PERMUTE_CHOICES = ("zigzag", "interleave", "none")
METRIC_CHOICES = ("absmax", "energy")
ROW_ROT_CHOICES = ("restore", "disabled", "propagate")
SCALE_CHOICES = ("mse", "max")
COMPAT_CHOICES = ("openpi-duquant",)
ROTATION_CHOICES = ("svd", "hadamard", "random", "greedy", "none")
ROUNDING_CHOICES = ("rtn", "gptq")
# activation-aware fields (docs/quality.md): omitted from to_dict() at these defaults, so packs built
# before they existed keep their config hash
QUALITY_DEFAULTS = {"rotation": "svd", "rotation_seed": 0, "act_stats": None, "rounding": "rtn", "group_size": None}
# what --compat openpi-duquant allows (the first value is what it sets; an explicit other value is
# an error): permute interleave (the old PERMUTE=1) or none (PERMUTE=0), permute_metric energy
# (what interleave sorts by), scale mse. row_rot becomes
# 'restore' (the old default ROW_ROT=restore) unless given explicitly ('disabled' = ROW_ROT=0).
COMPAT_ALLOWED = {"openpi-duquant": {"permute": ("interleave", "none"), "permute_metric": ("energy",),
                                     "scale": ("mse",)}}


@dataclass(frozen=True)
class BuildConfig:
    """Every option of a build. Field names match the CLI options (with '-' for '_')."""

    scope: str = ""
    include: str = OLD_INCLUDE
    exclude: str = OLD_EXCLUDE
    layers: tuple[str, ...] | None = None
    wbits: int = 4
    abits: int = 8
    layer_wbits: dict = field(default_factory=dict)
    block: int = 64
    block_out: int | None = None
    permute: str = "zigzag"
    permute_metric: str = "absmax"
    row_rot: str = "disabled"
    scale: str = "mse"
    act_percentile: float = 99.9
    calib_steps: int = 32
    lambda_smooth: float | None = None
    compat: str | None = None  # 'openpi-duquant': reproduce the old fork's numerics (algorithm.md §13)
    store_qweights: bool = False  # store the quantized integers of W_t in the pack (format v2 'qweight')
    rotation: str = "svd"  # input rotation: svd (weight principal axes) | hadamard | random | greedy | none
    rotation_seed: int = 0  # seed of the random / non-power-of-two Hadamard blocks
    act_stats: str | None = None  # "sha256:<hex>" of the activation statistics file (--act-stats)
    rounding: str = "rtn"  # rtn | gptq (needs act_stats with X^T X)
    group_size: int | None = None  # weight-scale groups of consecutive columns of W_t (None: per row)
    share_inputs: bool = False  # one input transform per group of sibling layers reading one activation (input_groups.py)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["layer_wbits"] = dict(sorted(self.layer_wbits.items()))
        if d["compat"] is None:
            del d["compat"]  # absent = null: packs built before the field existed keep their hash
        if not d["store_qweights"]:
            del d["store_qweights"]  # absent = false, likewise
        if not d["share_inputs"]:
            del d["share_inputs"]  # absent = false, likewise
        for key, default in QUALITY_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    def layer_spec(self, name: str) -> LayerSpec:
        """The per-layer settings of layer `name`."""
        return LayerSpec(wbits=self.layer_wbits.get(name, self.wbits), block=self.block,
                         block_out=self.block_out, permute=self.permute,
                         permute_metric=self.permute_metric if self.permute == "zigzag" else None,
                         scale=self.scale, compat=self.compat, store_qweights=self.store_qweights,
                         rotation=self.rotation, rotation_seed=self.rotation_seed, rounding=self.rounding,
                         group_size=self.group_size,
                         lambda_smooth=self.lambda_smooth if self.act_stats is not None else None)


FIELD_NAMES = {f.name for f in fields(BuildConfig)}


def normalize_bits(bits: int, what: str) -> int:
    if bits >= 16 or bits <= 0:
        return 0
    if bits == 1:
        raise ConfigError(f"{what}: 1-bit symmetric quantization is not supported (use 2..15, or 0/16 for off)")
    return bits


def parse_layer_wbits(text: str) -> dict:
    """Parse 'name:bits,name:bits' (the OPENPI_DUQUANT_WBITS syntax)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, bits = item.rpartition(":")
        if not sep or not name:
            raise ConfigError(f"--layer-wbits: '{item}' is not NAME:BITS")
        try:
            out[name.strip()] = int(bits)
        except ValueError:
            raise ConfigError(f"--layer-wbits: '{item}': bits '{bits}' is not an integer") from None
    return out


def resolve(preset: str | None = None, **overrides) -> tuple[BuildConfig, dict | None]:
    """Merge defaults, a preset and overrides (None values are ignored); validate. Returns (config, preset)."""
    values: dict = {}
    preset_data = None
    if preset is not None:
        preset_data = load_preset(preset)
        values.update(preset_data["config"])
    explicit = set()
    for key, val in overrides.items():
        if key not in FIELD_NAMES:
            raise ConfigError(f"unknown option '{key}'")
        if val is not None:
            values[key] = val
            explicit.add(key)
    compat = values.get("compat")
    if compat is not None:
        if compat not in COMPAT_CHOICES:
            raise ConfigError(f"--compat: '{compat}' is not one of {', '.join(COMPAT_CHOICES)}")
        for key, allowed in COMPAT_ALLOWED[compat].items():
            if key not in explicit:
                values[key] = allowed[0]  # a preset's value is overridden
            elif values[key] not in allowed:
                raise ConfigError(f"--compat {compat} needs --{key.replace('_', '-')} {' or '.join(allowed)}, "
                                  f"got '{values[key]}'")
        if "row_rot" not in explicit:
            values["row_rot"] = "restore"
    try:
        cfg = BuildConfig(**values)
    except TypeError as err:
        raise ConfigError(f"invalid configuration: {err}") from None
    return validate(cfg), preset_data


def validate(cfg: BuildConfig) -> BuildConfig:
    """Check values and return the normalised config (bits, block_out)."""
    for name in ("include", "exclude"):
        try:
            re.compile(getattr(cfg, name))
        except re.error as err:
            raise ConfigError(f"--{name}: invalid regular expression {getattr(cfg, name)!r} ({err})") from None
    if cfg.block <= 0:
        raise ConfigError(f"--block must be a positive integer, got {cfg.block}")
    if cfg.block_out is not None and cfg.block_out <= 0:
        raise ConfigError(f"--block-out must be a positive integer, got {cfg.block_out}")
    for opt, val, choices in (("--permute", cfg.permute, PERMUTE_CHOICES),
                              ("--permute-metric", cfg.permute_metric, METRIC_CHOICES),
                              ("--row-rot", cfg.row_rot, ROW_ROT_CHOICES),
                              ("--scale", cfg.scale, SCALE_CHOICES)):
        if val not in choices:
            raise ConfigError(f"{opt}: '{val}' is not one of {', '.join(choices)}")
    if cfg.compat is not None:
        if cfg.compat not in COMPAT_CHOICES:
            raise ConfigError(f"--compat: '{cfg.compat}' is not one of {', '.join(COMPAT_CHOICES)}")
        for key, allowed in COMPAT_ALLOWED[cfg.compat].items():
            if getattr(cfg, key) not in allowed:
                raise ConfigError(f"--compat {cfg.compat} needs --{key.replace('_', '-')} {' or '.join(allowed)}, "
                                  f"got '{getattr(cfg, key)}'")
    if cfg.row_rot == "propagate":
        raise ConfigError("--row-rot propagate is not implemented (the old code applied it without restoring "
                          "the output: wrong results); use 'restore' or 'disabled'")
    if not 0 < cfg.act_percentile <= 100:
        raise ConfigError(f"--act-percentile must be in (0, 100], got {cfg.act_percentile}")
    if cfg.calib_steps < 1:
        raise ConfigError(f"--calib-steps must be >= 1, got {cfg.calib_steps}")
    if cfg.lambda_smooth is not None and not 0 <= cfg.lambda_smooth <= 1:
        raise ConfigError(f"--lambda-smooth must be in [0, 1], got {cfg.lambda_smooth}")
    _validate_quality(cfg)
    if cfg.layers is not None and not cfg.layers:
        raise ConfigError("--layers is empty")
    block_out = (cfg.block_out or cfg.block) if cfg.row_rot == "restore" else None
    return replace(
        cfg,
        layers=tuple(cfg.layers) if cfg.layers is not None else None,
        wbits=normalize_bits(int(cfg.wbits), "--wbits"),
        abits=normalize_bits(int(cfg.abits), "--abits"),
        layer_wbits={k: normalize_bits(int(v), f"--layer-wbits {k}") for k, v in cfg.layer_wbits.items()},
        block_out=block_out,
        act_percentile=float(cfg.act_percentile),
        lambda_smooth=float(cfg.lambda_smooth) if cfg.lambda_smooth is not None else None,
        store_qweights=bool(cfg.store_qweights),
        share_inputs=bool(cfg.share_inputs),
    )


def _validate_quality(cfg: BuildConfig) -> None:
    """The activation-aware options (rotation, act_stats, rounding, group_size); one-line ConfigErrors."""
    if cfg.rotation not in ROTATION_CHOICES:
        raise ConfigError(f"--rotation: '{cfg.rotation}' is not one of {', '.join(ROTATION_CHOICES)}")
    if cfg.rounding not in ROUNDING_CHOICES:
        raise ConfigError(f"--rounding: '{cfg.rounding}' is not one of {', '.join(ROUNDING_CHOICES)}")
    if isinstance(cfg.rotation_seed, bool) or not isinstance(cfg.rotation_seed, int) or cfg.rotation_seed < 0:
        raise ConfigError(f"--rotation-seed must be a non-negative integer, got {cfg.rotation_seed!r}")
    if cfg.group_size is not None and (isinstance(cfg.group_size, bool) or not isinstance(cfg.group_size, int)
                                       or cfg.group_size < 1):
        raise ConfigError(f"--group-size must be a positive integer, got {cfg.group_size!r}")
    if cfg.act_stats is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", str(cfg.act_stats)):
        raise ConfigError(f"act_stats must be 'sha256:<64 hex>' (the statistics file's digest), got {cfg.act_stats!r}")
    if cfg.compat is not None and (cfg.rotation != "svd" or cfg.rounding != "rtn" or cfg.act_stats is not None
                                   or cfg.group_size is not None):
        raise ConfigError(f"--compat {cfg.compat} reproduces the old numerics: it cannot be combined with "
                          "--rotation, --act-stats, --rounding or --group-size")


def config_from_dict(d: dict) -> BuildConfig:
    """Rebuild a BuildConfig from a manifest's resolved config."""
    unknown = set(d) - FIELD_NAMES
    if unknown:
        raise ConfigError(f"config has unknown fields {sorted(unknown)}")
    d = dict(d)
    if d.get("layers") is not None:
        d["layers"] = tuple(d["layers"])
    return BuildConfig(**d)


# --- presets -----------------------------------------------------------------------------------

def preset_names() -> list[str]:
    files = resources.files("duquant_pack").joinpath("presets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    """A preset file's content: {name, description, expected_layers, config}."""
    names = preset_names()
    if name not in names:
        import difflib
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.3)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(names)}"
        raise ConfigError(f"unknown preset '{name}'{hint}")
    data = json.loads(resources.files("duquant_pack").joinpath("presets", name + ".json").read_text())
    bad = set(data["config"]) - FIELD_NAMES
    if bad:
        raise ConfigError(f"preset '{name}' has unknown fields {sorted(bad)}")
    return data


def config_hash_of(cfg: BuildConfig) -> str:
    """The hash recorded in the manifest for this resolved config."""
    from duquant_runtime.format import config_hash
    return config_hash(cfg.to_dict())
