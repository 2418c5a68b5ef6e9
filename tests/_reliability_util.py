"""Helpers shared by the reliability, fuzz and security tests (docs/reliability.md).

A small pack that exercises every optional part of the format (partial input and output blocks,
an odd input width, output rotations, unquantized and 3/4/8-bit layers, stored integers), a model
holding the weights of its checkpoint, damage helpers that keep the manifest consistent (so the
check under test fires, not the checksum), and an in-process CLI runner.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import h5py
import torch
from torch import nn

import duquant_pack.cli as cli_mod
from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_runtime import DuQuantLinear
from duquant_runtime.format import file_sha256

from _util import save_ckpt

# layer name -> (out, in, dtype); the pack's (natural name) order
SMALL_LAYERS = {
    "net.a.down_proj": (41, 24, torch.float32),  # 3 bits: stored integers packed, tail output block
    "net.a.q_proj": (24, 41, torch.bfloat16),  # odd input width: partial input block of 9, padding nibble
    "net.b.o_proj": (20, 48, torch.bfloat16),  # 8 bits: stored integers int8
    "net.b.up_proj": (32, 32, torch.float16),  # not quantized: no weight_scale, no qweight
}
SMALL_NAMES = list(SMALL_LAYERS)
SMALL_CFG = dict(include=r"proj$", exclude="", block=16, row_rot="restore", wbits=4, abits=8, calib_steps=2,
                 store_qweights=True, layer_wbits={"net.a.down_proj": 3, "net.b.o_proj": 8, "net.b.up_proj": 16})

# the same configuration as command-line options of `duquant-pack build`
SMALL_CLI = ["--include", "proj$", "--exclude", "", "--block", "16", "--row-rot", "restore", "--wbits", "4",
             "--abits", "8", "--calib-steps", "2", "--store-qweights",
             "--layer-wbits", "net.a.down_proj:3,net.b.o_proj:8,net.b.up_proj:16", "--jobs", "1", "-q"]


def small_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """The small checkpoint's tensors: the four linear weights, two biases and a norm weight."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (out_f, in_f, dtype) in SMALL_LAYERS.items():
        w = torch.randn(out_f, in_f, generator=g)
        w[:, 1] *= 8  # an outlier input channel
        t[name + ".weight"] = w.to(dtype)
    t["net.a.q_proj.bias"] = torch.randn(24, generator=g)
    t["net.b.o_proj.bias"] = torch.randn(20, generator=g)
    t["net.norm.weight"] = torch.ones(24)
    return t


def small_config(**over):
    return resolve(None, **dict(SMALL_CFG, **over))[0]


def build_small_pack(ckpt_dir: Path, out: Path, seed: int = 0, **over) -> Path:
    """Write the small checkpoint to `ckpt_dir` (if absent) and build its pack into `out`."""
    if not (Path(ckpt_dir) / "model.safetensors").is_file():
        save_ckpt(ckpt_dir, small_tensors(seed))
    build_pack(ckpt_dir, out, small_config(**over), jobs=1, progress=False)
    return Path(out)


def model_from_tensors(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree with an nn.Linear for every 2-D '<name>.weight' (bias when present) and an
    nn.LayerNorm for every 1-D weight without a linear, holding exactly these values."""
    root = nn.Module()
    for key, t in tensors.items():
        if not key.endswith(".weight"):
            continue
        name = key[: -len(".weight")]
        *parents, leaf = name.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        bias = tensors.get(name + ".bias")
        if t.dim() == 2:
            lin = nn.Linear(t.shape[1], t.shape[0], bias=bias is not None, dtype=t.dtype)
        else:
            lin = nn.LayerNorm(t.shape[0], dtype=t.dtype)
        with torch.no_grad():
            lin.weight.copy_(t)
            if bias is not None:
                lin.bias.copy_(bias)
        mod.add_module(leaf, lin)
    return root


def snapshot(model: nn.Module):
    """Everything `assert_unchanged` compares: values, dtypes, module types and identities."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: (type(m), id(m)) for n, m in model.named_modules()})


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().reshape(-1).contiguous().view(torch.uint8), b.detach().reshape(-1).contiguous().view(torch.uint8))


def assert_unchanged(model: nn.Module, snap) -> None:
    sd, mods = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    for k in sd:
        assert _same_bits(now[k], sd[k]), k
    assert {n: (type(m), id(m)) for n, m in model.named_modules()} == mods
    assert not any(isinstance(m, DuQuantLinear) for m in model.modules())


def read_manifest(pack: Path) -> dict:
    return json.loads((Path(pack) / "manifest.json").read_text())


def write_manifest(pack: Path, m: dict) -> None:
    (Path(pack) / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def entry(pack: Path, name: str) -> dict:
    return next(e for e in read_manifest(pack)["layers"] if e["name"] == name)


def fix_checksums(pack: Path) -> None:
    """Make the manifest agree with the layer files as they are now (sha256, totals.layer_bytes),
    so that a reader's content checks, not its checksum check, decide."""
    pack = Path(pack)
    m = read_manifest(pack)
    for e in m["layers"]:
        p = pack / e["file"]
        if p.is_file():
            e["sha256"] = file_sha256(p)
    m["totals"]["layer_bytes"] = sum((pack / e["file"]).stat().st_size for e in m["layers"]
                                     if (pack / e["file"]).is_file())
    write_manifest(pack, m)


def rewrite_layer(pack: Path, name: str, mutate) -> Path:
    """Open the layer file of `name` with h5py in r+ mode, call mutate(file), fix the checksums."""
    path = Path(pack) / entry(pack, name)["file"]
    with h5py.File(path, "r+") as f:
        mutate(f)
    fix_checksums(pack)
    return path


def replace_dataset(f: h5py.File, key: str, data) -> None:
    """Delete dataset `key` (when present) and write `data` under that name."""
    if key in f:
        del f[key]
    f.create_dataset(key, data=data)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`duquant-pack ARGV` in-process: (exit code, stdout, stderr), with --debug off."""
    cli_mod._DEBUG = False
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_mod.main(argv)
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, out: str, err: str) -> str:
    """A clean CLI failure: non-zero exit, exactly one 'error: ...' line on stderr, no traceback."""
    assert rc != 0, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "internal error" not in err, err
    assert "Traceback" not in err and "Traceback" not in out
    return lines[0]


def tree_bytes(root) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root` (hidden files included)."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
