"""What the benchmark scripts share: the shared datasets they run on, and appending a table to
benchmarks/RESULTS.md with the date and the command that made it."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def dataset_names(names: list[str] | None) -> list[str]:
    """``names``, or every dataset folder in ../shared/data."""
    return names or sorted(p.name for p in SHARED.iterdir() if p.is_dir())


def record(title: str, explanation: str, body: str) -> None:
    """Append ``## title — date``, the command line of this run, ``explanation`` and ``body``."""
    command = " ".join(["PYTHONPATH=. python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    with RESULTS.open("a") as handle:
        handle.write(
            f"\n## {title} — {date.today().isoformat()}\n\nCommand: `{command}`. {explanation}\n\n{body}\n"
        )
