"""Throughput and peak memory of ``imaging_ad.scan`` against the backbone-only forward pass.

Each heatmap mode runs in its own child process, so peak RSS is that scan's alone. In the child the
backbone-only forward throughput is measured on the same images at the model's input size (images
preprocessed outside the timer, one batch at a time, the detector's own truncated backbone and batch
size) right before and right after the scan, and averaged: CPU speed drifts on a shared machine. The
scan/backbone ratio is what the scan is judged by; model-only throughput (``score_batch``: backbone,
the detector's scoring and smoothing, no I/O) is the ceiling any scan of that model can reach. ``--n``
builds a folder of that many files by hard-linking the source images (in sub-folders of 1000) to
measure memory on a large folder.

    python benchmarks/bench_scan.py --model models/tiles.safetensors [--source ../shared/data/magnetic_tile/test]
        [--heatmaps none flagged] [--n 20000] [--workers N] [--batch-size N] [--no-record]

Without ``--model`` a PatchCore model is fitted on ``../shared/data/magnetic_tile`` first (about 2 min).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_detectors import RESULTS, SHARED, machine  # noqa: E402


def _batches(detector, paths: list[Path], batch_size: int):
    """Preprocessed batches, one at a time (memory stays one batch whatever the number of images)."""
    import torch

    from imaging_ad.io import read_image

    for i in range(0, len(paths), batch_size):
        yield torch.from_numpy(
            detector.preprocessor_.batch([read_image(p) for p in paths[i : i + batch_size]])
        )


def backbone_throughput(detector, paths: list[Path], batch_size: int) -> float:
    """Images/s of the detector's backbone alone; reading and preprocessing are outside the timer."""
    import torch

    seconds, n = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(detector, paths, batch_size):
            batch = batch.to(detector.device_)
            start = time.perf_counter()
            detector._extract(batch)
            if detector.device_.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            n += len(batch)
    return n / seconds


def model_throughput(detector, paths: list[Path], batch_size: int) -> float:
    """Images/s of ``score_batch`` (backbone + the detector's scoring + smoothing), no I/O: the ceiling
    for any scan, since a scan has to do all of it."""
    seconds, n = 0.0, 0
    for batch in _batches(detector, paths, batch_size):
        start = time.perf_counter()
        detector.score_batch(batch)
        seconds += time.perf_counter() - start
        n += len(batch)
    return n / seconds


def child(input_dir: str, model: str, options: dict) -> dict:
    from imaging_ad.detectors import load_detector
    from imaging_ad.scan import discover, read_rows, scan

    started = time.perf_counter()
    detector = load_detector(Path(model), device=options.get("device", "auto"))
    batch_size = options.get("batch_size") or detector.batch_size
    files = discover(Path(input_dir))
    sample = files[: options["backbone_images"]]
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_throughput(detector, sample[: 4 * batch_size], batch_size)  # warm-up: first calls are slow
    backbone_before = backbone_throughput(detector, sample, batch_size)
    model_before = model_throughput(detector, sample, batch_size)
    out = Path(options["out"])
    summary = scan(
        input_dir,
        model,
        out,
        heatmaps=options["heatmaps"],
        workers=options.get("workers"),
        batch_size=batch_size,
        detector=detector,
    )
    rss_scan = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_after = model_throughput(detector, sample, batch_size)
    backbone_after = backbone_throughput(detector, sample, batch_size)
    paths = [row["path"] for row in read_rows(out)]
    import torch

    return {
        "n_files": len(files),
        "rows": len(paths),
        "unique_rows": len(set(paths)),
        "errors": summary.n_errors,
        "flagged": summary.n_flagged,
        "overlays": summary.n_overlays,
        "heatmaps": options["heatmaps"],
        "scan_s": summary.seconds,
        "scan_ips": summary.images_per_second,
        "backbone_ips": (backbone_before + backbone_after) / 2,
        "model_ips": (model_before + model_after) / 2,
        "backbone_before": backbone_before,
        "backbone_after": backbone_after,
        "backbone_images": len(sample),
        "batch_size": batch_size,
        "workers": options.get("workers") or min(4, os.cpu_count() or 1),
        "wall_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": rss_scan,
    }


def build_folder(source: Path, target: Path, n: int) -> None:
    """``n`` hard links (copies where links are impossible) of the source images, 1000 per sub-folder."""
    from imaging_ad.scan import discover

    originals = discover(source)
    if not originals:
        raise SystemExit(f"no images under {source}")
    for i in range(n):
        src = originals[i % len(originals)]
        dst = target / f"part{i // 1000:03d}" / f"{i:06d}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def fit_model(path: Path) -> None:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector

    dataset = discover_dataset(SHARED / "magnetic_tile")
    create_detector("patchcore", progress=False).fit(dataset.train).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="fitted model (default: fit PatchCore on magnetic_tile)"
    )
    parser.add_argument("--source", default=str(SHARED / "magnetic_tile" / "test"))
    parser.add_argument("--n", type=int, default=None, help="scan this many files built from --source")
    parser.add_argument(
        "--heatmaps", nargs="+", default=["none", "flagged"], choices=("none", "flagged", "all")
    )
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--backbone-images", type=int, default=600, help="images the backbone-only pass runs on (the first N)"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            "RESULT " + json.dumps(child(args.child[0], args.child[1], json.loads(args.child[2]))), flush=True
        )
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_scan_") as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tmp / "tiles.safetensors"
        if not args.model:
            print("fitting PatchCore on magnetic_tile ...", file=sys.stderr, flush=True)
            fit_model(model)
        source = Path(args.source)
        if args.n:
            input_dir = tmp / "input"
            start = time.perf_counter()
            build_folder(source, input_dir, args.n)
            print(f"built {args.n} files in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        else:
            input_dir = source
        rows = []
        for mode in args.heatmaps:
            options = {
                "heatmaps": mode,
                "workers": args.workers,
                "batch_size": args.batch_size,
                "device": args.device,
                "backbone_images": args.backbone_images,
                "out": str(tmp / f"out_{mode}"),
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(input_dir), str(model), json.dumps(options)],
                capture_output=True,
                text=True,
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"heatmaps={mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(line[len("RESULT ") :])
            rows.append(row)
            print(
                f"heatmaps={mode:>7}: {row['rows']} rows ({row['unique_rows']} unique) of {row['n_files']} files, "
                f"scan {row['scan_ips']:.2f} img/s, model-only {row['model_ips']:.2f} img/s, "
                f"backbone {row['backbone_ips']:.2f} img/s "
                f"(before {row['backbone_before']:.2f}, after {row['backbone_after']:.2f}), "
                f"overlays {row['overlays']}, peak RSS {row['peak_rss_mb']:.0f} MB",
                flush=True,
            )

    header = (
        "| files | heatmaps | rows (unique) | errors | flagged | overlays written | scan s | scan img/s | "
        "model-only img/s | backbone-only img/s | scan/model | scan/backbone | peak RSS MB |\n"
        + "|---" * 13
        + "|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['n_files']} | {r['heatmaps']} | {r['rows']} ({r['unique_rows']}) | {r['errors']} | {r['flagged']} | "
            f"{r['overlays']} | {r['scan_s']:.1f} | {r['scan_ips']:.2f} | {r['model_ips']:.2f} | "
            f"{r['backbone_ips']:.2f} | {r['scan_ips'] / r['model_ips']:.2f} | "
            f"{r['scan_ips'] / r['backbone_ips']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if rows:
        r = rows[0]
        note = (
            f"Batch size {r['batch_size']}, {r['workers']} reader threads, {r['torch_threads']} torch threads; "
            f"model-only (score_batch: backbone + scoring + smoothing) and backbone-only on the first "
            f"{r['backbone_images']} of the scanned files, preprocessed outside the timer, before and after "
            f"each scan (averaged); peak RSS is the scan process's maximum, model load included."
        )
        print(note)
    if not args.no_record and rows:
        command = "python benchmarks/bench_scan.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a") as handle:
            handle.write(
                f"\n## Folder scan — {date.today().isoformat()}\n\nMachine: {machine()}  \n"
                f"Command: `{command.strip()}`\n\n{table}\n\n{note}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
