"""Pixel-level metrics: pixel AUROC and AUPRO over a set of images that may all differ in size.

Memory: a test set of ~600 images of 600x600 is ~216 M pixels; concatenating them (plus the sort
that ROC code does) would need several GB. So both metrics stream over the images (one pass for the
global score range, one to bin), putting every pixel score into a fixed histogram of ``num_bins``
equal-width bins spanning the *global* score range, kept separately per class (pixel AUROC) or as
region-weighted sums (AUPRO). Memory is O(num_bins) plus one image at a time (about 15 MB extra for
150 M pixels, ~6 s per metric on one CPU core); results are exact at the bin edges.

Precision of the histogram: only pixels whose *different* scores share a bin are uncertain (a bin
holding exactly tied scores is exact, which matters for heatmaps clipped at 0 or quantised).

* Pixel AUROC counts a positive/negative pair inside one bin as a tie (1/2, the same convention as
  sklearn for exactly tied scores), so the absolute error is at most
  ``0.5 * sum_b(pos_b * neg_b) / (P * N)`` over such mixed bins.
* AUPRO integrates the PRO-vs-FPR curve with the trapezoid rule between bin edges; the true curve is
  monotone inside each bin, so the error is at most ``sum_b(dFPR_b * dPRO_b) / fpr_limit`` over the
  mixed bins below ``fpr_limit``.

Both bounds are computed on every call and a :class:`UserWarning` is issued when one exceeds
:data:`PRECISION_WARNING` (typically only when a few extreme outlier scores squash all other scores
into a handful of bins). With the default 100 000 bins the actual error on ordinary heatmaps is
~1e-5 for a few thousand pixels and ~1e-8 for millions (bins fill densely, so ties inside a bin
average out). Small inputs (up to ``max_exact_pixels``) get an exact pixel AUROC from sklearn.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import ArrayLike

DEFAULT_NUM_BINS = 100_000
# 4 M pixels (~16 images of 512x512): exact sklearn ROC stays under a few hundred MB.
DEFAULT_MAX_EXACT_PIXELS = 1 << 22
# Warn when the histogram could be off by more than this (absolute, on a [0, 1] metric).
PRECISION_WARNING = 1e-3


def binarize_mask(mask: ArrayLike) -> np.ndarray:
    """Ground-truth mask as bool: nonzero is anomalous; float masks are cut at 0.5.

    Masks arrive as 0/255 PNGs, 0/1 arrays or bool, but float masks are usually the result of bilinear
    resizing, whose soft edges would grow every region by a pixel under ``!= 0``.
    """
    m = np.asarray(mask)
    if m.dtype == bool:
        return m
    if np.issubdtype(m.dtype, np.floating):
        return m >= 0.5
    return m != 0


def pixel_auroc(
    masks: Sequence[ArrayLike | None],
    heatmaps: Sequence[ArrayLike],
    *,
    method: str = "auto",
    num_bins: int = DEFAULT_NUM_BINS,
    max_exact_pixels: int = DEFAULT_MAX_EXACT_PIXELS,
) -> float | None:
    """Area under the ROC curve of all pixels of all images pooled together.

    ``masks[i]`` (nonzero = anomalous, or ``None`` for an image known to be entirely normal) must have
    the shape of ``heatmaps[i]``; images may differ in size. ``method``: ``"exact"`` concatenates all
    pixels and uses sklearn; ``"histogram"`` streams into ``num_bins`` bins (see module docstring for
    the error bound); ``"auto"`` is exact up to ``max_exact_pixels`` pixels in total. Returns ``None``
    when the pixels are all anomalous or all normal.
    """
    if method not in ("auto", "exact", "histogram"):
        raise ValueError(f"method must be 'auto', 'exact' or 'histogram', got {method!r}")
    lo, hi, total = _score_range(masks, heatmaps)
    if method == "exact" or (method == "auto" and total <= max_exact_pixels):
        return _pixel_auroc_exact(masks, heatmaps)

    hist = _histogram(masks, heatmaps, lo, hi, num_bins, regions=False)
    pos, neg = hist.pos, hist.neg
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    # Mann-Whitney: each positive beats every negative in a lower bin and ties those in its own bin.
    auroc = float(np.dot(pos, neg_below + 0.5 * neg) / (n_pos * n_neg))
    # Only bins holding more than one distinct score are uncertain; true ties are exact at 1/2.
    bound = 0.5 * float(np.dot(pos[hist.mixed], neg[hist.mixed])) / (n_pos * n_neg)
    _warn_if_coarse("pixel AUROC", bound, num_bins)
    return auroc


def pro_curve(
    masks: Sequence[ArrayLike | None],
    heatmaps: Sequence[ArrayLike],
    *,
    num_thresholds: int = DEFAULT_NUM_BINS,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-region-overlap curve: ``(fpr, pro)`` arrays, ascending in FPR, from (0, 0) to (1, 1).

    Thresholds are ``num_thresholds`` equal steps over the global score range (a pixel is predicted
    anomalous when its score reaches the threshold). FPR is over the normal pixels of all images; PRO is
    the mean, over every 8-connected region of every ground-truth mask, of the fraction of that
    region predicted anomalous, so a small defect counts as much as a large one. Returns ``None`` when
    there are no anomalous regions or no normal pixels.
    """
    result = _pro_curve(masks, heatmaps, num_thresholds)
    return None if result is None else result[:2]


def aupro(
    masks: Sequence[ArrayLike | None],
    heatmaps: Sequence[ArrayLike],
    fpr_limit: float = 0.3,
    num_thresholds: int = DEFAULT_NUM_BINS,
) -> float | None:
    """Area under the PRO curve for FPR in ``[0, fpr_limit]``, divided by ``fpr_limit``.

    The MVTec AD localisation metric: 1.0 for a perfect detector, about ``fpr_limit / 2`` for random
    scores, 0.0 when every anomalous pixel scores below every normal pixel. The curve is interpolated
    linearly at exactly ``fpr_limit``. See :func:`pro_curve` for the curve and the module docstring for
    the precision of the threshold discretisation. ``None`` when there are no anomalous regions or no
    normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    result = _pro_curve(masks, heatmaps, num_thresholds)
    if result is None:
        return None
    fpr, pro, mixed = result
    area = partial_area(fpr, pro, fpr_limit)
    # Error bound: the exact curve is monotone between two consecutive points, so it stays inside
    # the box they span; sum the boxes of the segments that start below the limit and whose bin holds
    # more than one distinct score (a bin of exact ties is a straight segment by convention).
    boxes = np.diff(fpr) * np.diff(pro)
    bound = float(np.sum(boxes[(fpr[:-1] < fpr_limit) & mixed])) / fpr_limit
    _warn_if_coarse("AUPRO", bound, num_thresholds)
    return area / fpr_limit


def _pro_curve(
    masks: Sequence[ArrayLike | None], heatmaps: Sequence[ArrayLike], num_thresholds: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(fpr, pro, mixed)``; ``mixed[k]`` says whether segment k's bin holds distinct scores."""
    lo, hi, _ = _score_range(masks, heatmaps)
    hist = _histogram(masks, heatmaps, lo, hi, num_thresholds, regions=True)
    n_neg = hist.neg.sum()
    if hist.num_regions == 0 or n_neg == 0:
        return None
    # Lowering the threshold bin by bin from above the maximum adds the pixels of each bin in turn.
    fpr = np.concatenate([[0.0], np.cumsum(hist.neg[::-1])]) / n_neg
    pro = np.concatenate([[0.0], np.cumsum(hist.pro[::-1])]) / hist.num_regions
    # Summation rounding can leave the end points a few ulp off 1.
    return np.minimum(fpr, 1.0), np.minimum(pro, 1.0), hist.mixed[::-1]


@dataclass
class _Histogram:
    pos: np.ndarray  # anomalous pixel count per bin (float64: exact below 2**53, safe in dot products)
    neg: np.ndarray  # normal pixel count per bin
    pro: np.ndarray  # sum over anomalous pixels of 1 / |its region| per bin (AUPRO only)
    num_regions: int
    mixed: np.ndarray  # bin holds at least two distinct scores, i.e. its internal order is unknown


def _histogram(
    masks: Sequence[ArrayLike | None],
    heatmaps: Sequence[ArrayLike],
    lo: float,
    hi: float,
    num_bins: int,
    *,
    regions: bool,
) -> _Histogram:
    """One streaming pass over the images; only per-bin arrays outlive an iteration."""
    if num_bins < 1:
        raise ValueError(f"the number of bins/thresholds must be positive, got {num_bins}")
    pos = np.zeros(num_bins, np.float64)
    neg = np.zeros(num_bins, np.float64)
    pro = np.zeros(num_bins, np.float64)
    num_regions = 0
    # One score seen in each bin (NaN: empty so far); any pixel that differs from it marks the bin mixed.
    # Exact comparison, no tolerance: cheaper than per-bin min/max (ufunc.at is ~50x slower).
    first = np.full(num_bins, np.nan)
    mixed = np.zeros(num_bins, bool)
    for mask, heatmap in _pairs(masks, heatmaps):
        values = heatmap.astype(np.float64).ravel()
        idx = _bin_index(values, lo, hi, num_bins)
        flat_mask = mask.ravel()
        pos += np.bincount(idx[flat_mask], minlength=num_bins)
        neg += np.bincount(idx[~flat_mask], minlength=num_bins)
        unseen = np.isnan(first[idx])
        first[idx[unseen]] = values[unseen]  # last write wins; any representative will do
        mixed[idx[values != first[idx]]] = True
        if regions and flat_mask.any():
            n_labels, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            labels = labels.ravel()
            sizes = np.bincount(labels, minlength=n_labels).astype(np.float64)
            inv_size = np.zeros(n_labels, np.float64)
            inv_size[1:] = 1.0 / sizes[1:]  # label 0 is the background (normal pixels)
            # Each region pixel adds 1/|region|, so per-bin sums count fully covered regions;
            # dividing by the number of regions at the end gives the mean overlap.
            pro += np.bincount(idx[flat_mask], weights=inv_size[labels[flat_mask]], minlength=num_bins)
            num_regions += n_labels - 1
    return _Histogram(pos=pos, neg=neg, pro=pro, num_regions=num_regions, mixed=mixed)


def partial_area(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoid area under ``y(x)`` for ``x`` in ``[x[0], x_limit]``, interpolating at ``x_limit``.

    ``x`` must be non-decreasing; repeated ``x`` values (vertical steps) are allowed, which is why this
    does not use ``np.interp`` (ambiguous on repeated abscissae).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    end = int(np.searchsorted(x, x_limit, side="right"))  # x[:end] <= x_limit < x[end:]
    if end == 0:
        return 0.0
    area = float(np.sum(np.diff(x[:end]) * (y[1:end] + y[: end - 1]) / 2.0))
    if end < x.size and x[end - 1] < x_limit:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_limit = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
        area += float((x_limit - x0) * (y0 + y_limit) / 2.0)
    return area


def _pixel_auroc_exact(masks: Sequence[ArrayLike | None], heatmaps: Sequence[ArrayLike]) -> float | None:
    from sklearn.metrics import roc_auc_score

    pairs = list(_pairs(masks, heatmaps))
    y = np.concatenate([m.ravel() for m, _ in pairs])
    if y.all() or not y.any():
        return None
    s = np.concatenate([h.ravel() for _, h in pairs])
    return float(roc_auc_score(y, s))


def _score_range(
    masks: Sequence[ArrayLike | None], heatmaps: Sequence[ArrayLike]
) -> tuple[float, float, int]:
    """Global (min, max, pixel count): a cheap first pass so that all images share the same bins."""
    lo, hi, total = np.inf, -np.inf, 0
    for _, heatmap in _pairs(masks, heatmaps):
        if heatmap.size:
            lo = min(lo, float(heatmap.min()))
            hi = max(hi, float(heatmap.max()))
            total += heatmap.size
    if total == 0:
        return 0.0, 0.0, 0
    return lo, hi, total


def _bin_index(values: np.ndarray, lo: float, hi: float, num_bins: int) -> np.ndarray:
    """Bin numbers in ``[0, num_bins)``: bin ``b`` holds scores in ``[lo + b*w, lo + (b+1)*w)``."""
    if hi <= lo:
        return np.zeros(values.shape, np.intp)
    # values - lo >= 0, so truncation is floor.
    idx = ((values - lo) * (num_bins / (hi - lo))).astype(np.intp)
    np.minimum(idx, num_bins - 1, out=idx)  # the maximum score itself goes into the top bin
    return idx


def _pairs(
    masks: Sequence[ArrayLike | None], heatmaps: Sequence[ArrayLike]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validated (bool mask, 2-D heatmap) per image; converts lazily so only one image is expanded at once."""
    if len(masks) != len(heatmaps):
        raise ValueError(f"got {len(masks)} masks for {len(heatmaps)} heatmaps")
    for i, (mask, heatmap) in enumerate(zip(masks, heatmaps, strict=True)):
        h = _as_2d(np.asarray(heatmap), f"heatmap {i}")
        if not np.issubdtype(h.dtype, np.number) or np.iscomplexobj(h):
            raise ValueError(f"heatmap {i} has non-real dtype {h.dtype}")
        if not np.isfinite(h).all():
            raise ValueError(f"heatmap {i} contains NaN or infinite values")
        m = np.zeros(h.shape, bool) if mask is None else _as_2d(binarize_mask(mask), f"mask {i}")
        if m.shape != h.shape:
            raise ValueError(
                f"mask {i} has shape {m.shape} but heatmap {i} has shape {h.shape}; "
                "heatmaps must be at the resolution of their ground-truth mask"
            )
        yield m, h


def _as_2d(a: np.ndarray, what: str) -> np.ndarray:
    # Tolerate a singleton channel axis (1xHxW from torch, HxWx1 from cv2), nothing else.
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D (HxW), got shape {a.shape}")
    return a


def _warn_if_coarse(metric: str, bound: float, num_bins: int) -> None:
    if bound > PRECISION_WARNING:
        warnings.warn(
            f"{metric} from a {num_bins}-bin score histogram may be off by up to {bound:.2g}: the scores are "
            "concentrated in few bins (extreme outliers?); raise the bin count for more precision",
            UserWarning,
            stacklevel=3,
        )
