"""What the W4 kernel tools run (sweep_w4a8.py, stages_w4a8.py, profile_w4a8.py): the pi0.5
linear shapes and launch-configuration overrides given on the command line. No GPU or Triton
needed to import."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from duquant_runtime.kernels.config_keys import check_config

# (tower, name, N out, K in, M tokens) of one `sample_actions` call
SHAPES = [("llm", "q/o", 2048, 2048, 800), ("llm", "k/v", 256, 2048, 800), ("llm", "gate/up", 16384, 2048, 800),
          ("llm", "down", 2048, 16384, 800),
          ("llm", "q/o", 2048, 2048, 1), ("llm", "k/v", 256, 2048, 1), ("llm", "gate/up", 16384, 2048, 1),
          ("llm", "down", 2048, 16384, 1),
          ("expert", "q", 2048, 1024, 50), ("expert", "k/v", 256, 1024, 50), ("expert", "o", 1024, 2048, 50),
          ("expert", "gate/up", 4096, 1024, 50), ("expert", "down", 1024, 4096, 50),
          # linked input groups of a --share-inputs pack (q/k/v and gate/up rows concatenated)
          ("llm", "qkv", 2560, 2048, 800), ("llm", "gate_up", 32768, 2048, 800), ("llm", "qkv", 2560, 2048, 1),
          ("llm", "gate_up", 32768, 2048, 1), ("expert", "qkv", 2560, 1024, 50), ("expert", "gate_up", 8192, 1024, 50)]


def parse_overrides(text: str) -> dict:
    """{KEY: value} of "KEY=VALUE[,...]" with Python literal values (launch-configuration keys of
    kernels/w4a8.pick_config); ValueError with the offending text when malformed, or naming the
    keys that are not launch-configuration keys (`config_keys.check_config`)."""
    try:
        over = {kv.split("=", 1)[0]: ast.literal_eval(kv.split("=", 1)[1]) for kv in filter(None, text.split(","))}
    except (IndexError, ValueError, SyntaxError):
        raise ValueError(f"expected KEY=VALUE[,...] with Python literal values, got {text!r}") from None
    check_config(over)  # a misspelt key would time the picks under another name
    return over


def shape_keys() -> set[str]:
    """The "tower:name:M" keys of SHAPES (what --only filters take)."""
    return {f"{tower}:{name}:{m}" for tower, name, _, _, m in SHAPES}


def select(only: str) -> list[tuple]:
    """The SHAPES an --only value ("tower:name:M[,...]", empty: all) names, in SHAPES order, then
    other token counts of a known tower:name (e.g. "llm:down:128": language-model down_proj at
    M = 128) in the order given; ValueError naming the unknown ones."""
    keep = list(dict.fromkeys(filter(None, only.split(","))))
    dims = {(tower, name): (n, k) for tower, name, n, k, _ in SHAPES}
    extra, bad = [], []
    for key in keep:
        if key in shape_keys():
            continue
        tower, _, rest = key.partition(":")
        name, _, m = rest.partition(":")
        if (tower, name) in dims and m.isdigit() and int(m) >= 1:
            extra.append((tower, name, *dims[(tower, name)], int(m)))
        else:
            bad.append(key)
    if bad:
        raise ValueError(f"unknown shapes {sorted(bad)}; known: {sorted(shape_keys())} (any M >= 1 for a known "
                         f"tower:name)")
    return [s for s in SHAPES if not keep or f"{s[0]}:{s[1]}:{s[4]}" in keep] + extra


def instances(n: int, k: int, l2_bytes: int) -> int:
    """Layer instances of an (N, K) shape whose bf16 weights together exceed l2_bytes (1..32): a
    timed replay then streams its weights from memory, as a model does."""
    return max(1, min(32, -(-l2_bytes // (n * k * 2))))


def add_common_args(ap: argparse.ArgumentParser, out: str, repeats: int) -> None:
    """The arguments every W4 kernel tool takes: --out (JSON file, default `out`), --repeats
    (timed replays, median taken), --l2-bytes (weight bytes per replay) and --only (SHAPES filter)."""
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--l2-bytes", type=int, default=256 << 20, help="bf16 weight bytes per timed replay")
    ap.add_argument("--only", default="", help="comma-separated tower:name:M filters (w4a8_cases.SHAPES)")


def selected_shapes(ap: argparse.ArgumentParser, only: str) -> list[tuple]:
    """`select(only)`, or the parser's one-line usage error naming the unknown shapes."""
    try:
        return select(only)
    except ValueError as err:
        ap.error(f"--only: {err}")
