"""duquant_runtime/kernels/config_keys.py: the launch-configuration keys that overrides may name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from duquant_runtime.kernels.config_keys import CONFIG_KEYS, check_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import w4a8_cases  # noqa: E402  (the pi0.5 shapes and linked groups the kernel tools run)

SHAPES = sorted({(n, k) for _, _, n, k, _ in w4a8_cases.SHAPES})


def test_unknown_keys_are_named_in_one_line():
    check_config({"BMT": 32, "RS_CONFIG": {"RS_STAGES": 4}, "PICK_M": 64})
    for bad, name in (({"BMTT": 32}, "BMTT"), ({"BMT": 32, "RS_CONFIG": {"STAGES": 4}}, "STAGES"),
                      ({"num_warp": 4}, "num_warp")):
        with pytest.raises(ValueError, match=f"unknown launch-configuration keys \\['{name}'\\]") as exc:
            check_config(bad)
        assert "\n" not in str(exc.value)


def test_every_pick_uses_known_keys():
    pytest.importorskip("triton")
    from duquant_runtime.kernels import w4a8 as K
    used = set()
    for n, k in SHAPES:
        for m in (1, 16, 17, 50, 64, 65, 100, 128, 200, 256, 257, 512, 640, 800, 1024):
            for mode in (K.MODE_DYNAMIC, K.MODE_STATIC):
                cfg = K.pick_config(m, n, k, mode)
                check_config(cfg)
                used |= set(cfg) | set(cfg.get("RS_CONFIG") or {})
    assert {"BN", "BMT", "GEMM", "ACT", "RS_CONFIG", "TAIL_BMT", "XLOAD"} <= used <= CONFIG_KEYS


def test_resolve_config_refuses_unknown_keys():
    pytest.importorskip("triton")
    from duquant_runtime.kernels import w4a8 as K
    with pytest.raises(ValueError, match="BMTT"):
        K.resolve_config(800, 2048, 2048, K.MODE_DYNAMIC, torch.device("cpu"), {"BMTT": 64})
    assert K.resolve_config(800, 2048, 2048, K.MODE_DYNAMIC, torch.device("cpu"), {"BMT": 64})["BMT"] == 64
