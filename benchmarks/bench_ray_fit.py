"""One-machine fit against a fit on a local Ray (two 1-CPU workers), per dataset and detector, in one run.

For each pair: the learned statistics' largest difference (relative to each tensor's largest value; for
PatchCore, whose two-level coreset picks another bank, the banks' sizes and how far the one-machine bank's
rows are from the Ray bank), the calibrated image thresholds, the image AUROC of both models on the
dataset's test split, and both fits' wall times (the Ray fit's share of the cluster's start-up excluded:
one Ray for the whole run).

    python benchmarks/bench_ray_fit.py [--datasets magnetic_tile chest_xray] [--detectors padim dfm patchcore]
        [--workers 2] [--coreset-oversampling 2] [--no-record]
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


def bank_comparison(a, b) -> str:
    """PatchCore: both banks' rows, and the median and 99th percentile of each row of ``a``'s bank's distance
    to the nearest row of ``b``'s, over the median distance of ``a``'s rows to their nearest other row (the
    bank's own spacing): about 1 or less, the Ray bank covers the same patches about as densely."""
    import torch

    def nearest(rows, bank, skip_self=False):
        found = []
        for start in range(0, len(rows), 2048):
            d = torch.cdist(rows[start : start + 2048], bank)
            if skip_self:
                d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = torch.inf
            found.append(d.min(dim=1).values)
        return torch.cat(found)

    x, y = a.memory_bank_.float().cpu(), b.memory_bank_.float().cpu()
    spacing = float(nearest(x, x, skip_self=True).median())
    across = nearest(x, y) / spacing
    return (
        f"bank rows {len(x)} / {len(y)}; one-machine rows to the Ray bank: median {float(across.median()):.2f}, "
        f"p99 {float(across.quantile(0.99)):.2f} (in units of the bank's own spacing)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["magnetic_tile", "chest_xray"])
    parser.add_argument("--detectors", nargs="+", default=["padim", "dfm"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--coreset-oversampling",
        type=float,
        default=None,
        help="PatchCore's coreset_oversampling, for both fits (default: the detector's)",
    )
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
            params = {"progress": False}
            if detector_name == "patchcore" and args.coreset_oversampling is not None:
                params["coreset_oversampling"] = args.coreset_oversampling
            start = time.perf_counter()
            local = create_detector(detector_name, **params).fit(train)
            local_s = time.perf_counter() - start
            start = time.perf_counter()
            remote = fit_on_ray(create_detector(detector_name, **params), train, workers=args.workers)
            ray_s = time.perf_counter() - start
            row = {
                "dataset": name,
                "detector": detector_name,
                "train": len(train),
                "test": len(test),
                "local_s": local_s,
                "ray_s": ray_s,
                "stat_diff": (
                    bank_comparison(local, remote)
                    if detector_name == "patchcore"
                    else f"{largest_difference(local, remote):.1e}"
                ),
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
            f"{r['stat_diff']} | {r['local_threshold']:.5g} / {r['ray_threshold']:.5g} | {r['local_auroc']:.4f} | "
            f"{r['ray_auroc']:.4f} | {abs(r['ray_auroc'] - r['local_auroc']):.4f} |"
            for r in rows
        )
    )
    oversampling = args.coreset_oversampling
    if oversampling is None:
        from imaging_ad.detectors.patchcore import PatchCore

        oversampling = PatchCore().coreset_oversampling
    note = (
        f"Ray: {args.workers} workers of 1 CPU on this machine (one local Ray for the run); local: one "
        "process, torch's default threads. Statistics: the largest absolute difference of any learned tensor "
        "over that tensor's largest value; PatchCore: its banks compared instead (two-level coreset, "
        f"coreset_oversampling {oversampling:g}, the same for the one-machine fit)."
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
