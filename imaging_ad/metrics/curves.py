"""``save_curves``: ROC and precision-recall plots of image-level scores as PNG files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from imaging_ad.metrics.image import image_metrics


def save_curves(
    labels: ArrayLike,
    scores: ArrayLike,
    out_dir: str | os.PathLike,
    threshold: float | None = None,
    *,
    threshold_label: str = "calibrated threshold",
    inclusive: bool = True,
) -> dict[str, Path]:
    """Write ``roc_curve.png`` and ``pr_curve.png`` into ``out_dir`` (created if needed).

    With ``threshold`` (e.g. the detector's calibrated image threshold) both plots mark that operating
    point, labelled ``threshold_label`` with its value and rates (``inclusive``: anomalous means
    ``score >= threshold``, else ``score > threshold``, the detectors' rule). Returns
    ``{"roc": path, "pr": path}``. With a single class the curves are undefined: nothing is
    written, a warning is issued and ``{}`` is returned, so a report on a normal-only set still
    completes. Needs matplotlib (an optional dependency, imported here only); the figures are drawn
    on the Agg canvas directly, without pyplot, so no global backend state is touched.
    """
    metrics = image_metrics(labels, scores, threshold=threshold, inclusive=inclusive)
    if metrics["image_auroc"] is None:
        warnings.warn("ROC/PR curves need both normal and anomalous images; none written", stacklevel=2)
        return {}
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("save_curves needs matplotlib: pip install matplotlib") from exc
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"roc": out / "roc_curve.png", "pr": out / "pr_curve.png"}

    fpr, tpr, _ = roc_curve(y, s)
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {metrics['image_auroc']:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    if threshold is not None:
        fpr_at, tpr_at = metrics["false_positive_rate"], metrics["recall"]
        ax.plot(
            [fpr_at], [tpr_at], "o", ms=9, mfc="none", mec="crimson", mew=2,
            label=f"{threshold_label} {threshold:.4g}:\nFPR {fpr_at:.3f}, TPR {tpr_at:.3f}",
        )  # fmt: skip
    _style(ax, "False positive rate", "True positive rate", "Image-level ROC")
    fig.savefig(paths["roc"])

    precision, recall, _ = precision_recall_curve(y, s)
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", lw=2, label=f"AP = {metrics['average_precision']:.4f}")
    # A random detector's precision equals the share of anomalous images.
    ax.axhline(y.mean(), ls="--", c="grey", lw=1, label="chance")
    f1 = metrics["f1_max"]
    ax.plot([], [], " ", label=f"F1-max = {f1:.4f} at score >= {metrics['f1_max_threshold']:.4g}")
    if threshold is not None:
        recall_at, precision_at = metrics["recall"], metrics["precision"]
        # no image flagged: precision is undefined, and by convention the curve starts at precision 1
        marker_precision = 1.0 if precision_at is None else precision_at
        precision_text = "n/a" if precision_at is None else f"{precision_at:.3f}"
        ax.plot(
            [recall_at], [marker_precision], "o", ms=9, mfc="none", mec="crimson", mew=2,
            label=f"{threshold_label} {threshold:.4g}:\nprecision {precision_text}, recall {recall_at:.3f}",
        )  # fmt: skip
    _style(ax, "Recall", "Precision", "Image-level precision-recall", legend="lower left")
    fig.savefig(paths["pr"])
    return paths


def _style(ax, xlabel: str, ylabel: str, title: str, legend: str = "lower right") -> None:
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=8)
    ax.figure.tight_layout()
