r"""Trained detectors side by side with PatchCore on every shared dataset (issue 19).

For each dataset in ../shared/data and each detector, one child process fits on ``train/good`` (timed)
and evaluates on ``test``: image AUROC, and pixel AUROC and AUPRO where masks exist. Prints one table
with a row per dataset (every detector's figures side by side), the mean over the datasets, each
detector's difference from PatchCore's mean, and fit times; appends it to benchmarks/RESULTS.md.
Results go to a JSON-lines file as they come, and a re-run with the same file skips what is there,
so a long run can be resumed.

A default is chosen by the mean over every dataset: ``--variant NAME=DETECTOR:KEY=VALUE[,KEY=VALUE]``
adds a column for a detector with other settings (``NAME`` then goes in ``--detectors`` like a
detector's name), and ``--raw-maps`` adds, for each detector that standardises its map per position
(``position_statistics``), a ``NAME/raw`` column scored from the same fit without that step.

    python benchmarks/bench_trained.py --out /tmp/trained.jsonl \
        [--detectors patchcore reverse_distillation simplenet] [--datasets magnetic_tile ...] \
        [--param simplenet:noise_std=0.5] [--variant pc_os2=patchcore:coreset_oversampling=2] \
        [--raw-maps] [--label NAME] [--record]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_detectors import RESULTS, SHARED, machine  # noqa: E402
from bench_trust import DATASETS  # noqa: E402

DETECTORS = ("patchcore", "reverse_distillation", "simplenet")


def measure_pair(dataset: str, label: str, detector_name: str, params: dict, raw_maps: bool) -> list[dict]:
    """Runs inside the child process: fit, evaluate, report (and with ``raw_maps``, evaluate again
    without the per-position standardisation, when the detector has it)."""
    warnings.simplefilter("ignore")
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.evaluation import evaluate

    data = discover_dataset(SHARED / dataset)
    detector = create_detector(detector_name, progress=False, **params)
    start = time.perf_counter()
    detector.fit(data.train)
    fit_seconds = time.perf_counter() - start
    history = getattr(detector, "history_", None)
    common = {
        "dataset": dataset,
        "params": params,
        "n_train": len(data.train),
        "fit_s": round(fit_seconds, 1),
        "training": None
        if history is None
        else f"{len(history.train_loss)} epochs, best {history.best_epoch + 1}, {history.stopped}",
    }
    rows = [{**common, "detector": label, **_metrics(evaluate(detector, data).report)}]
    if (
        raw_maps
        and getattr(detector, "position_mean_", None) is not None
        and hasattr(detector, "_input_maps")
    ):
        detector.position_mean_ = detector.position_std_ = None
        detector.refresh_head()
        rows.append({**common, "detector": f"{label}/raw", **_metrics(evaluate(detector, data).report)})
    return rows


def _metrics(report: dict) -> dict:
    return {key: report.get(key) for key in ("image_auroc", "pixel_auroc", "aupro")}


def run(args: argparse.Namespace) -> None:
    from imaging_ad.cli import parse_param

    params: dict[str, dict] = defaultdict(dict)
    for text in args.param:
        name, _, setting = text.partition(":")
        key, value = parse_param(setting)
        params[name][key] = value
    variants = {name: (name, params[name]) for name in args.detectors}
    for text in args.variant:
        label, _, spec = text.partition("=")
        name, _, settings = spec.partition(":")
        variants[label] = (name, {**params[name], **dict(parse_param(p) for p in settings.split(",") if p)})
    out = Path(args.out)
    done = {(r["dataset"], r["detector"]) for r in _rows(out)}
    for dataset in args.datasets:
        for label in args.detectors:
            if (dataset, label) in done:
                continue
            name, settings = variants[label]
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "child",
                    dataset,
                    label,
                    name,
                    json.dumps(settings),
                    str(args.raw_maps),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if child.returncode != 0:
                print(f"{dataset} / {label} failed:\n{child.stderr[-2000:]}", file=sys.stderr)
                continue
            for row in json.loads(child.stdout.strip().splitlines()[-1]):
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{dataset:15s} {row['detector']:26s} image {row['image_auroc']:.3f} fit {row['fit_s']:.0f} s",
                    flush=True,
                )
    columns = list(args.detectors)
    if args.raw_maps:
        raw = {r["detector"] for r in _rows(out)}
        columns += [f"{label}/raw" for label in args.detectors if f"{label}/raw" in raw]
    table = _table(_rows(out), columns, args.datasets)
    print(table)
    if args.record:
        command = "python benchmarks/bench_trained.py " + shlex.join(sys.argv[1:])
        with RESULTS.open("a") as f:
            f.write(
                f"\n## Trained detectors beside PatchCore, every shared dataset ({args.label})\n\n"
                f"Date: {date.today()}. Machine: {machine()}. Command: `{command}`\n\n{table}\n"
            )


def _rows(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def _table(rows: list[dict], detectors: list[str], datasets: list[str]) -> str:
    by = {(r["dataset"], r["detector"]): r for r in rows}
    metrics = (("image_auroc", "image"), ("pixel_auroc", "pixel"), ("aupro", "AUPRO"))
    header = "| dataset | " + " | ".join(f"{d} {label}" for d in detectors for _, label in metrics)
    header += " | " + " | ".join(f"{d} fit s" for d in detectors) + " |"
    lines = [header, "|" + "---|" * (1 + len(detectors) * (len(metrics) + 1))]
    for dataset in datasets:
        cells = []
        for d in detectors:
            row = by.get((dataset, d), {})
            cells += [_f(row.get(key)) for key, _ in metrics]
        cells += [_f(by.get((dataset, d), {}).get("fit_s"), 0) for d in detectors]
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    means = {}
    for d in detectors:
        for key, _ in metrics:
            values = [by[(s, d)][key] for s in datasets if (s, d) in by and by[(s, d)].get(key) is not None]
            means[(d, key)] = sum(values) / len(values) if values else None
    lines.append(
        "| **mean** | "
        + " | ".join(_f(means[(d, key)]) for d in detectors for key, _ in metrics)
        + " |" * (len(detectors) + 1)
    )
    reference = detectors[0]
    lines.append(
        f"| **minus {reference}** | "
        + " | ".join(
            _f(None if means[(d, k)] is None else means[(d, k)] - means[(reference, k)], signed=True)
            for d in detectors
            for k, _ in metrics
        )
        + " |" * (len(detectors) + 1)
    )
    trainings = [f"{r['dataset']}/{r['detector']}: {r['training']}" for r in rows if r.get("training")]
    return "\n".join(lines) + ("\n\nTraining: " + "; ".join(trainings) if trainings else "")


def _f(value, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        dataset, label, name, params, raw_maps = sys.argv[2:7]
        print(json.dumps(measure_pair(dataset, label, name, json.loads(params), raw_maps == "True")))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON-lines file of results (resumable)")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), help="the first is the reference")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--param", action="append", default=[], help="DETECTOR:KEY=VALUE, repeatable")
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME=DETECTOR:KEY=VALUE[,KEY=VALUE], repeatable"
    )
    parser.add_argument(
        "--raw-maps", action="store_true", help="also score without per-position standardisation"
    )
    parser.add_argument("--label", default="defaults")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
