"""What the benchmark scripts share: the shared datasets they run on, an even sample of a split, table
cells, and appending a table to benchmarks/RESULTS.md with the date and the command that made it."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def spaced(items: list, n: int) -> list:
    """``n`` of ``items`` evenly spaced from the first to the last (all of them when there are no more)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def cell(value, spec: str) -> str:
    """A table cell: ``value`` formatted by ``spec``, or ``n/a`` when it was not measured."""
    return "n/a" if value is None else format(value, spec)


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
