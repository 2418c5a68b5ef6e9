"""Session fixtures: one tiny synthetic pi0.5 checkpoint (2 layers per tower, widths / 8) and one pack
built from it with the pi05-llm-expert preset. Tests that modify a pack work on a copy."""

from __future__ import annotations

import shutil

import pytest

from duquant_pack.build import build_pack
from duquant_pack.config import resolve
from duquant_pack.synth import write_synth

PRESET = "pi05-llm-expert"


@pytest.fixture(scope="session")
def synth2(tmp_path_factory):
    """Directory holding model.safetensors of a synthetic pi0.5 with 2 layers per tower, widths / 8."""
    d = tmp_path_factory.mktemp("synth2")
    write_synth(d, "pi05", layers=2, width_div=8)
    return d


@pytest.fixture(scope="session")
def built_pack(synth2, tmp_path_factory):
    """A pack of `synth2` with the pi05-llm-expert preset (28 layers), built with one job. Read-only."""
    cfg, _ = resolve(PRESET)
    out = tmp_path_factory.mktemp("packs") / "llm-expert"
    build_pack(synth2, out, cfg, preset=PRESET, jobs=1, progress=False)
    return out


@pytest.fixture
def pack_copy(built_pack, tmp_path):
    """A private copy of `built_pack` that a test may damage."""
    dst = tmp_path / "pack"
    shutil.copytree(built_pack, dst)
    return dst
