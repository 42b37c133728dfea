"""``evaluation_report``: every metric of one evaluation run in one JSON-ready dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from imaging_ad.metrics.image import image_metrics, per_category_metrics
from imaging_ad.metrics.pixel import DEFAULT_NUM_BINS, aupro, pixel_auroc


def evaluation_report(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    masks: Sequence[ArrayLike | None] | None = None,
    heatmaps: Sequence[ArrayLike] | None = None,
    categories: Sequence[str] | None = None,
    threshold: float | None = None,
    inclusive: bool = True,
    fpr_limit: float = 0.3,
    num_bins: int = DEFAULT_NUM_BINS,
) -> dict[str, Any]:
    """Image, pixel and per-category metrics of one run, as plain floats/ints/None/str/dicts.

    Keys: everything from :func:`~imaging_ad.metrics.image.image_metrics` (``image_auroc``,
    ``average_precision``, ``f1_max``, ``f1_max_threshold``, counts, and the operating-point metrics
    when ``threshold`` is given, counted with ``score >= threshold`` or, with ``inclusive=False``,
    ``score > threshold``), plus ``pixel_auroc``, ``aupro``, ``aupro_fpr_limit``,
    ``num_pixel_images`` and ``per_category`` (``None`` without ``categories``).

    Pixel metrics need ``heatmaps`` and ``masks`` (aligned with ``labels``). A ``None`` mask means
    "no ground truth": for a normal image (label 0) that is an all-normal mask, since datasets such as
    MVTec AD ship no mask files for good images; an *anomalous* image without a mask is left out of
    the pixel metrics (counting its pixels as normal would punish correct detections).
    ``num_pixel_images`` says how many images the pixel metrics cover. Without masks the pixel
    metrics are ``None``.
    """
    report: dict[str, Any] = dict(image_metrics(labels, scores, threshold=threshold, inclusive=inclusive))
    report.update(pixel_auroc=None, aupro=None, aupro_fpr_limit=float(fpr_limit), num_pixel_images=0)

    if masks is not None:
        if heatmaps is None:
            raise ValueError("masks were given without heatmaps")
        y = np.asarray(labels)
        if not (len(masks) == len(heatmaps) == y.size):
            raise ValueError(f"got {y.size} labels, {len(masks)} masks and {len(heatmaps)} heatmaps")
        keep = [i for i in range(y.size) if masks[i] is not None or not y[i]]
        kept_masks = [masks[i] for i in keep]
        kept_heatmaps = [heatmaps[i] for i in keep]
        report.update(
            pixel_auroc=pixel_auroc(kept_masks, kept_heatmaps, num_bins=num_bins),
            aupro=aupro(kept_masks, kept_heatmaps, fpr_limit=fpr_limit, num_thresholds=num_bins),
            num_pixel_images=len(keep),
        )

    report["per_category"] = None if categories is None else per_category_metrics(categories, labels, scores)
    return report
