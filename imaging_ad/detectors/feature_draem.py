"""A synthetic-anomaly detector after DRAEM (Zavrtanik et al., "DRAEM — A discriminatively trained
reconstruction embedding for surface anomaly detection", ICCV 2021), in the backbone's feature space.

DRAEM pastes Perlin-noise-shaped patches of foreign texture into normal images; a reconstructive
network learns to give back the clean image, and a discriminative network, reading the corrupted image
beside its reconstruction, learns to segment what was pasted. Its anomaly map is that segmentation.
Here both networks work on the frozen backbone's feature maps instead of pixels (the teacher maps of
:mod:`~imaging_ad.detectors.reverse_distillation`):

- the synthetic anomalies are blobs (low-resolution noise, upsampled and thresholded: Perlin-like
  shapes of random size) in which the teacher's features are replaced, at a random opacity, by the
  features of another training image at a shifted position — foreign content taken from the training
  images themselves, never from a download;
- the reconstructive network is reverse distillation's bottleneck and student decoder, trained to give
  back the clean teacher maps from the corrupted ones;
- the discriminative head reads, at each position, the cosine distances between the (corrupted) teacher
  maps and their reconstruction, one per scale, and is trained to segment the blobs; it is monotone (a
  larger reconstruction failure never reads as more normal), and its output per position is the
  heatmap (standardised per position on held-out normals, as reverse distillation's).

The head sees only distances because every richer head tried learned the synthetic anomalies
themselves rather than what a failure to reconstruct looks like (see :class:`SegmentationHead`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imaging_ad.detectors.layers import resize_to
from imaging_ad.detectors.params import Interval, ParameterError
from imaging_ad.detectors.registry import register_detector
from imaging_ad.detectors.reverse_distillation import (
    ReverseDistillation,
    ReverseDistillationNetwork,
    cosine_distances,
)
from imaging_ad.detectors.trained import stage_channels


def blob_masks(
    count: int,
    grid: tuple[int, int],
    *,
    anomaly_probability: float,
    coverage: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``count`` masks (count, 1, h, w) in {0, 1}: smooth noise thresholded so that a random share in
    ``coverage`` of the grid is inside; each mask is empty with probability ``1 - anomaly_probability``.

    The noise is drawn on a coarse grid (2 to 8 cells a side, at random) and upsampled bicubically:
    Perlin-like blobs whose size and number vary from mask to mask."""
    h, w = grid
    low, high = coverage
    masks = torch.zeros(count, 1, h, w)
    for i in range(count):
        if float(torch.rand((), generator=generator)) >= anomaly_probability:
            continue
        cells = int(torch.randint(2, 9, (), generator=generator))
        noise = torch.randn(1, 1, cells, cells, generator=generator)
        smooth = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False).flatten()
        share = low + (high - low) * float(torch.rand((), generator=generator))
        inside = max(1, round(share * h * w))
        threshold = smooth.topk(inside).values[-1]
        masks[i, 0] = (smooth >= threshold).view(h, w).float()
    return masks


def paste_foreign_features(
    maps: list[torch.Tensor], masks: torch.Tensor, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Teacher maps (finest first) with the masked positions replaced, at a random opacity in [0.5, 1],
    by another image's features at a shifted position (the batch rolled by one, the grid rolled by a
    random offset that lands on whole cells of every scale)."""
    opacity = 0.5 + 0.5 * torch.rand(len(maps[0]), 1, 1, 1, generator=generator)
    coarsest_h, coarsest_w = maps[-1].shape[-2:]
    dy = int(torch.randint(0, max(1, coarsest_h), (), generator=generator))
    dx = int(torch.randint(0, max(1, coarsest_w), (), generator=generator))
    corrupted = []
    for m in maps:
        scale = round(m.shape[-2] / coarsest_h)  # cells of this grid per cell of the coarsest
        source = torch.roll(m.roll(1, dims=0), shifts=(dy * scale, dx * scale), dims=(2, 3))
        blend = opacity.to(m) * resize_to(masks.to(m), tuple(m.shape[-2:]))
        corrupted.append((1 - blend) * m + blend * source)
    return corrupted


class PositiveLinear(nn.Module):
    """A 1 x 1 convolution whose weights are kept positive (softplus of free parameters): its output
    never decreases when an input grows."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        start = math.log(math.expm1(1.0 / in_channels))  # softplus(start) = 1 / fan-in: the inputs' mean
        self.free_weight = nn.Parameter(start + 0.1 * torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, F.softplus(self.free_weight), self.bias)


class Standardise(nn.BatchNorm2d):
    """Batch normalisation without a learned scale (an increasing map: no learned sign can flip it). At
    inference written out as (x - mean) / std: ONNX's BatchNormalization needs the channel count known,
    and after the distances are resized and concatenated the exporter no longer knows it."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        shape = (1, -1, 1, 1)
        return (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)


class SegmentationHead(nn.Module):
    """Per-scale cosine distances of teacher and reconstruction at each position of the finest grid ->
    one logit per position (high = anomalous), monotone: a larger reconstruction failure never makes a
    position read as more normal.

    Why so constrained (measured, ``benchmarks/RESULTS.md``): a head that also read the teacher's and
    the student's features, as DRAEM's discriminator reads the image beside its reconstruction, learned
    what the pasted features look like and missed real defects (magnetic_tile image AUROC 0.76 where
    its own student's distances gave 0.92); a free head on the distances alone scored distances far
    above anything seen in training (a real defect) as normal, as networks extrapolate; one that mixed
    neighbouring positions (3 x 3) learned the synthetic blobs' size and put heatmap peaks beside small
    defects."""

    def __init__(self, scales: int, width: int, prior: float = 0.05) -> None:
        super().__init__()
        last = PositiveLinear(width, 1)
        # start at the prior share of anomalous positions: from 0 (even odds) the bias would take
        # thousands of steps to get there
        nn.init.constant_(last.bias, math.log(prior / (1 - prior)))
        self.layers = nn.Sequential(
            Standardise(scales),  # distances on a common scale
            PositiveLinear(scales, width),
            nn.LeakyReLU(0.2),
            PositiveLinear(width, width),
            nn.LeakyReLU(0.2),
            last,
        )

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        grid = tuple(teacher[0].shape[-2:])
        distances = [resize_to(d[:, None], grid) for d in cosine_distances(teacher, student)]
        return self.layers(torch.cat(distances, 1))[:, 0]


class FeatureDraemNetwork(nn.Module):
    """Reverse distillation's network as DRAEM's reconstructive part, plus the discriminative head."""

    def __init__(
        self, channels: list[int], strides: list[int], width: int, head_width: int, prior: float
    ) -> None:
        super().__init__()
        self.reconstruction = ReverseDistillationNetwork(channels, strides, width)
        self.segmentation = SegmentationHead(len(channels), head_width, prior)

    def forward(self, teacher: list[torch.Tensor]) -> torch.Tensor:
        """Teacher maps -> segmentation logits on the finest grid (B, h, w)."""
        return self.segmentation(teacher, self.reconstruction(teacher))


def expected_blob_share(anomaly_probability: float, coverage: tuple[float, float]) -> float:
    """The share of training positions inside a synthetic anomaly, on average: the head's prior."""
    return anomaly_probability * sum(coverage) / 2


def draem_loss(
    network: FeatureDraemNetwork,
    teacher: list[torch.Tensor],
    *,
    anomaly_probability: float,
    coverage: tuple[float, float],
    segmentation_weight: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Blobs pasted into clean teacher maps; the student's 1 - cosine to the clean maps (per scale,
    summed) plus ``segmentation_weight`` times the head's cross-entropy against the blobs."""
    masks = blob_masks(
        len(teacher[0]),
        tuple(teacher[0].shape[-2:]),
        anomaly_probability=anomaly_probability,
        coverage=coverage,
        generator=generator,
    ).to(teacher[0].device)
    corrupted = paste_foreign_features(teacher, masks, generator)
    student = network.reconstruction(corrupted)
    reconstruction = sum(d.mean() for d in cosine_distances(teacher, student))
    # the head learns from the student's output but does not train it: the student stays a pure
    # reconstructor of normal features
    logits = network.segmentation(corrupted, [s.detach() for s in student])
    return reconstruction + segmentation_weight * F.binary_cross_entropy_with_logits(logits, masks[:, 0])


@register_detector("feature_draem")
class FeatureDraem(ReverseDistillation):
    """DRAEM's reconstructive + discriminative pair on the backbone's features: blobs of other images'
    features pasted into normal teacher maps, a student trained to give back the clean maps, and a
    monotone segmentation head on their cosine distances trained to find the blobs; the head's output
    per position is the heatmap.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.reverse_distillation.
    ReverseDistillation`, whose teacher, bottleneck and decoder this reuses):

    head_width
        channels of the segmentation head.
    anomaly_probability
        share of training images that get a synthetic anomaly (the rest teach the head what clean looks
        like).
    coverage
        smallest and largest share of the grid one synthetic anomaly covers.
    segmentation_weight
        weight of the head's loss (binary cross-entropy per position) beside the student's (1 - cosine).
    """

    # recommended: over the six benchmark datasets its mean image AUROC, pixel AUROC and AUPRO are at
    # least PatchCore's (0.872 / 0.763 / 0.545 against 0.868 / 0.757 / 0.523, RESULTS.md 2026-12-03), level
    # with reverse distillation's; it costs minutes of training where PatchCore fits in seconds
    param_constraints = {
        "head_width": Interval(4, 512),
        "anomaly_probability": Interval(0, 1, "right"),
        "segmentation_weight": Interval(0, None, "neither"),
    }

    def __init__(
        self,
        *,
        head_width: int = 64,
        anomaly_probability: float = 0.5,
        coverage: tuple[float, float] = (0.02, 0.25),
        segmentation_weight: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.head_width = head_width
        self.anomaly_probability = anomaly_probability
        # a list from a JSON file or the CLI; anything else is left for validate_params to refuse by name
        self.coverage = tuple(coverage) if isinstance(coverage, list) else coverage
        self.segmentation_weight = segmentation_weight

    @classmethod
    def params_of_older_files(cls, params: dict) -> dict:
        return params  # every file of this detector has every option

    def validate_params(self) -> None:
        super().validate_params()
        coverage = self.coverage
        if not (isinstance(coverage, tuple) and len(coverage) == 2 and 0 < coverage[0] <= coverage[1] < 1):
            raise ParameterError(
                f"feature_draem: coverage must be two shares of the grid, smallest first, both in (0, 1) "
                f"(e.g. (0.02, 0.25)), got {coverage!r}"
            )

    def _build_network(self) -> nn.Module:
        return FeatureDraemNetwork(
            stage_channels(self),
            list(self.feature_strides),
            self.width,
            self.head_width,
            prior=expected_blob_share(self.anomaly_probability, self.coverage),
        )

    def _draem_loss(self, batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return draem_loss(
            self.network_,
            self._teacher_maps(batch),
            anomaly_probability=self.anomaly_probability,
            coverage=self.coverage,
            segmentation_weight=self.segmentation_weight,
            generator=generator,
        )

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self._draem_loss(batch, None)  # the global generator, seeded by fit

    def _validation_loss(self, batch: torch.Tensor) -> float:
        # the same synthetic anomalies every epoch, so that early stopping compares epochs, not draws
        return float(self._draem_loss(batch, torch.Generator().manual_seed(self.seed + len(batch))))

    def _input_maps(self, inputs: torch.Tensor) -> torch.Tensor:
        """Cached teacher rows -> the head's logits per position (B, h, w): high = anomalous."""
        return self.network_([m.float() for m in self._teacher_maps(inputs)])
