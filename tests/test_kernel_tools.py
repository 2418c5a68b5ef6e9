"""The kernel development tools in benchmarks/ that run without a GPU: the shapes, instance
counts and command-line overrides they share (w4a8_cases.py), profile_w4a8.py's argument checks
and launch grouping, probe_act.py's refusal without a GPU. (Their GPU runs are what
docs/benchmarks.md reports; compile_w4a8.py is tested in test_kernels.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_w4a8  # noqa: E402
import w4a8_cases  # noqa: E402


def test_overrides_parse_python_literals():
    assert w4a8_cases.parse_overrides("PDL=False,BMT=32,XLOAD='gather'") == {"PDL": False, "BMT": 32,
                                                                               "XLOAD": "gather"}
    assert w4a8_cases.parse_overrides("") == {}
    for bad in ("PDL", "BMT=3 2", "XLOAD=gather"):  # no value, not a literal, a bare name
        with pytest.raises(ValueError, match="KEY=VALUE"):
            w4a8_cases.parse_overrides(bad)
    with pytest.raises(ValueError, match=r"unknown launch-configuration keys \['BMTT'\]"):  # would time the picks
        w4a8_cases.parse_overrides("BMTT=32,PICK_M=64")


def test_shapes_are_the_pi05_linears():
    keys = w4a8_cases.shape_keys()
    assert len(keys) == len(w4a8_cases.SHAPES)  # one entry per (tower, name, M)
    assert {"llm:down:800", "expert:down:50", "llm:gate_up:1", "expert:qkv:50"} <= keys
    down = [s for s in w4a8_cases.SHAPES if s[:2] == ("llm", "down")]
    assert {(n, k) for _, _, n, k, _ in down} == {(2048, 16384)}


def test_only_selects_shapes_and_names_unknown_ones():
    assert w4a8_cases.select("") == w4a8_cases.SHAPES
    assert w4a8_cases.select("llm:down:800,expert:o:50") == [("llm", "down", 2048, 16384, 800),
                                                              ("expert", "o", 1024, 2048, 50)]
    # other token counts of a known tower:name: its N and K, after the SHAPES entries
    assert w4a8_cases.select("llm:down:128,llm:gate/up:800,llm:down:7") == [
        ("llm", "gate/up", 16384, 2048, 800), ("llm", "down", 2048, 16384, 128), ("llm", "down", 2048, 16384, 7)]
    for bad in ("llm:nope:7", "llm:down:0", "llm:down:x", "gpu:down:8", "llm:down"):
        with pytest.raises(ValueError, match=rf"unknown shapes \['{bad}'\]"):
            w4a8_cases.select(f"llm:down:800,{bad}")


def test_instances_exceed_the_l2_budget_within_1_to_32():
    assert w4a8_cases.instances(2048, 16384, 256 << 20) == 4  # 64 MiB of bf16 each
    assert w4a8_cases.instances(256, 1024, 256 << 20) == 32  # capped
    assert w4a8_cases.instances(32768, 16384, 256 << 20) == 1  # one instance is enough


@pytest.mark.parametrize("argv, message", [(["--config", "PDL"], "--config: expected KEY=VALUE"),
                                           (["--only", "llm:nope:3"], "--only: unknown shapes ['llm:nope:3']")])
def test_profile_refuses_bad_arguments_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        profile_w4a8.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_profile_without_cuda_says_so(capsys):
    assert profile_w4a8.main(["--only", "llm:down:800"]) == 2
    assert capsys.readouterr().err.strip() == "profile_w4a8: needs a CUDA GPU"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_activation_probe_without_cuda_says_so(capsys):
    pytest.importorskip("triton.experimental.gluon")
    import probe_act
    assert probe_act.main([]) == 2
    assert capsys.readouterr().err.strip() == "probe_act: needs a CUDA GPU (sm_90, Gluon)"


def test_launches_group_by_position_across_layers():
    times = [("_prep_kernel", 3.0), ("_quant_kernel", 2.0), ("_gemm_kernel", 5.0),
             ("_prep_kernel", 4.0), ("_quant_kernel", 2.5), ("_gemm_kernel", 7.0),
             ("_prep_kernel", 3.5), ("_quant_kernel", 2.2), ("_gemm_kernel", 6.0)]
    got = profile_w4a8.per_launch(times, 3)
    assert [g["kernel"] for g in got] == ["_prep_kernel", "_quant_kernel", "_gemm_kernel"]
    assert [g["median_us"] for g in got] == [3.5, 2.2, 6.0]
    assert (got[2]["min_us"], got[2]["max_us"]) == (5.0, 7.0)
    with pytest.raises(ValueError, match="do not split into 2"):
        profile_w4a8.per_launch(times, 2)
    swapped = times[:3] + [times[4], times[3]] + times[5:]  # layers that launch different kernels
    with pytest.raises(ValueError, match="launch 0 differs"):
        profile_w4a8.per_launch(swapped, 3)


def test_msweep_parses_token_counts_and_names_bad_ones():
    import msweep_gpu
    assert msweep_gpu.parse_ms("64, 1,800,64") == [1, 64, 800]
    for bad in ("0", "x", "1,-2", "70000", ""):
        with pytest.raises(ValueError, match="token count"):
            msweep_gpu.parse_ms(bad)


def test_msweep_summary_lists_rows_over_bf16_worst_first():
    import msweep_gpu
    rows = [{"tower": "llm", "layer": "down_proj", "M": m, "ratio": r}
            for m, r in ((1, 0.8), (65, 1.3), (128, 1.1), (800, 1.0))]
    assert [r["M"] for r in msweep_gpu.over_bf16(rows)] == [65, 128]  # 1.0 is not over
    assert msweep_gpu.worst_per_layer(rows) == {"llm:down_proj": {"M": 65, "ratio": 1.3}}


def test_msweep_takes_every_layer_and_input_group():
    import msweep_gpu
    import runtime_gpu
    known = msweep_gpu.known_layers()
    assert {n for n, _, _ in runtime_gpu.LLM + runtime_gpu.EXPERT} | {"gate_up_group", "qkv_group"} == set(known)
    assert set(msweep_gpu.LAYERS.split(",")) == {"gate_proj", "up_proj", "down_proj", "gate_up_group"}
    assert set(msweep_gpu.GROUPS["qkv_group"]) <= set(known) and set(msweep_gpu.PRODUCERS) <= set(known)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_msweep_without_cuda_says_so(capsys):
    import msweep_gpu
    assert msweep_gpu.main(["--llm-ms", "1", "--expert-ms", ""]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_msweep_refuses_bad_arguments_with_one_line(capsys):
    import msweep_gpu
    for argv, message in ((["--llm-ms", "1,x"], "token counts"), (["--layers", "lm_head"], "--layers: unknown")):
        with pytest.raises(SystemExit) as exc:
            msweep_gpu.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_sweep_ab_alternative_takes_the_picks_of_another_token_count():
    pytest.importorskip("triton")
    import sweep_w4a8
    from duquant_runtime.kernels import w4a8 as K
    dev, dyn = torch.device("cpu"), K.MODE_DYNAMIC
    n, k = 1024, 2048  # the action expert's o_proj: the cluster activation launch above 64 tokens, not at 64
    picked = sweep_w4a8.ab_config(200, n, k, dyn, dev, {})
    assert picked == K.resolve_config(200, n, k, dyn, dev) and picked["ACT"] == "cluster"
    alt = {"PICK_M": 64, "BMT": 64}
    as64 = sweep_w4a8.ab_config(200, n, k, dyn, dev, alt)
    assert alt == {"PICK_M": 64, "BMT": 64}  # the parsed alternative is left as it was
    want = {**K.resolve_config(64, n, k, dyn, dev), "BMT": 64}
    assert {key: v for key, v in as64.items() if key != "PICK_M"} == want and "ACT" not in want
    # what the launch resolves from it at M = 200: the same, without the 200-token picks merged back in
    assert K.resolve_config(200, n, k, dyn, dev, as64) == want
    assert "ACT" in K.resolve_config(200, n, k, dyn, dev, want)  # (a plain override dict would merge them)


def test_library_probe_parses_libraries_and_names_unknown_ones():
    import library_gemm
    assert library_gemm.parse_libs("gemlite, torchao") == ("torchao", "gemlite")  # LIBS order
    assert library_gemm.parse_libs("") == ()
    with pytest.raises(ValueError, match=r"unknown \['marlin'\]"):
        library_gemm.parse_libs("gemlite,marlin")


def test_library_probe_reports_a_missing_library_as_a_reason(monkeypatch):
    import library_gemm
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    monkeypatch.setitem(sys.modules, "gemlite", None)
    for probe in (library_gemm._torchao_op, library_gemm._gemlite):
        found, why = probe()
        assert found is None and why.split(":")[0] in ("ImportError", "ModuleNotFoundError") and "\n" not in why


def test_library_probe_refuses_bad_arguments_with_one_line(capsys):
    import library_gemm
    for argv, message in ((["--libs", "marlin"], "--libs: unknown"), (["--only", "llm:lm_head:8"], "--only")):
        with pytest.raises(SystemExit) as exc:
            library_gemm.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_library_probe_without_cuda_says_so(capsys):
    import library_gemm
    with pytest.raises(SystemExit) as exc:
        library_gemm.main(["--only", "expert:down:50", "--libs", ""])
    assert exc.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
