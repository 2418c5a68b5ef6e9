"""Writing a benchmark's JSON results (every benchmark's --out)."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: Path, report: dict, **dumps) -> str:
    """Write `report` as JSON (indent 2 unless given; other json.dumps options pass through) with a
    trailing newline to `path`, creating its directory; returns the text."""
    dumps.setdefault("indent", 2)
    text = json.dumps(report, **dumps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text
