"""The report's privacy section: the attack suite's table for O0 and for the final O, from their suite.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..privacy.suite import suite_rows

SUITES = (("privacy-o0", "O0 (baseline)"), ("privacy", "O (after recovery)"))


def privacy_lines(out: Path) -> list[str]:
    """Markdown for every finished suite of a protocol folder (nothing where no suite has finished)."""
    lines = []
    for stage, label in SUITES:
        path = out / stage / "suite.json"
        if path.exists():
            lines += ["", f"### Attack suite on {label}", ""] + suite_rows(json.loads(path.read_text()))
    if lines:
        lines += ["", "Attacks and references: docs/threat-model.md. The attacks' numbers are lower bounds on what an "
                  "adversary can recover (a stronger attack can only do better); the references bracket them: the mean "
                  "image recovers nothing image-specific, no defence recovers everything."]
    return lines
