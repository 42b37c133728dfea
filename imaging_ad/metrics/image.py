"""Image-level metrics: one anomaly score per image against a 0/1 label (1 = anomalous).

Every value returned is a plain ``float``/``int``/``None`` so results drop straight into JSON. A metric
that is undefined for the input (ROC needs both classes; precision needs at least one predicted
anomaly) is ``None`` rather than an exception or a NaN, because evaluation sets with a single class
are routine (e.g. a normal-only validation split) and must not abort a run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def image_metrics(
    labels: ArrayLike, scores: ArrayLike, threshold: float | None = None, *, inclusive: bool = True
) -> dict[str, float | int | None]:
    """Ranking metrics for per-image anomaly scores, plus operating-point metrics if ``threshold`` is set.

    Always returns ``image_auroc``, ``average_precision``, ``f1_max`` (the best F1 over every threshold
    of the precision-recall curve), ``f1_max_threshold`` (the lowest score threshold reaching it; an
    image is called anomalous when ``score >= threshold``), ``num_images`` and ``num_anomalous``. The
    four ranking metrics are ``None`` unless both classes are present.

    With ``threshold`` given, also ``threshold``, ``precision``, ``recall``, ``f1``,
    ``false_positive_rate`` and the counts ``tp``, ``fp``, ``tn``, ``fn`` at ``score >= threshold``;
    each rate is ``None`` when its denominator is zero (e.g. ``recall`` on a normal-only set), while
    the rates that are defined are still reported (the false-positive rate of a normal-only set is
    exactly what one wants to know). ``inclusive=False`` calls ``score > threshold`` anomalous instead,
    the rule a fitted detector's verdicts follow.
    """
    y, s = _validate(labels, scores)
    num_anomalous = int(y.sum())
    result: dict[str, float | int | None] = {
        "image_auroc": None,
        "average_precision": None,
        "f1_max": None,
        "f1_max_threshold": None,
        "num_images": int(y.size),
        "num_anomalous": num_anomalous,
    }
    if 0 < num_anomalous < y.size:
        from sklearn.metrics import average_precision_score, roc_auc_score

        f1, f1_threshold = _f1_max(y, s)
        result.update(
            image_auroc=float(roc_auc_score(y, s)),
            average_precision=float(average_precision_score(y, s)),
            f1_max=f1,
            f1_max_threshold=f1_threshold,
        )
    if threshold is not None:
        result.update(threshold_metrics(y, s, threshold, inclusive=inclusive))
    return result


def threshold_metrics(
    labels: ArrayLike, scores: ArrayLike, threshold: float, *, inclusive: bool = True
) -> dict[str, float | int | None]:
    """Confusion counts and rates when images with ``score >= threshold`` (``inclusive=False``:
    ``score > threshold``) are called anomalous."""
    y, s = _validate(labels, scores)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    predicted = s >= threshold if inclusive else s > threshold
    tp = int(np.count_nonzero(predicted & y))
    fp = int(np.count_nonzero(predicted & ~y))
    fn = int(np.count_nonzero(~predicted & y))
    tn = int(np.count_nonzero(~predicted & ~y))
    fpr = _ratio(fp, fp + tn)
    return {
        "threshold": float(threshold),
        # what any threshold could have recalled on this test set without more false positives
        "best_recall_at_this_fpr": _best_recall(y, s, fpr) if fpr is not None and tp + fn > 0 else None,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        # 2TP / (2TP + FP + FN) equals 2PR / (P + R) but stays defined (= 0) when nothing is predicted
        # anomalous while anomalies exist; it is only undefined when there is nothing to find or flag.
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "false_positive_rate": fpr,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _best_recall(y: np.ndarray, s: np.ndarray, max_fpr: float) -> float:
    """The highest recall of any threshold whose false-positive rate is at most ``max_fpr``."""
    normals, anomalies = np.sort(s[~y]), s[y]
    allowed = int(np.floor(max_fpr * normals.size + 1e-9))  # normals that may score above the threshold
    # the strictest threshold letting through `allowed` normals: just above the (allowed + 1)-th highest
    bar = normals[normals.size - allowed - 1] if allowed < normals.size else -np.inf
    return float(np.count_nonzero(anomalies > bar) / anomalies.size)


def per_category_metrics(
    categories: Sequence[str], labels: ArrayLike, scores: ArrayLike
) -> dict[str, dict[str, float | int | None]]:
    """Image AUROC of each defect type against *all* normal images.

    ``categories[i]`` names the defect type of image ``i``; it is ignored for normal images (label 0),
    which form the shared negative set. Pooled AUROC hides a detector that is blind to one rare defect
    type; this breakdown shows it. Returns ``{category: {"image_auroc": ..., "num_images": ...}}``
    for every category that has anomalous images, in sorted order; ``image_auroc`` is ``None`` when
    there are no normal images.
    """
    y, s = _validate(labels, scores)
    cats = np.asarray([str(c) for c in categories], dtype=object)
    if cats.shape != y.shape:
        raise ValueError(f"got {cats.size} categories for {y.size} labels")
    normal_scores = s[~y]
    result: dict[str, dict[str, float | int | None]] = {}
    for category in sorted(set(cats[y].tolist())):
        cat_scores = s[y & (cats == category)]
        auroc = None
        if normal_scores.size:
            from sklearn.metrics import roc_auc_score

            y_cat = np.concatenate([np.zeros(normal_scores.size, bool), np.ones(cat_scores.size, bool)])
            auroc = float(roc_auc_score(y_cat, np.concatenate([normal_scores, cat_scores])))
        result[category] = {"image_auroc": auroc, "num_images": int(cat_scores.size)}
    return result


def _f1_max(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, s)
    # The final (precision=1, recall=0) point has no threshold; drop it so indices line up.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))  # thresholds ascend, so ties resolve to the lowest threshold
    return float(f1[best]), float(thresholds[best])


def _ratio(num: int, den: int) -> float | None:
    return float(num / den) if den else None


def _validate(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Labels as a 1-D bool array and scores as 1-D float64, rejecting anything ambiguous."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"got {y.size} labels but {s.size} scores")
    if y.dtype != bool:
        # Accept 0/1 in any numeric dtype, but not e.g. 0/255 or -1/1, which would silently flip meaning.
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got values {np.unique(y)[:10]}")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y, s
