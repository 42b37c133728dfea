"""Evaluate a fitted detector on a dataset's test split: metrics, timing, curves and overlays."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imaging_ad.data import Dataset
from imaging_ad.detectors import AnomalyResult, Detector
from imaging_ad.metrics import evaluation_report, save_curves
from imaging_ad.visualize import ColourScale, colour_bar


@dataclass
class Evaluation:
    report: dict
    results: list[AnomalyResult] = field(repr=False)
    images_per_second: float = 0.0
    colour_scale: ColourScale | None = None  # the model's, for the example overlays


def evaluate(detector: Detector, dataset: Dataset, fpr_limit: float = 0.3) -> Evaluation:
    """Predict every test image of ``dataset`` and compute image and (where masks exist) pixel metrics."""
    test = dataset.test
    if not test:
        raise ValueError(f"{dataset.root}: the dataset has no test images to evaluate on")
    start = time.perf_counter()
    results = detector.predict(test)
    images_per_second = len(test) / max(time.perf_counter() - start, 1e-9)
    failed = [r for r in results if r.error is not None]
    if failed:  # metrics need a verdict for every test image
        raise ValueError(
            f"{len(failed)} test image(s) got no score, e.g. {failed[0].path}: {failed[0].error}"
        )
    labels = [s.label for s in test]
    has_masks = any(s.mask_path is not None for s in test)
    masks = heatmaps = None
    if has_masks:
        masks = [
            dataset.load_mask(s, r.heatmap.shape) if (s.mask_path is not None or s.label == 0) else None
            for s, r in zip(test, results, strict=True)
        ]
        heatmaps = [r.heatmap for r in results]
    report = evaluation_report(
        labels,
        [r.score for r in results],
        masks=masks,
        heatmaps=heatmaps,
        categories=[s.category for s in test],
        threshold=detector.calibration_.image_threshold,
        inclusive=False,  # the detector's verdict: score > threshold
        fpr_limit=fpr_limit,
    )
    report["threshold_source"] = "calibrated"
    report["calibration_target_fpr"] = detector.calibration_.target_fpr
    report["images_per_second"] = images_per_second
    report["detector"] = detector.name
    report["out_of_domain"] = sum(not r.in_domain for r in results)  # test images the guard calls foreign
    scale = ColourScale.of(detector.calibration_)
    return Evaluation(report=report, results=results, images_per_second=images_per_second, colour_scale=scale)


def format_metrics(report: dict) -> str:
    """The console summary of an evaluation report; threshold-dependent metrics name their threshold."""

    def value(key: str) -> str:
        v = report.get(key)
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"{key:>18}: {value(key)}" for key in ("image_auroc", "pixel_auroc", "aupro", "average_precision")
    ]
    if report.get("f1_max") is not None:
        lines.append(
            f"{'f1_max':>18}: {value('f1_max')} at the best threshold for this test set "
            f"(score >= {report['f1_max_threshold']:.4g})"
        )
    threshold = report.get("threshold")
    if threshold is not None:
        fpr = report.get("calibration_target_fpr")
        source = (
            f"the calibrated threshold {threshold:.4g} (score > {threshold:.4g} is anomalous"
            + (
                f"; set for {fpr:.1%} false positives on normals it did not learn from)"
                if fpr is not None
                else ")"
            )
            if report.get("threshold_source") == "calibrated"
            else f"the threshold {threshold:.4g}"
        )
        lines.append(f"at {source}:")
        for key in ("precision", "recall", "f1", "false_positive_rate"):
            line = f"{key:>18}: {value(key)}"
            if key == "false_positive_rate" and fpr is not None:
                line += f" on this test set's normals (the target was {fpr:.1%})"
            if key == "recall" and report.get("best_recall_at_this_fpr") is not None:
                line += f" (the best any threshold reaches at this false-positive rate: {value('best_recall_at_this_fpr')})"
            lines.append(line)
    return "\n".join(lines)


def save_plots(
    evaluation: Evaluation, dataset: Dataset, out_dir: str | os.PathLike, n_examples: int = 8
) -> list[Path]:
    """ROC/PR curves (the calibrated operating point marked) plus heatmap overlays of the
    highest-scoring anomalies and normals."""
    from imaging_ad.io import read_image
    from imaging_ad.visualize import contour_mask, overlay, save_png

    out = Path(out_dir)
    curves = save_curves(
        [s.label for s in dataset.test],
        [r.score for r in evaluation.results],
        out,
        threshold=evaluation.report.get("threshold"),
        inclusive=False,
    )
    written = list(curves.values())
    order = np.argsort([-r.score for r in evaluation.results])
    picks = [i for i in order if dataset.test[i].label == 1][:n_examples]
    picks += [i for i in order if dataset.test[i].label == 0][:n_examples]
    for rank, index in enumerate(picks):
        sample, result = dataset.test[index], evaluation.results[index]
        scale = evaluation.colour_scale
        image = overlay(read_image(sample.path).pixels, result.heatmap, vmin=scale.low, vmax=scale.high)
        if sample.mask_path is not None:
            image = contour_mask(image, dataset.load_mask(sample, result.heatmap.shape))
        image = np.concatenate([image, colour_bar(image.shape[0], scale)], axis=1)
        name = f"{rank:02d}_{sample.category}_{result.score:.3g}_{sample.path.stem}.png"
        written.append(save_png(out / "examples" / name, image))
    return written
