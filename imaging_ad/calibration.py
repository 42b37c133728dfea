"""Thresholds and score normalisation learned from normal images only, and what they can promise.

The image threshold sits at a target false-positive rate on normal calibration scores (cross-fitted
where the detector can, so they behave like unseen normals' scores). How far that promise holds depends
on how many normals it rests on: the calibration records the number, the rate that number can resolve,
and a 95 % upper bound of the false-positive rate the threshold may really have, and warns when the
images cannot support the target. The normalised score maps the threshold to 0.5 and keeps ranking
far above it (it never saturates to 1.000 in print).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
from scipy.stats import beta

from imaging_ad.domain import TrainingFacts

#: confidence of the recorded upper bound of the false-positive rate
CONFIDENCE = 0.95
#: the bound may exceed the target by this factor before the calibration warns
BOUND_FACTOR = 2.0
#: a calibration score this many robust standard deviations above the median marks an outlying image
OUTLIER_SIGMAS = 6.0
#: calibration images listed as the most outlying
OUTLIERS_LISTED = 5


@dataclass(frozen=True)
class Calibration:
    image_threshold: float
    pixel_threshold: float
    score_scale: float  # spread of normal scores: one unit of the normalised score's argument
    target_fpr: float
    n_normal: int  # normal images the thresholds came from
    #: how the calibration scores were made ("cross-fitted", "held-out split", "site calibration", ...)
    method: str = "held-out split"
    #: 95 % upper bound of the false-positive rate the threshold may have on unseen normals
    fpr_upper_bound: float | None = None
    #: heatmap value drawn fully red (the pixel threshold is where colour starts): one scale for every output
    pixel_upper: float | None = None
    #: where the calibration images came from (the fit's training normals, a site's folder...)
    source: str = ""
    warnings: tuple[str, ...] = ()
    #: the most outlying calibration images: (name, score), highest first
    outliers: tuple[tuple[str, float], ...] = field(default=())
    #: the out-of-domain guard (see imaging_ad.domain): its feature-distance threshold, and the training
    #: images' facts; None for models saved before the guard existed
    domain_threshold: float | None = None
    training_facts: TrainingFacts | None = None

    @property
    def fpr_resolution(self) -> float:
        """The smallest false-positive rate the calibration images can tell apart from zero (1/n)."""
        return 1.0 / max(self.n_normal, 1)

    def normalize(self, scores: np.ndarray | float) -> np.ndarray:
        """Raw scores -> (0, 1), the image threshold at exactly 0.5, one ``score_scale`` above it at 0.75.
        A softsign rather than a logistic: it approaches 1 slowly, so scores far above the threshold stay
        apart (100 scales: 0.995, 1000: 0.9995) instead of all printing as 1.000."""
        z = (np.asarray(scores, dtype=np.float64) - self.image_threshold) / self.score_scale
        return 0.5 + 0.5 * z / (1.0 + np.abs(z))

    def raw_score(self, normalized: float) -> float:
        """The raw score whose normalised score is ``normalized`` (inverse of :meth:`normalize`)."""
        y = 2.0 * min(max(float(normalized), 1e-9), 1 - 1e-9) - 1.0
        return self.image_threshold + self.score_scale * y / (1.0 - abs(y))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["warnings"], data["outliers"] = list(self.warnings), [list(o) for o in self.outliers]
        data["training_facts"] = None if self.training_facts is None else self.training_facts.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """From :meth:`to_dict`; files written before the extra fields existed load with their defaults."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["warnings"] = tuple(data.get("warnings", ()))
        data["outliers"] = tuple((str(name), float(score)) for name, score in data.get("outliers", ()))
        facts = data.get("training_facts")
        data["training_facts"] = None if facts is None else TrainingFacts.from_dict(facts)
        return cls(**data)

    def describe(self) -> str:
        """One line on what the threshold promises, for the CLI and the demo."""
        bound = (
            ""
            if self.fpr_upper_bound is None
            else f", at most {self.fpr_upper_bound:.1%} with 95% confidence"
        )
        return (
            f"image threshold {self.image_threshold:.4g}: {self.target_fpr:.1%} false positives aimed at "
            f"({self.method} scores of {self.n_normal} normal images, resolving {self.fpr_resolution:.1%}{bound})"
        )


def fpr_upper_bound(n_normal: int, n_above: int, confidence: float = CONFIDENCE) -> float:
    """Upper bound of the false-positive rate of a threshold that ``n_above`` of ``n_normal`` normal scores
    exceed: the chance that an unseen normal exceeds the (n - n_above)-th order statistic is
    Beta(n_above + 1, n - n_above) distributed (exchangeable continuous scores)."""
    return float(beta.ppf(confidence, n_above + 1, max(n_normal - n_above, 1)))


def normals_needed(target_fpr: float, factor: float = BOUND_FACTOR, confidence: float = CONFIDENCE) -> int:
    """The fewest normal images whose threshold at ``target_fpr`` has an upper bound within ``factor`` of it."""
    n = 2
    while n < 1_000_000:
        above = _n_above_quantile(n, target_fpr)
        if fpr_upper_bound(n, above, confidence) <= factor * target_fpr:
            return n
        n = int(n * 1.1) + 1
    return n


def _n_above_quantile(n: int, target_fpr: float) -> int:
    """How many of n scores lie above their ("higher") (1 - target_fpr) quantile."""
    index = int(np.ceil((1.0 - target_fpr) * (n - 1)))
    return n - 1 - min(index, n - 1)


def calibrate(
    normal_scores: np.ndarray,
    normal_pixel_sample: np.ndarray,
    target_fpr: float = 0.01,
    *,
    method: str = "held-out split",
    source: str = "",
    names: list[str] | None = None,
) -> Calibration:
    """Thresholds at ``target_fpr`` on normal image scores and on a sample of normal heatmap pixels, with
    the bound of what they promise, warnings, and the most outlying images (``names`` in score order)."""
    normal_scores = np.asarray(normal_scores, dtype=np.float64)
    n = int(normal_scores.size)
    if n < 2:
        raise ValueError("calibration needs at least two normal images")
    if not np.isfinite(normal_scores).all() or not np.isfinite(normal_pixel_sample).all():
        raise ValueError("calibration scores are not all finite numbers; check the normal images")
    if not 0.0 < target_fpr < 0.5:
        raise ValueError(f"target_fpr must be in (0, 0.5), got {target_fpr}")
    # "higher": with few normals the threshold is an observed score, never an interpolation below it.
    image_threshold = float(np.quantile(normal_scores, 1.0 - target_fpr, method="higher"))
    pixel_threshold = float(np.quantile(normal_pixel_sample, 1.0 - target_fpr))
    pixel_median = float(np.median(normal_pixel_sample))
    spread = float(np.std(normal_scores))
    scale = spread if spread > 0 else max(abs(image_threshold) * 0.1, 1e-6)
    bound = fpr_upper_bound(n, int((normal_scores > image_threshold).sum()))
    warnings = []
    if bound > BOUND_FACTOR * target_fpr:
        warnings.append(
            f"{n} normal images cannot support a {target_fpr:.1%} false-positive rate: on unseen normals the "
            f"threshold's rate may be up to {bound:.1%} (95% bound). Give at least "
            f"{normals_needed(target_fpr)} normal images, or aim at a higher rate (target_fpr)."
        )
    order = np.argsort(-normal_scores)
    outliers = []
    if names is not None:
        outliers = [(str(names[i]), float(normal_scores[i])) for i in order[:OUTLIERS_LISTED]]
    median = float(np.median(normal_scores))
    robust_sigma = 1.4826 * float(np.median(np.abs(normal_scores - median))) or scale
    far = int((normal_scores > median + OUTLIER_SIGMAS * robust_sigma).sum())
    if far and far <= max(1, int(np.ceil(target_fpr * n))):
        warnings.append(
            f"{far} normal image(s) score far above the rest (over {OUTLIER_SIGMAS:g} robust standard "
            "deviations): the threshold rests on them. Check the most outlying ones for mislabelled "
            "anomalies or other views and scanners, and remove them if they do not belong."
        )
    return Calibration(
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        score_scale=scale,
        target_fpr=target_fpr,
        n_normal=n,
        method=method,
        fpr_upper_bound=bound,
        pixel_upper=pixel_median + 3.0 * max(pixel_threshold - pixel_median, 1e-6),
        source=source,
        warnings=tuple(warnings),
        outliers=tuple(outliers),
    )
