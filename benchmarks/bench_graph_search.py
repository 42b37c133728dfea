"""PatchCore's HNSW beam (``hnsw_ef_search``) on every shared dataset: accuracy, heatmap cells the graph
search colours wrongly, and the head's time.

A graph search can miss a patch's nearest bank row and overestimate its distance. Each image's top
patches are recomputed exactly (scores are exact), but other cells keep the overestimate, and a cell
pushed above the calibrated pixel threshold is coloured as anomalous although the exact search would not
colour it. For each dataset and beam: fit default PatchCore with that beam on the training normals;
evaluate the test split (image AUROC, pixel AUROC, AUPRO, realised false-positive rate); then, on the
same test images, compare the smoothed heatmaps with those of an exact search over the same bank: the
share of test images (normal and anomalous apart) with more than 0.1% and more than 1% of their pixels
above the pixel threshold only because of the graph search; and the head's time per image (feature maps
precomputed, this process's threads).

    PYTHONPATH=. python benchmarks/bench_graph_search.py [--datasets ...] [--beams 8 16 32] [--record]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from recording import SHARED, dataset_names, record

BATCH = 16


def miscoloured(detector, samples) -> tuple[dict, float]:
    """Per label: [images, images with >0.1% pixels coloured only by the graph search, with >1%]; and
    the head's seconds per image."""
    import torch

    from imaging_ad.inference import load

    head = detector.head_
    exact = head.without_graph_search()
    threshold = detector.calibration_.pixel_threshold
    counts: dict[int, list[int]] = {}
    seconds = 0.0
    for start in range(0, len(samples), BATCH):
        part = samples[start : start + BATCH]
        batch = torch.from_numpy(np.stack([load(str(s.path), detector.preprocessor_).image for s in part]))
        with torch.inference_mode():
            features = list(detector.feature_module()(batch))
            begin = time.perf_counter()
            _, graph_maps = head(features)
            seconds += time.perf_counter() - begin
            _, exact_maps = exact(features)
        for sample, shown, truth in zip(
            part, detector._smooth(graph_maps), detector._smooth(exact_maps), strict=True
        ):
            extra = float(((shown > threshold) & ~(truth > threshold)).mean())
            row = counts.setdefault(int(sample.label), [0, 0, 0])
            row[0] += 1
            row[1] += extra > 0.001
            row[2] += extra > 0.01
    return counts, seconds / len(samples)


def bench_one(dataset_dir: Path, beam: int) -> dict:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.evaluation import evaluate

    dataset = discover_dataset(dataset_dir)
    detector = create_detector("patchcore", device="cpu", progress=False, hnsw_ef_search=beam)
    detector.fit(dataset.train)
    row = {"dataset": dataset_dir.name, "beam": beam, "graph": detector.head_.graph is not None}
    report = evaluate(detector, dataset).report
    row.update({k: report.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "false_positive_rate")})
    if row["graph"]:
        row["counts"], row["head_s"] = miscoloured(detector, dataset.test)
    return row


def fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def share(counts: dict, label: int, column: int) -> str:
    row = counts.get(label)
    return "n/a" if not row else f"{row[column] / row[0]:.1%}"


def table(rows: list[dict]) -> str:
    head = (
        "| dataset | efSearch | image AUROC | pixel AUROC | AUPRO | realised FPR | normals miscoloured >0.1% / >1% "
        "of pixels | anomalies miscoloured >0.1% / >1% | head ms/img |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        counts = r.get("counts")
        cells = [
            r["dataset"],
            str(r["beam"]),
            fmt(r["image_auroc"]),
            fmt(r["pixel_auroc"]),
            fmt(r["aupro"]),
            fmt(r["false_positive_rate"], ".2%"),
        ]
        if counts is None:
            cells += ["exact search (small bank)", "", ""]
        else:
            cells += [
                f"{share(counts, 0, 1)} / {share(counts, 0, 2)}",
                f"{share(counts, 1, 1)} / {share(counts, 1, 2)}",
                f"{1000 * r['head_s']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    means = []
    for beam in sorted({r["beam"] for r in rows}):
        group = [r for r in rows if r["beam"] == beam]
        cells = [f"**mean** (efSearch {beam})", str(beam)]
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            values = [r[key] for r in group if r[key] is not None]
            cells.append(fmt(float(np.mean(values))) if values else "n/a")
        means.append("| " + " | ".join(cells + ["", "", "", ""]) + " |")
    return "\n".join(lines + means)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", nargs="+", default=None, help="default: every dataset in ../shared/data"
    )
    parser.add_argument("--beams", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    names = dataset_names(args.datasets)
    rows = []
    for name in names:
        for beam in args.beams:
            row = bench_one(SHARED / name, beam)
            print(row, flush=True)
            rows.append(row)
    import torch

    from imaging_ad.export.compiled import cpu_model

    text = table(rows)
    notes = f"\nCPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads.\n"
    print(text + notes)
    if args.record:
        record(
            "PatchCore's HNSW beam, every shared dataset (issue 17: heatmap cells coloured by search misses)",
            "Miscoloured: pixels above the calibrated pixel threshold in the graph-search heatmap but not in "
            "the exact search's over the same bank.",
            text + "\n" + notes,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
