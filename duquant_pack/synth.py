"""Synthetic pi0 / pi0.5 checkpoints with the real key names and realistic outliers.

Key names and shapes come from the layer tables shipped in ``duquant_pack/archs/`` (copies of the
openpi PyTorch state_dict listings). Values, generated deterministically from (seed, key):

- linear weights: Student-t with 4 degrees of freedom, std 0.02; in down_proj / o_proj /
  out_proj / fc2 about 0.5% of the input columns (at least 2) are scaled by 10-50x;
- RMSNorm / LayerNorm weights: around 1 with a few outlier rows at 20-100x;
- biases N(0, 0.01); embeddings, lm_head, conv and everything else N(0, 0.02);
- pi0.5's adaRMS ``dense`` layers (zero in a fresh model) get the linear-weight values.

``layers`` keeps the first N decoder layers of each tower; ``width_div`` divides the hidden, MLP,
head and vocabulary sizes (1, 2, 4 or 8: these keep every head dimension an integer); ``include``
keeps only keys matching a regex (benchmarks use it to write just the layers they pack). The tied
``language_model.embed_tokens`` is omitted, as in a converted checkpoint. Values depend only on
(seed, key), not on which other keys are written.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

import torch

from .errors import ConfigError
from .safetensors_writer import write_streaming

ARCHS = ("pi05", "pi0")
WIDTH_DIVS = (1, 2, 4, 8)
# sizes that scale with --width-div: hidden, MLP, attention (heads x head_dim), adaRMS, vocab
_WIDTHS = {2048, 1024, 16384, 4096, 256, 1152, 4304, 3072, 257152}
_OUTLIER_COL_LAYERS = re.compile(r"(down_proj|o_proj|out_proj|fc2)\.weight$")
_NORM = re.compile(r"(norm|layernorm|layer_norm\d?)\.weight$")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_CHUNK_ELEMS = 1 << 22


def arch_table(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(key, shape)] of an architecture's state_dict, in table order."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch '{arch}' (known: {', '.join(ARCHS)})")
    text = resources.files("duquant_pack").joinpath("archs", arch + ".tsv").read_text()
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        out.append((key, tuple(int(s) for s in shape.strip("[]").split(","))))
    return out


def synth_specs(arch: str, layers: int | None = None, width_div: int = 1,
                include: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Key names and (scaled) shapes that `write_synth` writes (keys matching `include`, re.search)."""
    if width_div not in WIDTH_DIVS:
        raise ConfigError(f"--width-div must be one of {', '.join(map(str, WIDTH_DIVS))}, got {width_div}")
    if layers is not None and layers < 1:
        raise ConfigError(f"--layers must be >= 1, got {layers}")
    try:
        inc = re.compile(include) if include else None
    except re.error as err:
        raise ConfigError(f"--include: invalid regular expression {include!r} ({err})") from None
    specs = []
    for key, shape in arch_table(arch):
        if key.endswith("language_model.embed_tokens.weight") or (inc and not inc.search(key)):
            continue
        m = _LAYER_INDEX.search(key)
        if layers is not None and m and int(m.group(1)) >= layers:
            continue
        specs.append((key, tuple(s // width_div if s in _WIDTHS else s for s in shape)))
    if not specs:
        raise ConfigError(f"--include {include!r} keeps no tensor of {arch}")
    return specs


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _student_t4(shape, gen, std: float) -> torch.Tensor:
    # t_4 = z / sqrt(chi2_4 / 4) with chi2_4 = -2 log(U1 U2); var(t_4) = 2
    z = torch.randn(shape, generator=gen)
    u = torch.rand(shape, generator=gen) * torch.rand(shape, generator=gen)
    chi = (-2.0 * torch.log(u.clamp_min_(1e-30))).div_(4.0).sqrt_()
    return z.div_(chi).mul_(std / 2 ** 0.5)


def _produce(seed: int):
    def produce(key: str, shape: tuple[int, ...]):
        gen = _generator(seed, key)
        if key.endswith(".bias"):
            yield torch.randn(shape, generator=gen) * 0.01
            return
        if len(shape) == 1 and _NORM.search(key):
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            k = max(2, shape[0] // 512)
            idx = torch.randperm(shape[0], generator=gen)[:k]
            v[idx] = 20.0 + 80.0 * torch.rand(k, generator=gen)
            yield v
            return
        linear = (len(shape) == 2 and "embed" not in key and "lm_head" not in key)
        rows = shape[0]
        cols = 1
        for s in shape[1:]:
            cols *= s
        col_scale = None
        if linear and _OUTLIER_COL_LAYERS.search(key):
            k = max(2, cols // 200)
            idx = torch.randperm(cols, generator=gen)[:k]
            col_scale = torch.ones(cols)
            col_scale[idx] = 10.0 + 40.0 * torch.rand(k, generator=gen)
        step = max(1, _CHUNK_ELEMS // cols)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            if linear:
                chunk = _student_t4((n, cols), gen, 0.02)
                if col_scale is not None:
                    chunk.mul_(col_scale)
            else:
                chunk = torch.randn((n, cols), generator=gen).mul_(0.02)
            yield chunk
    return produce


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def write_synth(out_dir, arch: str = "pi05", layers: int | None = None, width_div: int = 1,
                seed: int = 0, dtype: str = "bf16", include: str | None = None) -> Path:
    """Write ``out_dir/model.safetensors``; returns its path. Same arguments, same bytes."""
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
    specs = synth_specs(arch, layers, width_div, include)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    meta = {"format": "pt",
            "duquant_synth": f"arch={arch} layers={layers} width_div={width_div} seed={seed} include={include}"}
    write_streaming(path, specs, _DTYPES[dtype], _produce(seed), meta)
    return path
