"""Is an input the kind of image a model was trained on? (torch-free)

Two checks, both calibrated on the training normals, together the out-of-domain guard every result
carries:

- **Image facts.** Colour content (channels that really differ, not the stored channel count: chest
  X-rays often come as RGB files of grey pictures), bit depth and DICOM modality, against what the
  training images had. A colour photo into a model of grey radiographs, or a 16-bit CT into a model
  of 8-bit photos, is out of domain whatever it scores.
- **Feature distance.** The distance of the image's pooled deep features (mean and spread of the
  backbone's deep stages, the vector DFM models) to the nearest training image's, relative to the
  largest such distance among the training images themselves (leave-one-out) times a margin. Measured
  over six datasets (benchmarks/RESULTS.md, issue 17 B), nearest-neighbour distances with a 1.5 margin
  keep a model's own test images in (normal and anomalous alike) and put other datasets and everyday
  photos out, where a Mahalanobis distance flagged too many large own defects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from imaging_ad.io.record import ImageRecord

#: the guard's distance threshold is this many times the largest leave-one-out training distance
DOMAIN_MARGIN = 1.5
#: mean absolute difference between colour channels (in 8-bit grey levels) above which content is colour
COLOUR_LEVELS = 1.0
#: a model counts as grey-only when at least this share of its training images had grey content
GREY_SHARE = 0.99


@dataclass(frozen=True)
class ImageFacts:
    """What the guard checks of one image beside its features."""

    colour: bool
    bit_depth: int
    modality: str | None

    @classmethod
    def of(cls, record: ImageRecord | np.ndarray) -> ImageFacts:
        pixels, meta = (record.pixels, record.meta) if isinstance(record, ImageRecord) else (record, None)
        bit_depth = meta.bit_depth if meta is not None else 8 * np.dtype(pixels.dtype).itemsize
        modality = meta.modality if meta is not None else None
        return cls(_colour_content(pixels), int(bit_depth), modality)


def _colour_content(pixels: np.ndarray) -> bool:
    if pixels.ndim < 3 or pixels.shape[2] < 3:
        return False
    sample = pixels[::4, ::4, :3].astype(np.float32)  # a sparse grid says it as well, 16x cheaper
    spread = float(sample.max() - sample.min())
    # in 8-bit grey levels: other depths and float images are measured against their own range
    scale = 1.0 if pixels.dtype == np.uint8 or spread == 0 else 255.0 / spread
    difference = np.abs(sample[..., 0] - sample[..., 1]) + np.abs(sample[..., 1] - sample[..., 2])
    return float(difference.mean()) * scale / 2 > COLOUR_LEVELS


@dataclass(frozen=True)
class TrainingFacts:
    """A summary of the training images' facts, saved with the model."""

    n_images: int
    colour_share: float
    bit_depths: tuple[int, ...]
    modalities: tuple[str, ...]

    @classmethod
    def of(cls, facts: list[ImageFacts]) -> TrainingFacts:
        n = max(len(facts), 1)
        return cls(
            n_images=len(facts),
            colour_share=sum(f.colour for f in facts) / n,
            bit_depths=tuple(sorted({f.bit_depth for f in facts})),
            modalities=tuple(sorted({f.modality for f in facts if f.modality})),
        )

    def merged(self, other: TrainingFacts) -> TrainingFacts:
        """The facts of both image sets (a site calibration adds the site's images)."""
        n = self.n_images + other.n_images
        return TrainingFacts(
            n_images=n,
            colour_share=(self.colour_share * self.n_images + other.colour_share * other.n_images)
            / max(n, 1),
            bit_depths=tuple(sorted(set(self.bit_depths) | set(other.bit_depths))),
            modalities=tuple(sorted(set(self.modalities) | set(other.modalities))),
        )

    def mismatches(self, facts: ImageFacts) -> list[str]:
        """Why an image with ``facts`` is not the kind the model saw (empty: it is)."""
        reasons = []
        if facts.colour and self.colour_share < 1 - GREY_SHARE:
            reasons.append("a colour image, but the model saw grey images only")
        if self.bit_depths and facts.bit_depth not in self.bit_depths:
            deep = max(self.bit_depths) > 8
            if (facts.bit_depth > 8) != deep:
                reasons.append(
                    f"a {facts.bit_depth}-bit image, but the model saw {'/'.join(map(str, self.bit_depths))}-bit images"
                )
        if self.modalities and facts.modality and facts.modality not in self.modalities:
            reasons.append(f"modality {facts.modality}, but the model saw {', '.join(self.modalities)}")
        return reasons

    def to_dict(self) -> dict:
        data = asdict(self)
        data["bit_depths"], data["modalities"] = list(self.bit_depths), list(self.modalities)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainingFacts:
        return cls(
            int(data["n_images"]),
            float(data["colour_share"]),
            tuple(int(b) for b in data["bit_depths"]),
            tuple(str(m) for m in data["modalities"]),
        )


def domain_verdict(
    distance: float | None, threshold: float | None, facts: ImageFacts | None, training: TrainingFacts | None
) -> tuple[float | None, tuple[str, ...]]:
    """(domain score: the feature distance over its threshold, above 1 outside; reasons the image is out of
    domain, empty when it is in)."""
    reasons = list(training.mismatches(facts)) if training is not None and facts is not None else []
    score = None
    if distance is not None and threshold:
        score = float(distance) / threshold
        if score > 1:
            reasons.append(f"its deep features are {score:.1f}x as far from the training images as allowed")
    return score, tuple(reasons)
