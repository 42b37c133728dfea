"""Reverse distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022), sized for a CPU.

The frozen pretrained backbone is the teacher. Its feature maps at three scales (strides 4, 8 and 16)
are fused by a trainable one-class bottleneck into one compact embedding on a coarser grid, and a
trainable student decoder reconstructs the teacher's maps from it, coarse to fine. Trained on normal
images only, the student learns to reproduce normal content; where the teacher sees something the
embedding cannot carry — a crack, a lesion — the student's features point elsewhere. The heatmap is
one minus the cosine similarity of teacher and student per position, summed over the three scales on
the finest grid (optionally standardised per position on held-out normals, ``position_statistics``); the
image score is the mean of its highest ``top_fraction`` of positions.

Unlike the paper (a WideResNet-50 teacher, a ResNet decoder, 200 epochs on a GPU), the teacher here
is whatever backbone the registry serves (EfficientNet-Lite offline), and the bottleneck and decoder
are a few convolution blocks (``width``) so that an epoch over 700 images at 256 px takes seconds on
two cores; the teacher's features are cached once, so epochs cost only the small student. The
cosine compares the teacher's raw features, as in the paper: standardising each channel first was
measured worse (magnetic_tile image AUROC 0.58 against 0.74), because it lifts channels that carry
mostly noise to the same weight as the informative ones and the student cannot predict noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imaging_ad.detectors.layers import conv_block, resize_to
from imaging_ad.detectors.params import Interval
from imaging_ad.detectors.registry import register_detector
from imaging_ad.detectors.trained import MapScoredDetector, stage_channels


class OneClassBottleneck(nn.Module):
    """Teacher maps at several strides -> one embedding at twice the coarsest stride.

    Each scale is brought to the coarsest grid by strided 3 x 3 blocks (one per halving), the scales
    are concatenated and fused by a strided block: the "one-class embedding" the student decodes."""

    def __init__(self, channels: list[int], strides: list[int], width: int, embedding: int) -> None:
        super().__init__()
        coarsest = max(strides)
        branches = []
        for c, s in zip(channels, strides, strict=True):
            halvings = round(math.log2(coarsest / s))
            layers = [conv_block(c if i == 0 else width, width, stride=2) for i in range(halvings)]
            branches.append(nn.Sequential(*layers) if layers else conv_block(c, width, kernel=1))
        self.branches = nn.ModuleList(branches)
        self.fuse = nn.Sequential(
            conv_block(width * len(channels), embedding, stride=2), conv_block(embedding, embedding)
        )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        grid = maps[-1].shape[-2:]  # odd grids: strided convs round; every branch meets on the coarsest
        return self.fuse(
            torch.cat([resize_to(b(m), grid) for b, m in zip(self.branches, maps, strict=True)], 1)
        )


class StudentDecoder(nn.Module):
    """Embedding -> one reconstructed teacher map per scale, coarsest first, doubling the grid each time
    (bilinear upsampling then 3 x 3 blocks: cheaper than transposed convolutions, and no checkerboard)."""

    def __init__(self, channels: list[int], embedding: int, widths: list[int]) -> None:
        super().__init__()
        stages, heads, previous = [], [], embedding
        for c, w in zip(reversed(channels), reversed(widths), strict=True):
            stages.append(nn.Sequential(conv_block(previous, w), conv_block(w, w)))
            heads.append(nn.Conv2d(w, c, 1))
            previous = w
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, embedding: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        x, outputs = embedding, []
        for stage, head, grid in zip(self.stages, self.heads, reversed(grids), strict=True):
            x = stage(F.interpolate(x, size=grid, mode="bilinear", align_corners=False))
            outputs.append(head(x))
        return outputs[::-1]  # finest first, like the teacher's maps


class ReverseDistillationNetwork(nn.Module):
    def __init__(self, channels: list[int], strides: list[int], width: int) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(len(strides))]  # finest scale narrowest: it costs most
        embedding = 2 * widths[-1]
        self.bottleneck = OneClassBottleneck(channels, strides, widths[-1], embedding)
        self.decoder = StudentDecoder(channels, embedding, widths)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(self.bottleneck(maps), [tuple(m.shape[-2:]) for m in maps])


@register_detector("reverse_distillation")
class ReverseDistillation(MapScoredDetector):
    """A student decoder that reconstructs the frozen backbone's multi-scale features from a one-class
    bottleneck; 1 - cosine(teacher, student) per position, summed over scales, is the heatmap.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.trained.MapScoredDetector`):

    width
        channels of the decoder's finest stage (coarser stages get more); sets the network's cost.
    epochs, learning_rate, patience, train_batch_size
        as :class:`~imaging_ad.detectors.trained.TrainedDetector`'s, with this network's defaults: small
        batches (8), since on a CPU more, smaller steps learn more from the same time budget.
    position_statistics
        off by default here: over the six benchmark datasets the raw map ranked images as well (mean image
        AUROC 0.794 against 0.791) and localised better (AUPRO 0.594 against 0.574); the statistics help on
        chest_xray (0.870 against 0.803) but cost head_ct, whose few held-out normals cannot estimate a
        spread per position (0.763 against 0.874). ``benchmarks/RESULTS.md``, 2026-12-03.
    """

    feature_strides = (4, 8, 16)
    recommended = False
    not_recommended_because = (
        "mean image AUROC 0.79 over the six benchmark datasets against PatchCore's 0.87 (8-minute training "
        "cap on 2 CPU cores), though its mean AUPRO is higher (0.59 against 0.52)"
    )
    param_constraints = {"width": Interval(4, 512)}

    def __init__(
        self,
        *,
        width: int = 32,
        epochs: int = 60,
        learning_rate: float = 2e-3,
        patience: int = 8,
        train_batch_size: int = 8,
        position_statistics: bool = False,
        **kwargs,
    ) -> None:
        # small batches: on a CPU the budget is compute, and more, smaller steps learn more from it
        super().__init__(
            position_statistics=position_statistics,
            epochs=epochs,
            learning_rate=learning_rate,
            patience=patience,
            train_batch_size=train_batch_size,
            **kwargs,
        )
        self.width = width
        self._grids: list[tuple[int, int]] | None = None

    def _build_network(self) -> nn.Module:
        return ReverseDistillationNetwork(stage_channels(self), list(self.feature_strides), self.width)

    # the cache holds every scale of an image flattened into one row; _teacher_maps splits it again
    def _training_inputs(self, features: list[torch.Tensor]) -> torch.Tensor:
        self._grids = [tuple(int(n) for n in f.shape[-2:]) for f in features]
        return torch.cat([f.flatten(1) for f in features], 1)

    def _teacher_maps(self, rows: torch.Tensor) -> list[torch.Tensor]:
        sizes = [c * h * w for c, (h, w) in zip(stage_channels(self), self._grids, strict=True)]
        return [
            part.reshape(-1, c, h, w)  # -1: an exported graph keeps a dynamic batch
            for part, c, (h, w) in zip(rows.split(sizes, 1), stage_channels(self), self._grids, strict=True)
        ]

    def _distances(self, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher maps -> 1 - cosine(teacher, student) per position, one map per scale."""
        student = self.network_(teacher)
        return [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student, strict=True)]

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return sum(d.mean() for d in self._distances(self._teacher_maps(batch)))

    def _input_maps(self, inputs: torch.Tensor) -> torch.Tensor:
        distances = self._distances([m.float() for m in self._teacher_maps(inputs)])
        grid = distances[0].shape[-2:]
        return sum(resize_to(d[:, None], grid)[:, 0] for d in distances)
