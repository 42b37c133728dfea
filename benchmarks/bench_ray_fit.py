"""One-machine fit against a fit on a local Ray (two 1-CPU workers), per dataset and detector, in one run.

For each pair: the learned statistics' largest difference (relative to each tensor's largest value),
the calibrated image thresholds, the image AUROC of both models on the dataset's test split, and both
fits' wall times (the Ray fit's share of the cluster's start-up excluded: one Ray for the whole run).

    python benchmarks/bench_ray_fit.py [--datasets magnetic_tile chest_xray] [--detectors padim dfm]
        [--workers 2] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_detectors import RESULTS, SHARED, machine  # noqa: E402


def auroc(detector, test) -> float:
    from sklearn.metrics import roc_auc_score

    scores = [r.score for r in detector.predict([s.path for s in test])]
    return float(roc_auc_score([s.label for s in test], scores))


def largest_difference(a, b) -> float:
    worst = 0.0
    for key, value in a._state().items():
        if value.is_floating_point():
            scale = float(value.double().abs().max()) or 1.0
            worst = max(worst, float((b._state()[key].double() - value.double()).abs().max()) / scale)
        elif not bool((b._state()[key] == value).all()):
            worst = float("inf")
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["magnetic_tile", "chest_xray"])
    parser.add_argument("--detectors", nargs="+", default=["padim", "dfm"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import ray

    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.detectors.ray_fit import fit_on_ray
    from imaging_ad.scan.ray_engine import LOCAL_RAY_OPTIONS

    ray.init(num_cpus=args.workers, log_to_driver=False, **LOCAL_RAY_OPTIONS)
    rows = []
    for name in args.datasets:
        dataset = discover_dataset(SHARED / name)
        train, test = dataset.train, dataset.test
        for detector_name in args.detectors:
            start = time.perf_counter()
            local = create_detector(detector_name, progress=False).fit(train)
            local_s = time.perf_counter() - start
            start = time.perf_counter()
            remote = fit_on_ray(create_detector(detector_name, progress=False), train, workers=args.workers)
            ray_s = time.perf_counter() - start
            row = {
                "dataset": name,
                "detector": detector_name,
                "train": len(train),
                "test": len(test),
                "local_s": local_s,
                "ray_s": ray_s,
                "stat_diff": largest_difference(local, remote),
                "local_threshold": local.calibration_.image_threshold,
                "ray_threshold": remote.calibration_.image_threshold,
                "local_auroc": auroc(local, test),
                "ray_auroc": auroc(remote, test),
            }
            rows.append(row)
            print(row, flush=True)
    ray.shutdown()
    table = (
        "| dataset | detector | train | test | fit s local | fit s Ray | largest stat difference (rel.) | "
        "image threshold local / Ray | image AUROC local | image AUROC Ray | AUROC difference |\n"
        + "|---" * 11
        + "|\n"
        + "\n".join(
            f"| {r['dataset']} | {r['detector']} | {r['train']} | {r['test']} | {r['local_s']:.0f} | {r['ray_s']:.0f} | "
            f"{r['stat_diff']:.1e} | {r['local_threshold']:.5g} / {r['ray_threshold']:.5g} | {r['local_auroc']:.4f} | "
            f"{r['ray_auroc']:.4f} | {abs(r['ray_auroc'] - r['local_auroc']):.4f} |"
            for r in rows
        )
    )
    note = (
        f"Ray: {args.workers} workers of 1 CPU on this machine (one local Ray for the run); local: one "
        "process, torch's default threads. Statistics: the largest absolute difference of any learned tensor "
        "over that tensor's largest value."
    )
    print("\n" + table + "\n\n" + note)
    if not args.no_record:
        command = "python benchmarks/bench_ray_fit.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a") as handle:
            handle.write(
                f"\n## Fit on Ray vs one machine (issue 20) — {date.today().isoformat()}\n\nMachine: {machine()}  \n"
                f"Command: `{command.strip()}`\n\n{table}\n\n{note}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
