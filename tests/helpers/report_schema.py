"""The run report's documented schema (README, "The run report") and the keys a report really has."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# objects whose keys are data (kinds, flags, devices)
OPEN_MAPS = ("errors_by_kind", "finish_reasons", "flags", "storage", "devices", "dtypes", "decode", "attention",
             "compile_fallbacks")


def documented_keys() -> set[str]:
    """The keys of the README's report table (`tasks.<column>.ok` etc. for per-task keys)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### The run report"):]
    section = section[: section.index("\n### ", 1)]
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))


def report_keys(report: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a report, per-task keys under `tasks.<column>.`, open maps as one key each."""
    keys = set()
    for key, value in report.items():
        name = f"{prefix}{key}"
        if prefix == "tasks.":
            name = "tasks.<column>"
        if isinstance(value, dict) and key not in OPEN_MAPS:
            keys |= report_keys(value, f"{name}.")
        else:
            keys.add(name)
    return keys
