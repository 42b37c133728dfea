"""Exported models next to their checkpoint: CPU throughput and parity on every test image.

For each (dataset, detector): fit on the whole training split with default settings (or reuse the
checkpoint cached in ``--model-dir``), export to ONNX and TorchScript, then score every test image with
the checkpoint's ``predict``, the ONNX runtime and the TorchScript runtime. All three get the same
decoded images (reading is identical for all, so it is left out) and run chunk by chunk in turn, so a
drift in CPU speed on a shared machine hits them alike. Each throughput includes preprocessing, the
model and mapping heatmaps back to the original size. For PatchCore with an HNSW index it also runs the
checkpoint with exact search (what the export computes) and reports parity against both. Prints a
Markdown table and appends it to benchmarks/RESULTS.md.

    python benchmarks/bench_export.py [--datasets magnetic_tile chest_xray] [--detectors patchcore padim dfm]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_detectors import RESULTS, SHARED, machine  # noqa: E402

CHUNK = 64


def fitted_model(dataset, detector_name: str, model_dir: Path) -> tuple[Path, float | None]:
    """A checkpoint fitted on the full training split, cached between runs."""
    from imaging_ad.detectors import create_detector

    path = model_dir / f"{dataset.name}-{detector_name}.safetensors"
    if path.is_file():
        return path, None
    start = time.perf_counter()
    detector = create_detector(detector_name, progress=False).fit(dataset.train)
    seconds = time.perf_counter() - start
    return detector.save(path), seconds


def parity(results: list, reference: list) -> tuple[float, float]:
    """(max relative score difference, max heatmap difference relative to the heatmap's maximum)."""
    scores = max(abs(a.score - b.score) / abs(b.score) for a, b in zip(results, reference, strict=True))
    heatmaps = max(
        float(np.abs(a.heatmap - b.heatmap).max() / np.abs(b.heatmap).max())
        for a, b in zip(results, reference, strict=True)
    )
    return scores, heatmaps


def run_pair(dataset, detector_name: str, model_dir: Path, records: list, threads: int | None) -> dict:

    from imaging_ad.detectors import load_detector
    from imaging_ad.export import export_model, load_exported

    checkpoint, fit_seconds = fitted_model(dataset, detector_name, model_dir)
    detector = load_detector(checkpoint, device="cpu")
    detector.progress = False
    runners = {"checkpoint": detector.predict}
    exports = {}
    for format in ("onnx", "torchscript"):
        start = time.perf_counter()
        files = export_model(checkpoint, model_dir / f"{checkpoint.stem}-{format}", format)
        exports[format] = {"seconds": time.perf_counter() - start, "mb": files.model.stat().st_size / 1e6}
        runners[format] = load_exported(files.model, device="cpu", threads=threads).predict
    approximate = "approximate" in detector.export_notes().get("checkpoint_search", "")
    if approximate:  # the checkpoint searching exactly, as the export does
        exact = load_detector(checkpoint, device="cpu")
        exact.progress = False
        exact.head_ = exact.export_head()
        runners["checkpoint, exact search"] = exact.predict

    for run in runners.values():  # warm-up: thread pools, oneDNN/ORT kernels, TorchScript profiling
        run(records[:4])
    seconds = dict.fromkeys(runners, 0.0)
    comparisons = [(f, "checkpoint", f) for f in exports]
    if approximate:
        comparisons += [(f, "checkpoint, exact search", f"{f} vs exact") for f in exports]
    differences = {label: (0.0, 0.0) for _, _, label in comparisons}
    for offset in range(0, len(records), CHUNK):  # heatmaps are compared chunk by chunk, then dropped
        chunk = records[offset : offset + CHUNK]
        results = {}
        for name, run in runners.items():
            start = time.perf_counter()
            results[name] = run(chunk)
            seconds[name] += time.perf_counter() - start
        for name, reference, label in comparisons:
            new = parity(results[name], results[reference])
            differences[label] = tuple(max(a, b) for a, b in zip(differences[label], new, strict=True))
    return {
        "dataset": dataset.name,
        "detector": detector_name,
        "images": len(records),
        "fit_s": fit_seconds,
        "search": "HNSW" if approximate else "exact",
        "ips": {name: len(records) / s for name, s in seconds.items()},
        "exports": exports,
        "parity": differences,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | detector | images | checkpoint search | checkpoint img/s | ONNX img/s | TorchScript img/s "
        "| ONNX / checkpoint | TorchScript / checkpoint | ONNX max rel. score diff / heatmap diff "
        "| TorchScript max rel. score diff / heatmap diff | ONNX MB | export s (ONNX / TS) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ips, p = r["ips"], r["parity"]
        search = r["search"]
        if "checkpoint, exact search" in ips:
            search += f" (exact search: {ips['checkpoint, exact search']:.1f} img/s)"
        lines.append(
            f"| {r['dataset']} | {r['detector']} | {r['images']} | {search} | {ips['checkpoint']:.1f} "
            f"| {ips['onnx']:.1f} | {ips['torchscript']:.1f} | {ips['onnx'] / ips['checkpoint']:.2f} "
            f"| {ips['torchscript'] / ips['checkpoint']:.2f} | {_differences(p, 'onnx')} | {_differences(p, 'torchscript')} "
            f"| {r['exports']['onnx']['mb']:.1f} "
            f"| {r['exports']['onnx']['seconds']:.1f} / {r['exports']['torchscript']['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _differences(parity_figures: dict, format: str) -> str:
    score, heatmap = parity_figures[format]
    text = f"{score:.1e} / {heatmap:.1e}"
    if f"{format} vs exact" in parity_figures:
        score, heatmap = parity_figures[f"{format} vs exact"]
        text += f" (vs exact search: {score:.1e} / {heatmap:.1e})"
    return text


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["magnetic_tile", "chest_xray"])
    parser.add_argument("--detectors", nargs="+", default=["patchcore", "padim", "dfm"])
    parser.add_argument("--model-dir", default=str(ROOT / "runs" / "bench_export"))
    parser.add_argument(
        "--limit", type=int, default=None, help="score only this many test images (quick runs)"
    )
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and onnxruntime threads (default: each library's own)",
    )
    args = parser.parse_args()

    import onnxruntime
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from imaging_ad.data import discover_dataset
    from imaging_ad.io import read_image

    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = []
    for name in args.datasets:
        dataset = discover_dataset(SHARED / name)
        samples = dataset.test[: args.limit] if args.limit else dataset.test
        records = [read_image(s.path) for s in samples]
        for detector_name in args.detectors:
            row = run_pair(dataset, detector_name, model_dir, records, args.threads)
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    load_after = os.getloadavg()
    table = markdown(rows)
    print(table)
    if not args.no_append:
        command = "python benchmarks/bench_export.py " + " ".join(sys.argv[1:])
        header = (
            f"\n## Exported models vs checkpoint — {date.today().isoformat()}\n\n"
            f"Machine: {machine()}; torch {torch.__version__} ({_threads(torch.get_num_threads())}), "
            f"onnxruntime {onnxruntime.__version__} ({_threads(args.threads) if args.threads else 'default threads'})  \n"
            f"Command: `{command.strip()}`  \n"
            f"Load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f} (other jobs shared "
            "the CPU; the three runners alternate chunk by chunk, so they shared it alike)\n\n"
            "Throughput: images per second from decoded images to results (preprocessing, model, heatmaps "
            "at original size), every test image, same images for all. Differences: largest relative score "
            "difference and largest heatmap difference relative to that heatmap's maximum, over all images, "
            "against the checkpoint's own `predict`.\n\n"
        )
        with RESULTS.open("a") as handle:
            handle.write(header + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
