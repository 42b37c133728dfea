"""Accuracy of each runtime and precision on every shared dataset (issue 21, deliverable 4).

For each (dataset, detector): fit at the defaults on all training normals, save, then evaluate the full
test split three ways from the same saved model: the torch path, ONNX Runtime fp32 (the default
``--runtime auto`` on a CPU) and ONNX Runtime int8 where the build-time guard offers it (calibrated and
checked on up to ``--int8-normals`` training normals; a refusal is reported with its measured gap).
Prints image AUROC, pixel AUROC and AUPRO (datasets with masks), the realised false-positive rate at
the calibrated threshold, the largest relative image-score difference to torch, equal verdicts and the
largest heatmap difference (relative to the torch heatmap's maximum). ``--record`` appends the table
to benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/bench_runtime_accuracy.py [--datasets ...] [--detectors patchcore padim]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from recording import SHARED, cell, dataset_names, record, spaced


def summary(evaluation, reference=None, threshold: float = 1.0) -> dict:
    from imaging_ad.export.quantize import compare

    report = evaluation.report
    row = {
        "image_auroc": report.get("image_auroc"),
        "pixel_auroc": report.get("pixel_auroc"),
        "aupro": report.get("aupro"),
        "fpr": report.get("false_positive_rate"),
    }
    if reference is not None:
        want = np.array([r.score for r in reference.results])
        got = np.array([r.score for r in evaluation.results])
        row["max_rel_score_diff"] = float(np.max(np.abs(got - want) / np.abs(want)))
        # standardised scores of normals sit around zero, where a plain relative change is unbounded:
        # also the int8 guard's measure, each change against the larger of the score and the threshold
        row["max_scaled_score_diff"] = compare(want, got, threshold, 0).max_relative_score_difference
        row["verdicts_equal"] = sum(
            a.is_anomaly == b.is_anomaly for a, b in zip(reference.results, evaluation.results, strict=True)
        )
        row["max_heatmap_diff"] = max(
            float(np.max(np.abs(b.heatmap - a.heatmap)) / max(float(np.max(np.abs(a.heatmap))), 1e-12))
            for a, b in zip(reference.results, evaluation.results, strict=True)
        )
    return row


def bench_one(dataset_dir: Path, detector_name: str, int8_normals: int) -> list[dict]:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.evaluation import evaluate
    from imaging_ad.export import load_model
    from imaging_ad.export.compiled import with_runtime
    from imaging_ad.export.quantize import QuantizationRefused

    dataset = discover_dataset(dataset_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_runtime_accuracy-") as tmp:
        path = Path(tmp) / "model.safetensors"
        create_detector(detector_name, device="cpu", progress=False).fit(dataset.train).save(path)
        base = {"dataset": dataset_dir.name, "detector": detector_name, "n_test": len(dataset.test)}
        torch_model = load_model(path, runtime="torch", device="cpu")
        threshold = torch_model.calibration_.image_threshold
        torch_eval = evaluate(torch_model, dataset)
        rows.append({**base, "runtime": "torch fp32", **summary(torch_eval)})
        ort_model = load_model(path, runtime="onnxruntime")
        rows.append(
            {
                **base,
                "runtime": "onnxruntime fp32",
                **summary(evaluate(ort_model, dataset), torch_eval, threshold),
            }
        )
        normals = [
            str(s.path) for s in spaced(sorted(dataset.train, key=lambda s: str(s.path)), int8_normals)
        ]
        try:
            int8_model = with_runtime(
                ort_model.detector, "onnxruntime", model_path=path, precision="int8", normals=normals
            )
        except (QuantizationRefused, ValueError) as exc:
            rows.append({**base, "runtime": "onnxruntime int8", "refused": str(exc)})
        else:
            rows.append(
                {
                    **base,
                    "runtime": "onnxruntime int8",
                    **summary(evaluate(int8_model, dataset), torch_eval, threshold),
                }
            )
    gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| dataset | detector | runtime | image AUROC | pixel AUROC | AUPRO | realised FPR (target 1%) | "
        "score diff to torch: max relative / max relative to max(score, threshold) | same verdicts | "
        "max heatmap diff / max |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "refused" in r:
            lines.append(
                f"| {r['dataset']} | {r['detector']} | {r['runtime']} | not offered: {r['refused']} ||||||"
            )
            continue
        cells = [
            r["dataset"],
            r["detector"],
            r["runtime"],
            cell(r["image_auroc"], ".4f"),
            cell(r["pixel_auroc"], ".4f"),
            cell(r["aupro"], ".4f"),
            cell(r["fpr"], ".2%"),
            f"{cell(r.get('max_rel_score_diff'), '.1e')} / {cell(r.get('max_scaled_score_diff'), '.1e')}"
            if "max_rel_score_diff" in r
            else "-",
            f"{r['verdicts_equal']}/{r['n_test']}" if "verdicts_equal" in r else "-",
            cell(r.get("max_heatmap_diff"), ".1e"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", nargs="+", default=None, help="default: every dataset in ../shared/data"
    )
    parser.add_argument("--detectors", nargs="+", default=["patchcore", "padim"])
    parser.add_argument(
        "--int8-normals", type=int, default=64, help="training normals int8 calibrates and checks on"
    )
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    names = dataset_names(args.datasets)
    start = time.perf_counter()
    rows = []
    for name in names:
        for detector_name in args.detectors:
            for row in bench_one(SHARED / name, detector_name, args.int8_normals):
                print(row, flush=True)
                rows.append(row)
    from imaging_ad.export.compiled import cpu_model

    text = table(rows)
    notes = f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; {time.perf_counter() - start:.0f} s in all.\n"
    print(text + notes)
    if args.record:
        record(
            "Accuracy per runtime and precision, every shared dataset (issue 21)",
            "Default detectors fitted on all training normals, full test splits, one saved model per row group "
            "scored by each runtime.",
            text + "\n" + notes,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
