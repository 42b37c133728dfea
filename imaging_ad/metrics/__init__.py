"""Evaluation metrics: image-level (AUROC, AP, F1), pixel-level (pixel AUROC, AUPRO), reports, curves.

scikit-learn and matplotlib are imported inside the functions that need them, so importing this
package (e.g. from :mod:`imaging_ad.visualize`) stays cheap.
"""

from imaging_ad.metrics.curves import save_curves
from imaging_ad.metrics.image import image_metrics, per_category_metrics, threshold_metrics
from imaging_ad.metrics.pixel import aupro, binarize_mask, partial_area, pixel_auroc, pro_curve
from imaging_ad.metrics.report import evaluation_report

__all__ = [
    "aupro",
    "binarize_mask",
    "evaluation_report",
    "image_metrics",
    "partial_area",
    "per_category_metrics",
    "pixel_auroc",
    "pro_curve",
    "save_curves",
    "threshold_metrics",
]
