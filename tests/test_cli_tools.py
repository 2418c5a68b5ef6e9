"""The pack tools through the CLI: inspect, verify, diff, report (exit codes, output shape)."""

import json
from pathlib import Path

import pytest

import duquant_pack.cli as cli_mod
from duquant_pack.cli import main


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setattr(cli_mod, "_DEBUG", False)


def _run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _layer_files(pack: Path):
    return sorted(p for p in (pack / "layers").iterdir() if not p.name.startswith("."))


def test_inspect_json_and_table(built_pack, capsys):
    rc, out, _ = _run(capsys, ["inspect", str(built_pack), "--json"])
    assert rc == 0
    info = json.loads(out)
    assert info["layers"] == 28 and info["groups"]["language_model"]["layers"] == 14
    assert info["bytes"]["total"] == sum(p.stat().st_size for p in _layer_files(built_pack)) + \
        (built_pack / "manifest.json").stat().st_size
    rc, out, _ = _run(capsys, ["inspect", str(built_pack)])
    assert rc == 0 and info["config_hash"] in out


def test_verify_exit_codes(pack_copy, synth2, capsys):
    rc, out, _ = _run(capsys, ["verify", str(pack_copy), "--ckpt", str(synth2)])
    assert rc == 0 and out.startswith("ok:")
    victim = _layer_files(pack_copy)[3]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    (_layer_files(pack_copy)[5]).unlink()
    rc, out, err = _run(capsys, ["verify", str(pack_copy)])
    lines = out.strip().splitlines()
    assert rc == 1 and len(lines) == 2 and "Traceback" not in err
    assert any("checksum" in line for line in lines) and any("missing" in line for line in lines)
    rc, out, _ = _run(capsys, ["verify", str(pack_copy), "--json"])
    summary = json.loads(out)
    assert rc == 1 and summary["ok"] is False and len(summary["problems"]) == 2


def test_diff_leads_with_verdict(built_pack, synth2, tmp_path, capsys):
    other = tmp_path / "b32"
    rc, _, _ = _run(capsys, ["build", str(synth2), "--preset", "pi05-llm-expert", "--block", "32",
                             "--out", str(other), "--jobs", "1", "--quiet"])
    assert rc == 0
    rc, out, _ = _run(capsys, ["diff", str(built_pack), str(other), "--ckpt", str(synth2)])
    assert rc == 0 and out.startswith("VERDICT:")
    assert "block: 64 -> 32" in out and len(out.splitlines()) <= 40
    rc, out, _ = _run(capsys, ["diff", str(built_pack), str(other), "--json"])
    d = json.loads(out)
    assert d["config_diff"]["block"] == [64, 32] and len(d["layers"]) == 28


def test_report_png(built_pack, synth2, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "r.png"
    rc, out, _ = _run(capsys, ["report", str(built_pack), "--ckpt", str(synth2), "--out", str(out_png)])
    assert rc == 0 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tools_on_missing_pack_one_line_error(tmp_path, capsys):
    for argv in (["inspect", str(tmp_path / "nope")], ["diff", str(tmp_path / "a"), str(tmp_path / "b")]):
        rc, out, err = _run(capsys, argv)
        assert rc == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_import_legacy_refuses_pickled_npz(synth2, tmp_path, capsys):
    import numpy as np
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    name = "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj"
    np.savez(legacy / f"{name}.npz", meta=np.array([{"evil": 1}], dtype=object))  # needs pickle to load
    out = tmp_path / "pack"
    rc, _, err = _run(capsys, ["import-legacy", str(legacy), "--ckpt", str(synth2), "--out", str(out)])
    assert rc == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert name in err and not out.exists()
