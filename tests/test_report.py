"""duquant_pack.report.write_report (PNG / self-contained HTML quality report)."""

from __future__ import annotations

import sys

import pytest

from duquant_pack.errors import DuquantError
from duquant_pack.report import write_report


def test_report_png(built_pack, synth2, tmp_path):
    pytest.importorskip("matplotlib")
    out = write_report(built_pack, synth2, tmp_path / "sub" / "report.png")
    assert out == tmp_path / "sub" / "report.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["report.png"]  # no temporary left


def test_report_html(built_pack, synth2, tmp_path):
    pytest.importorskip("matplotlib")
    text = write_report(built_pack, synth2, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<img" in text and "data:image/png;base64," in text
    assert "language_model" in text and "action_expert" in text
    assert "http://" not in text and "https://" not in text  # self-contained


def test_report_without_matplotlib(built_pack, synth2, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DuquantError, match=r"pip install 'duquant\[report\]'"):
        write_report(built_pack, synth2, tmp_path / "report.png")
    assert not (tmp_path / "report.png").exists()


def test_report_bad_suffix(built_pack, synth2, tmp_path):
    with pytest.raises(DuquantError, match=r"\.png or \.html"):
        write_report(built_pack, synth2, tmp_path / "report.pdf")
