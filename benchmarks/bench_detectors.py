"""Accuracy, fit time, predict throughput and peak memory of every detector on every shared dataset.

Each (dataset, detector) pair runs in its own process so peak RSS is that pair's alone. Next to the
detector's predict throughput it reports the backbone-only forward throughput, measured in the same
process on the same preprocessed images with the same truncated backbone, alternating with predict
chunk by chunk (64 images) so that the machine's speed drifting does not tilt the ratio: that ratio
is what we optimise. Fit time is compared with feature extraction timed right before and after it
(``--fit-repeats N``: N such triples, the one of median ratio reported).
Prints a Markdown table and appends it to benchmarks/RESULTS.md.

    python benchmarks/bench_detectors.py [--datasets magnetic_tile chest_xray] [--detectors patchcore padim dfm]
        [--param feature_ae:max_train_minutes=4] [--accuracy-only]

``--accuracy-only`` skips the extraction and throughput passes (fit time is still measured): on a busy
shared machine they cost more than the fit of a small dataset and say nothing about accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def run_pair(dataset_dir: str, detector_name: str, params: dict, accuracy_only: bool = False) -> dict:
    """Runs inside the child process."""
    import torch

    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.evaluation import evaluate

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    dataset = discover_dataset(dataset_dir)
    detector = create_detector(detector_name, progress=False, **params)
    # CPU speed drifts on a shared machine: time the extraction pass right before and right after
    # fitting, and interleave backbone-only and predict chunk by chunk, so each ratio compares like
    # with like
    # with repeats, the (fit, extraction) pair of median ratio is reported: one fit can land in a slow
    # spell of the machine that the extraction passes around it miss
    timings = []
    for _ in range(max(1, int(os.environ.get("BENCH_FIT_REPEATS", "1")))):
        detector._setup()
        extract_before = None if accuracy_only else extraction_time(detector, dataset.train)
        start = time.perf_counter()
        detector.fit(dataset.train)
        fit_seconds = time.perf_counter() - start
        if accuracy_only:
            timings.append((fit_seconds, None))
        else:
            timings.append((fit_seconds, (extract_before + extraction_time(detector, dataset.train)) / 2))
    timings.sort(key=lambda pair: pair[0] / pair[1] if pair[1] else pair[0])
    fit_seconds, extract_seconds = timings[len(timings) // 2]
    evaluation = evaluate(detector, dataset)
    predict_ips, backbone_ips, read_backbone_ips = (
        (None, None, None) if accuracy_only else paired_throughput(detector, dataset.test)
    )
    report = evaluation.report
    history = getattr(detector, "history_", None)
    training = (
        f"{len(history.train_loss)} epochs, best {history.best_epoch + 1}, {history.stopped}, {history.seconds:.0f} s"
        if history is not None
        else "-"
    )
    return {
        "training": training,
        "dataset": Path(dataset_dir).name,
        "detector": detector_name,
        "params": params,
        "n_train": len(dataset.train),
        "n_test": len(dataset.test),
        "image_auroc": report["image_auroc"],
        "pixel_auroc": report["pixel_auroc"],
        "aupro": report["aupro"],
        "f1_max": report["f1_max"],
        "fit_s": fit_seconds,
        "extract_s": extract_seconds,
        "fit_ratios": [round(f / e, 3) for f, e in timings if e],
        "predict_ips": predict_ips,
        "backbone_ips": backbone_ips,
        "read_backbone_ips": read_backbone_ips,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def extraction_time(detector, samples) -> float:
    """Seconds to read, preprocess and run the backbone over ``samples``: the floor for fit time."""
    start = time.perf_counter()
    for _ in detector.extracted_batches(list(samples), desc="extract"):
        pass
    return time.perf_counter() - start


def paired_throughput(detector, samples, chunk: int = 64, batch_size: int = 16) -> tuple[float, float, float]:
    """(predict, backbone-only, read+backbone) images/s, measured chunk by chunk in turn on the same
    images so that a drift of the machine's speed hits all three alike. Predict reads the files and
    returns heatmaps at original size; backbone-only runs the detector's own (truncated) backbone on
    tensors preprocessed outside the timer; read+backbone is predict without the detector's head: the
    files read and preprocessed by the detector's own loader, then the backbone. read+backbone /
    backbone is the ceiling of predict / backbone. Image-space detectors (image_ae, ganomaly) do not
    run that backbone when predicting; it is still the reference figure."""
    import torch

    from imaging_ad.io import read_image

    samples = list(samples)
    predict_seconds = backbone_seconds = read_backbone_seconds = 0.0
    with torch.inference_mode():  # warm-up of both paths
        detector._extract(
            torch.from_numpy(detector.preprocessor_(read_image(samples[0].path)))[None].to(detector.device_)
        )
    detector.predict([s.path for s in samples[:batch_size]])
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        paths = [s.path for s in part]
        tensors = torch.from_numpy(detector.preprocessor_.batch([read_image(path) for path in paths]))
        begin = time.perf_counter()
        with torch.inference_mode():
            for batch in tensors.split(batch_size):
                detector._extract(batch.to(detector.device_))
            if detector.device_.type == "cuda":
                torch.cuda.synchronize()
        backbone_seconds += time.perf_counter() - begin
        begin = time.perf_counter()
        for _ in detector.extracted_batches(paths, desc="read+backbone"):
            pass
        read_backbone_seconds += time.perf_counter() - begin
        begin = time.perf_counter()
        detector.predict(paths)
        predict_seconds += time.perf_counter() - begin
    n = len(samples)
    return n / predict_seconds, n / backbone_seconds, n / read_backbone_seconds


def machine() -> str:
    from imaging_ad.export.compiled import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(numerator, denominator) -> str:
    """``numerator / denominator`` to 2 places, or "-" when either was not measured (--accuracy-only)."""
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--detectors", nargs="*", default=["patchcore", "padim", "dfm"])
    parser.add_argument("--param", action="append", default=[], metavar="DETECTOR:KEY=VALUE")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument(
        "--accuracy-only",
        action="store_true",
        help="skip the feature-extraction and throughput passes (accuracy and fit time only)",
    )
    parser.add_argument(
        "--fit-repeats", type=int, default=1, help="fit N times, report the median fit/extraction pair"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_pair(args.child[0], args.child[1], json.loads(args.child[2]), args.accuracy_only)
        print("RESULT " + json.dumps(result))
        return 0

    datasets = (
        args.datasets or sorted(p.name for p in SHARED.iterdir() if p.is_dir()) if SHARED.is_dir() else []
    )
    if not datasets:
        print(f"no datasets under {SHARED}", file=sys.stderr)
        return 1
    from imaging_ad.cli import parse_param

    params: dict[str, dict] = {}
    for item in args.param:
        detector, sep, assignment = item.partition(":")
        if not sep:
            parser.error(f"--param expects DETECTOR:KEY=VALUE, got {item!r}")
        key, value = parse_param(assignment)
        params.setdefault(detector, {})[key] = value

    rows = []
    for dataset in datasets:
        for detector in args.detectors:
            child = [
                sys.executable,
                __file__,
                "--child",
                str(SHARED / dataset),
                detector,
                json.dumps(params.get(detector, {})),
                *(["--accuracy-only"] if args.accuracy_only else []),
            ]
            env = {**os.environ, "BENCH_FIT_REPEATS": str(args.fit_repeats)}
            proc = subprocess.run(child, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{dataset}/{detector} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(line[len("RESULT ") :])
            rows.append(row)
            print(
                f"{dataset:>14} {detector:>10}  AUROC {fmt(row['image_auroc'])}  pixel {fmt(row['pixel_auroc'])}  "
                f"AUPRO {fmt(row['aupro'])}  fit {row['fit_s']:.0f}s (extract {fmt(row['extract_s'], 0)} s)  "
                f"predict {fmt(row['predict_ips'], 1)} img/s  backbone {fmt(row['backbone_ips'], 1)} img/s  "
                f"read+backbone {fmt(row['read_backbone_ips'], 1)} img/s  RSS {row['peak_rss_mb']:.0f} MB  "
                f"fit/extraction of each fit {row['fit_ratios']}",
                flush=True,
            )

    header = (
        "| dataset | detector | train/test | image AUROC | pixel AUROC | AUPRO | F1-max | fit s | "
        "feature extraction s | fit/extraction | predict img/s | backbone-only img/s | predict/backbone | "
        "read+backbone img/s (ceiling) | ceiling/backbone | peak RSS MB | training |\n" + "|---" * 17 + "|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['detector']}{' ' + json.dumps(r['params']) if r['params'] else ''} | "
            f"{r['n_train']}/{r['n_test']} | {fmt(r['image_auroc'])} | {fmt(r['pixel_auroc'])} | {fmt(r['aupro'])} | "
            f"{fmt(r['f1_max'])} | {r['fit_s']:.1f} | {fmt(r['extract_s'], 1)} | {ratio(r['fit_s'], r['extract_s'])} | "
            f"{fmt(r['predict_ips'], 2)} | {fmt(r['backbone_ips'], 2)} | "
            f"{ratio(r['predict_ips'], r['backbone_ips'])} | {fmt(r['read_backbone_ips'], 2)} | "
            f"{ratio(r['read_backbone_ips'], r['backbone_ips'])} | {r['peak_rss_mb']:.0f} | {r['training']} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_record and rows:
        command = "python benchmarks/bench_detectors.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a") as handle:
            handle.write(
                f"\n## Detectors — {date.today().isoformat()}\n\nMachine: {machine()}  \n"
                f"Command: `{command.strip()}`\n\n{table}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
