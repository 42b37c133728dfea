"""Scores and heatmaps of two versions of the code, compared on the shared datasets.

A behaviour-preserving change (a refactor) must give the same numbers. ``record`` runs under the old code
(e.g. a git worktree of the old commit on ``PYTHONPATH``): it fits each detector on each dataset, saves the
model file and the predictions on the test split. ``compare`` runs under the new code: it loads the old
model files (they must still load), predicts, fits the detector again, and prints how far image scores,
heatmaps and thresholds moved. Prints a Markdown table and appends it to benchmarks/RESULTS.md.

    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_parity.py record --out /tmp/parity
    python benchmarks/bench_parity.py compare --out /tmp/parity
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_detectors import RESULTS, SHARED, machine  # noqa: E402

DETECTORS = ("patchcore", "padim", "dfm", "ensemble")
DATASETS = ("magnetic_tile", "chest_xray")


def _predictions(detector, samples) -> tuple[np.ndarray, list[np.ndarray]]:
    results = detector.predict([s.path for s in samples])
    return np.array([r.score for r in results]), [r.heatmap for r in results]


def record(out: Path, datasets: list[str], detectors: list[str]) -> None:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector

    out.mkdir(parents=True, exist_ok=True)
    for name in datasets:
        dataset = discover_dataset(SHARED / name)
        for detector_name in detectors:
            detector = create_detector(detector_name, progress=False, device="cpu").fit(dataset.train)
            detector.save(out / f"{name}_{detector_name}.safetensors")
            scores, heatmaps = _predictions(detector, dataset.test)
            np.savez(
                out / f"{name}_{detector_name}.npz",
                scores=scores,
                **{f"heatmap{i}": h.astype(np.float32) for i, h in enumerate(heatmaps)},
            )
            (out / f"{name}_{detector_name}.json").write_text(
                json.dumps(detector.calibration_.to_dict(), indent=2)
            )
            print(f"recorded {name} {detector_name}", flush=True)


def _differences(scores, heatmaps, old_scores, old_heatmaps) -> tuple[float, float]:
    score_rel = float(np.max(np.abs(scores - old_scores) / np.maximum(np.abs(old_scores), 1e-12)))
    heat_rel = max(
        float(np.abs(h - o).max() / max(np.abs(o).max(), 1e-12))
        for h, o in zip(heatmaps, old_heatmaps, strict=True)
    )
    return score_rel, heat_rel


def compare(out: Path, datasets: list[str], detectors: list[str]) -> list[str]:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector, load_detector

    rows = []
    for name in datasets:
        dataset = discover_dataset(SHARED / name)
        for detector_name in detectors:
            stem = out / f"{name}_{detector_name}"
            old = np.load(f"{stem}.npz")
            old_scores = old["scores"]
            old_heatmaps = [old[f"heatmap{i}"] for i in range(len(old_scores))]
            old_calibration = json.loads(Path(f"{stem}.json").read_text())

            loaded = load_detector(Path(f"{stem}.safetensors"), device="cpu")
            loaded_diff = _differences(*_predictions(loaded, dataset.test), old_scores, old_heatmaps)

            refit = create_detector(detector_name, progress=False, device="cpu").fit(dataset.train)
            refit_diff = _differences(*_predictions(refit, dataset.test), old_scores, old_heatmaps)
            new_calibration = refit.calibration_.to_dict()
            threshold_rel = max(
                abs(new_calibration[k] - old_calibration[k]) / max(abs(old_calibration[k]), 1e-12)
                for k in ("image_threshold", "pixel_threshold")
            )
            rows.append(
                f"| {name} | {detector_name} | {len(old_scores)} | {loaded_diff[0]:.1e} | {loaded_diff[1]:.1e} "
                f"| {refit_diff[0]:.1e} | {refit_diff[1]:.1e} | {threshold_rel:.1e} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("record", "compare"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/imaging_ad_parity"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--old", default="2c36f86", help="the old commit, for the record")
    args = parser.parse_args()
    if args.mode == "record":
        record(args.out, args.datasets, args.detectors)
        return
    rows = compare(args.out, args.datasets, args.detectors)
    table = "\n".join(
        [
            "| dataset | detector | test images | old file: max score rel. diff | old file: max heatmap diff / max "
            "| refit: max score rel. diff | refit: max heatmap diff / max | refit: threshold rel. diff |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    command = f"python benchmarks/bench_parity.py compare --datasets {' '.join(args.datasets)}"
    section = (
        f"\n## Parity with {args.old} — {date.today().isoformat()}\n\n"
        f"Machine: {machine()}  \nCommand: `{command}` (after `record` under {args.old})\n\n{table}\n"
    )
    print(section)
    with RESULTS.open("a") as handle:
        handle.write(section)


if __name__ == "__main__":
    main()
