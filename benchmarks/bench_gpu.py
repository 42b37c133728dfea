"""The GPU path end to end (issue 21, deliverable 3), ready for a session that has the device machine.

For each (dataset, detector): fit at the defaults on ``--train`` training normals on ``--device`` (CUDA: the
backbone under fp16 autocast, PatchCore's nearest-neighbour search as one batched matrix product), then,
in one run and alternating batch by batch: the backbone alone in fp32 and under fp16 autocast, the whole
model from preprocessed arrays (``score_batch``: host-to-device copy included), and ``predict`` from the
files (reading and preprocessing on the CPU threads). Parity: the same saved model loaded on the CPU
scores the same test images; the largest score difference relative to max(|score|, threshold), equal
verdicts, and image AUROC on each device.

    PYTHONPATH=. python benchmarks/bench_gpu.py [--device cuda] [--datasets magnetic_tile chest_xray] [--record]

Without a CUDA device it says so and measures nothing (``--device cpu`` runs the same steps on the CPU,
to check the script).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from recording import SHARED, cell, record, spaced


def synchronised(device, run) -> float:
    """Seconds ``run()`` takes, with the device's queue drained before and after."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_one(dataset_dir: Path, detector_name: str, args) -> dict:
    import torch
    from sklearn.metrics import roc_auc_score

    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector, load_detector
    from imaging_ad.export.quantize import compare
    from imaging_ad.inference import load

    dataset = discover_dataset(dataset_dir)
    train = [str(s.path) for s in spaced(sorted(dataset.train, key=lambda s: str(s.path)), args.train)]
    samples = spaced(sorted(dataset.test, key=lambda s: str(s.path)), args.test)
    test = [str(s.path) for s in samples]
    labels = np.array([s.label for s in samples])
    row: dict = {"dataset": dataset_dir.name, "detector": detector_name, "n_test": len(test)}
    start = time.perf_counter()
    detector = create_detector(detector_name, device=args.device, progress=False).fit(train)
    row["fit_s"] = time.perf_counter() - start
    device = detector.device_
    row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    arrays = np.stack([load(p, detector.preprocessor_).image for p in test]).astype(np.float32)
    size = args.batch or detector.batch_size
    chunks = [arrays[i : i + size] for i in range(0, len(arrays), size)]
    module = detector.feature_module()

    def backbone(chunk: np.ndarray, fp16: bool) -> None:
        images = torch.from_numpy(chunk).to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            module(images)

    detector.predict(test[:size]), detector.score_batch(chunks[0]), backbone(chunks[0], True)  # warm-up
    seconds = {"backbone_fp32": 0.0, "backbone_fp16": 0.0, "tensors": 0.0, "files": 0.0}
    for _ in range(args.repeats):
        for index, chunk in enumerate(chunks):
            files = test[index * size : (index + 1) * size]
            seconds["backbone_fp32"] += synchronised(device, lambda c=chunk: backbone(c, False))
            if device.type == "cuda":  # autocast on the CPU is bf16, not the GPU path measured here
                seconds["backbone_fp16"] += synchronised(device, lambda c=chunk: backbone(c, True))
            seconds["tensors"] += synchronised(device, lambda c=chunk: detector.score_batch(c))
            seconds["files"] += synchronised(device, lambda f=files: detector.predict(f))
    for name, total in seconds.items():
        row[name] = args.repeats * len(test) / total if total else None

    # parity with the CPU
    on_device = np.array([r.score for r in detector.predict(test)])
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        path = detector.save(Path(tmp) / "model.safetensors")
        cpu = load_detector(path, device="cpu")
        cpu_scores = np.array([r.score for r in cpu.predict(test)])
    # the int8 guard's measure: each change against the larger of the score and the threshold
    check = compare(cpu_scores, on_device, detector.calibration_.image_threshold, 0)
    row["max_scaled_score_diff"] = check.max_relative_score_difference
    row["verdicts_equal"] = len(test) - check.verdict_changes
    if 0 < labels.sum() < len(labels):
        row["auroc_device"] = roc_auc_score(labels, on_device)
        row["auroc_cpu"] = roc_auc_score(labels, cpu_scores)
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| dataset | detector | device | backbone fp32 img/s | backbone fp16 autocast img/s | model from arrays "
        "img/s | predict from files img/s | files / backbone fp16 | max score diff to CPU (of max(score, "
        "threshold)) | same verdicts | AUROC device / CPU | fit s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fastest = r["backbone_fp16"] or r["backbone_fp32"]
        cells = [
            r["dataset"],
            r["detector"],
            r["device"],
            cell(r["backbone_fp32"], ".1f"),
            cell(r["backbone_fp16"], ".1f"),
            cell(r["tensors"], ".1f"),
            cell(r["files"], ".1f"),
            f"{r['files'] / fastest:.2f}",
            f"{r['max_scaled_score_diff']:.1e}",
            f"{r['verdicts_equal']}/{r['n_test']}",
            f"{cell(r.get('auroc_device'), '.4f')} / {cell(r.get('auroc_cpu'), '.4f')}",
            f"{r['fit_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--datasets", nargs="+", default=["magnetic_tile", "chest_xray"])
    parser.add_argument("--detectors", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--train", type=int, default=200, help="training normals per fit")
    parser.add_argument("--test", type=int, default=400, help="test images timed")
    parser.add_argument("--batch", type=int, default=0, help="images per batch (default: the detector's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (the GPU path needs the device machine)")
        return 2
    rows = []
    for name in args.datasets:
        for detector_name in args.detectors:
            row = bench_one(SHARED / name, detector_name, args)
            print(row, flush=True)
            rows.append(row)
    text = table(rows)
    notes = f"\ntorch {torch.__version__}, {os.cpu_count()} CPU cores for reading.\n"
    print(text + notes)
    if args.record:
        record(
            "The GPU path end to end (issue 21)",
            f"{args.train} training normals per fit, {args.test} test images, {args.repeats} passes, "
            "alternating batch by batch.",
            text + "\n" + notes,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
