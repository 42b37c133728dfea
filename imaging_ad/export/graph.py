"""One ``torch.nn.Module`` per fitted detector: preprocessed images -> (scores, smoothed heatmaps).

The graph is what ``Detector.score_tensor`` computes, written with operations that ONNX and TorchScript
can express: the frozen backbone, the detector's head (a registry keyed by detector name, one builder
per detector), then the detector's ``_smooth`` (bilinear upsampling to the model input and
``cv2.GaussianBlur`` as a fixed separable convolution with reflect-101 borders). Every head mirrors its
detector's ``_score`` line by line; ``tests/test_export.py`` holds them to the checkpoint's numbers.

Shapes are fixed at export (the model input is ``image_size`` square) except the batch dimension.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TypeVar

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imaging_ad.detectors.base import Detector
from imaging_ad.export.errors import ExportError

HeadBuilder = Callable[[Detector, list[tuple[int, int]]], nn.Module]
B = TypeVar("B", bound=HeadBuilder)

#: detector name -> builder of its exportable head (fitted detector, feature-map sizes) -> module
HEADS: dict[str, HeadBuilder] = {}
#: detector name -> the detector made exact where it approximates (what the graph must equal)
EXACT_REFERENCES: dict[str, Callable[[Detector], Detector]] = {}


def register_head(
    name: str, *, exact_reference: Callable[[Detector], Detector] | None = None
) -> Callable[[B], B]:
    """Register the exportable head of the detector registered under ``name``. ``exact_reference`` turns
    a fitted detector into one without approximations the graph does not share (for verification)."""

    def decorate(builder: B) -> B:
        if name in HEADS:
            raise ValueError(f"an export head for {name!r} is already registered")
        HEADS[name] = builder
        if exact_reference is not None:
            EXACT_REFERENCES[name] = exact_reference
        return builder

    return decorate


def exact_reference(detector: Detector) -> Detector:
    """``detector``, or a copy of it computing exactly what its export graph computes."""
    make = EXACT_REFERENCES.get(detector.name)
    return make(detector) if make is not None else detector


def exportable_detectors() -> list[str]:
    return sorted(HEADS)


class ExportGraph(nn.Module):
    """Backbone + detector head + heatmap smoothing, on the CPU in float32."""

    def __init__(self, extractor: nn.Module, head: nn.Module, smoothing: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head
        self.smoothing = smoothing

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = self.head(self.extractor(images))
        return scores, self.smoothing(maps)


def build_graph(detector: Detector) -> ExportGraph:
    """The export graph of a fitted detector (the detector itself is left untouched)."""
    builder = HEADS.get(detector.name)
    if builder is None:
        raise ExportError(
            f"detector {detector.name!r} has no exportable head (exportable: {', '.join(exportable_detectors())}); "
            "its scoring is not written as a fixed tensor graph — use the checkpoint with imaging-ad predict"
        )
    detector._check_fitted()
    extractor = detector.extractor_
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in extractor.parameters()):
        # a CPU float32 copy: the graph runs on the CPU, and the caller's detector must not move
        extractor = copy.deepcopy(extractor).cpu().float().eval()
    size = detector.preprocessor_.image_size
    with torch.inference_mode():
        shapes = [tuple(f.shape[-2:]) for f in extractor(torch.zeros(1, 3, size, size))]
    head = builder(detector, shapes)
    smoothing = GaussianSmoothing(size, detector.blur_sigma)
    return ExportGraph(extractor, head.eval(), smoothing).eval().requires_grad_(False)


def _buffer(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype).contiguous().clone()


# -- heatmap smoothing ---------------------------------------------------------------------------


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel ``cv2.GaussianBlur(ksize=(0, 0), sigmaX=sigma)`` uses on float images:
    size ``round(8 sigma + 1) | 1``, weights ``exp(-x^2 / (2 sigma^2))`` normalised, in float32."""
    size = int(round(sigma * 4 * 2 + 1)) | 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-(x * x) / (2 * sigma * sigma))
    return (weights / weights.sum()).astype(np.float32)


class GaussianSmoothing(nn.Module):
    """``Detector._smooth``: (B, h, w) -> bilinear (half-pixel) to (B, S, S) -> Gaussian blur, reflect-101."""

    def __init__(self, image_size: int, sigma: float) -> None:
        super().__init__()
        self.image_size = image_size
        self.blur = sigma > 0
        kernel = torch.from_numpy(gaussian_kernel(sigma) if self.blur else np.ones(1, np.float32))
        self.radius = kernel.numel() // 2
        if self.radius >= image_size:
            raise ExportError(
                f"blur_sigma={sigma} needs a {kernel.numel()}-pixel kernel, wider than the {image_size}-pixel "
                "heatmap: reflected borders are undefined"
            )
        self.register_buffer("horizontal", kernel.view(1, 1, 1, -1).clone())
        self.register_buffer("vertical", kernel.view(1, 1, -1, 1).clone())

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        x = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
        if self.blur:
            r = self.radius
            x = F.pad(x, (r, r, r, r), mode="reflect")  # torch "reflect" is OpenCV's BORDER_REFLECT_101
            x = F.conv2d(F.conv2d(x, self.horizontal), self.vertical)  # rows first, as cv2.sepFilter2D
        return x[:, 0]


# -- PatchCore -----------------------------------------------------------------------------------


class PatchCoreHead(nn.Module):
    """``PatchCore._score`` with exact nearest-neighbour search.

    Squared distances expand as ``|q|^2 - 2 q.m + |m|^2`` (the formula of ``PatchCore._nearest``'s matrix
    path and of faiss' flat index). ``|m|^2 - 2 q.m`` for the whole bank is one GEMM (``addmm``, an ONNX
    ``Gemm`` reading the bank in place, so the file holds it once); ``|q|^2`` is the same for every bank row,
    so it is added after the min. The image score is ``PatchCore._reweighted_image_scores``: the largest
    patch distance (standardised per position when the detector has positional statistics) times
    ``1 - softmax`` over the test patch's distances to the ``b`` bank rows nearest its nearest bank row
    ``m*``, looked up in the detector's stored neighbourhood table.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        bank_neighbours: torch.Tensor,
        neighbourhood: int,
        reweight_neighbours: int,
        checkpoint_search: str = "exact",
        position_mean: torch.Tensor | None = None,
        position_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        bank = _buffer(bank)
        self.checkpoint_search = checkpoint_search
        self.neighbourhood = neighbourhood
        self.reweight = (
            reweight_neighbours if reweight_neighbours > 1 and bank.shape[0] > reweight_neighbours else 0
        )
        self.register_buffer("bank", bank)
        self.register_buffer("bank_norms", (bank * bank).sum(1))
        self.register_buffer(
            "bank_neighbours", bank_neighbours[:, : max(self.reweight, 1)].long().contiguous()
        )
        self.standardise = position_mean is not None
        if self.standardise:
            self.register_buffer("position_mean", _buffer(position_mean))
            self.register_buffer("position_std", _buffer(position_std))

    def export_notes(self) -> dict:
        return {
            "nearest_neighbour_search": "exact: squared distances to every memory-bank row by matrix product, then min",
            "memory_bank_rows": int(self.bank.shape[0]),
            "checkpoint_search": self.checkpoint_search,
        }

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.neighbourhood
        pooled = [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in features]
        grid = (int(pooled[0].shape[-2]), int(pooled[0].shape[-1]))
        pooled = [pooled[0]] + [
            F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in pooled[1:]
        ]
        embedding = torch.cat(pooled, dim=1)
        d = int(self.bank.shape[1])
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, d)
        partial = torch.addmm(self.bank_norms, queries, self.bank.T, alpha=-2)  # |m|^2 - 2 q.m
        partial_min, nearest = partial.min(dim=1)
        nearest_squared = partial_min + (queries * queries).sum(1)
        patch_scores = nearest_squared.clamp_min(0).sqrt().reshape(-1, grid[0] * grid[1])
        maps = patch_scores.reshape(-1, grid[0], grid[1])
        ranked = (patch_scores - self.position_mean) / self.position_std if self.standardise else patch_scores
        max_scores, where = ranked.max(dim=1)
        if not self.reweight:
            return max_scores, maps
        nearest = nearest.reshape(-1, grid[0] * grid[1])
        test_patch = queries.reshape(-1, grid[0] * grid[1], d).gather(
            1, where.reshape(-1, 1, 1).expand(-1, 1, d)
        )[:, 0]  # (B, D)
        m_star = nearest.gather(1, where[:, None])[:, 0]
        neighbours = self.bank_neighbours.index_select(0, m_star)  # (B, b), m* first
        rows = self.bank.index_select(0, neighbours.reshape(-1)).reshape(-1, self.reweight, d)
        difference = test_patch[:, None] - rows
        distances = (difference * difference).sum(2).sqrt()
        weight = 1 - torch.softmax(distances, dim=1)[:, 0]
        return weight * max_scores, maps


def _patchcore_search(detector: Detector) -> str:
    index = getattr(detector, "_index", None)
    if index is None:
        return "exact (matrix product)"
    if isinstance(index, faiss.IndexHNSWFlat):
        return (
            f"approximate: faiss HNSW (efSearch={detector.hnsw_ef_search}), with the top patches recomputed "
            "exactly, so image scores are exact but other heatmap cells may be overestimated"
        )
    return "exact (faiss flat index)"


def _patchcore_exact(detector: Detector) -> Detector:
    """PatchCore searching exactly (a shallow copy with a flat index) when it uses HNSW."""
    if not isinstance(getattr(detector, "_index", None), faiss.IndexHNSWFlat):
        return detector
    exact = copy.copy(detector)
    exact.search = "flat"
    exact._build_index()
    return exact


@register_head("patchcore", exact_reference=_patchcore_exact)
def _patchcore_head(detector: Detector, shapes: list[tuple[int, int]]) -> nn.Module:
    return PatchCoreHead(
        detector.memory_bank_,
        detector.bank_neighbours_,
        detector.neighbourhood,
        detector.reweight_neighbours,
        _patchcore_search(detector),
        detector.position_mean_,
        detector.position_std_,
    )


# -- PaDiM ---------------------------------------------------------------------------------------


def _pooling_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(out, in) averaging weights of ``adaptive_avg_pool`` along one axis (bins floor/ceil as torch)."""
    weights = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, math.ceil((i + 1) * size_in / size_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


class _ToGrid(nn.Module):
    """PaDiM's resampling of one stage to the ``size`` grid: adaptive average pooling for finer maps
    (a plain average pool when the sizes divide, else the same bins as two small matrix products),
    bilinear interpolation for coarser ones."""

    def __init__(self, shape: tuple[int, int], size: int) -> None:
        super().__init__()
        self.size = size
        height, width = shape
        self.mode = "same"
        if width > size:
            if height % size == 0 and width % size == 0:
                self.mode, self.kernel = "pool", (height // size, width // size)
            else:
                self.mode = "matrix"
                self.register_buffer("rows", _pooling_matrix(height, size))
                self.register_buffer("cols", _pooling_matrix(width, size).T.contiguous())
        elif width < size:
            self.mode = "upsample"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pool":
            return F.avg_pool2d(x, self.kernel, stride=self.kernel)
        if self.mode == "matrix":
            return self.rows @ x @ self.cols
        if self.mode == "upsample":
            return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


class PaDiMHead(nn.Module):
    """``PaDiM._score``: per-position Mahalanobis distance on the selected channels."""

    def __init__(
        self,
        shapes: list[tuple[int, int]],
        size: int,
        channel_index: torch.Tensor,
        mean: torch.Tensor,
        inverse_covariance: torch.Tensor,
    ) -> None:
        super().__init__()
        self.size = size
        self.to_grid = nn.ModuleList(_ToGrid(shape, size) for shape in shapes)
        self.register_buffer("channel_index", _buffer(channel_index, torch.long))
        self.register_buffer("mean", _buffer(mean)[:, None])  # (P, 1, d)
        self.register_buffer("inverse_covariance", _buffer(inverse_covariance))

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = torch.cat(
            [resample(f) for resample, f in zip(self.to_grid, features, strict=True)], dim=1
        )
        embedding = embedding.index_select(1, self.channel_index)
        d = int(self.channel_index.shape[0])
        # (P, B, d), contiguous before the batched product as in PaDiM._score (strided: 2-4x slower)
        delta = embedding.permute(2, 3, 0, 1).reshape(self.size * self.size, -1, d).contiguous() - self.mean
        squared = (torch.bmm(delta, self.inverse_covariance) * delta).sum(-1)  # (P, B)
        maps = squared.clamp_min(0).sqrt().T.reshape(-1, self.size, self.size)
        return maps.flatten(1).max(dim=1).values, maps


@register_head("padim")
def _padim_head(detector: Detector, shapes: list[tuple[int, int]]) -> nn.Module:
    size = detector.preprocessor_.image_size // detector.grid_stride
    return PaDiMHead(shapes, size, detector.channel_index_, detector.mean_, detector.inverse_covariance_)


# -- pooled deep-feature Gaussian (dfm) ----------------------------------------------------------


class PooledGaussianHead(nn.Module):
    """``PooledGaussian._score``: Mahalanobis distance of the pooled (mean, std) features for the score,
    of every patch vector for the map."""

    def __init__(
        self,
        shapes: list[tuple[int, int]],
        pool_std: bool,
        image_mean: torch.Tensor,
        image_precision: torch.Tensor,
        patch_mean: torch.Tensor,
        patch_precision: torch.Tensor,
    ) -> None:
        super().__init__()
        self.grid = shapes[0]
        self.pool_std = pool_std
        self.register_buffer("image_mean", _buffer(image_mean))
        self.register_buffer("image_precision", _buffer(image_precision))
        self.register_buffer("patch_mean", _buffer(patch_mean))
        self.register_buffer("patch_precision", _buffer(patch_precision))

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stats = [f.mean(dim=(2, 3)) for f in features]
        if self.pool_std:
            # torch.std (Bessel-corrected) spelled out: ONNX has no standard-deviation operator
            for f in features:
                n = int(f.shape[-2]) * int(f.shape[-1])
                centred = f - f.mean(dim=(2, 3), keepdim=True)
                stats.append(((centred * centred).sum(dim=(2, 3)) / (n - 1)).sqrt())
        delta = torch.cat(stats, dim=1) - self.image_mean
        scores = ((delta @ self.image_precision) * delta).sum(1).clamp_min(0).sqrt()
        maps = [features[0]] + [
            F.interpolate(f, size=self.grid, mode="bilinear", align_corners=False) for f in features[1:]
        ]
        patches = torch.cat(maps, dim=1)
        d = int(self.patch_mean.shape[0])
        x = patches.permute(0, 2, 3, 1).reshape(-1, d) - self.patch_mean
        maps = ((x @ self.patch_precision) * x).sum(1).clamp_min(0).sqrt().reshape(-1, *self.grid)
        return scores, maps


@register_head("dfm")
def _dfm_head(detector: Detector, shapes: list[tuple[int, int]]) -> nn.Module:
    return PooledGaussianHead(
        shapes,
        detector.pool_std,
        detector.image_mean_,
        detector.image_precision_,
        detector.patch_mean_,
        detector.patch_precision_,
    )


# -- ensemble ------------------------------------------------------------------------------------


class EnsembleHead(nn.Module):
    """``Ensemble._score``: every member's head on its own stages of the shared backbone pass, each
    member's scores and maps standardised with its normal-image statistics, maps brought to the finest
    member grid, then averaged."""

    def __init__(
        self,
        heads: list[nn.Module],
        positions: list[list[int]],
        normalization: torch.Tensor,
        grid: tuple[int, int],
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.positions = [list(p) for p in positions]
        self.grid = grid
        self.register_buffer("normalization", _buffer(normalization))  # (members, 4)

    def export_notes(self) -> dict:
        notes: dict = {}
        for head in self.heads:
            notes.update(getattr(head, "export_notes", dict)())
        return notes

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        total_scores, total_maps = None, None
        for i, (head, positions) in enumerate(zip(self.heads, self.positions, strict=True)):
            scores, maps = head([features[p] for p in positions])
            maps = F.interpolate(maps[:, None], size=self.grid, mode="bilinear", align_corners=False)[:, 0]
            s_mean, s_std, p_mean, p_std = self.normalization[i]
            scores = (scores - s_mean) / s_std
            maps = (maps - p_mean) / p_std
            total_scores = scores if total_scores is None else total_scores + scores
            total_maps = maps if total_maps is None else total_maps + maps
        return total_scores / len(self.heads), total_maps / len(self.heads)


def _ensemble_exact(detector: Detector) -> Detector:
    exact = copy.copy(detector)
    exact.members_ = [exact_reference(member) for member in detector.members_]
    return exact


@register_head("ensemble", exact_reference=_ensemble_exact)
def _ensemble_head(detector: Detector, shapes: list[tuple[int, int]]) -> nn.Module:
    heads = []
    for member, positions in zip(detector.members_, detector._positions, strict=True):
        builder = HEADS.get(member.name)
        if builder is None:
            raise ExportError(
                f"ensemble member {member.name!r} has no exportable head (exportable: "
                f"{', '.join(exportable_detectors())}); the ensemble cannot be exported"
            )
        heads.append(builder(member, [shapes[p] for p in positions]).eval())
    size = detector.preprocessor_.image_size
    with torch.inference_mode():  # every member's map size, for the common (finest) grid
        features = [
            f.cpu().float()
            for f in detector.extractor_(torch.zeros(1, 3, size, size, device=detector.device_))
        ]
        grids = [
            tuple(head([features[p] for p in positions])[1].shape[-2:])
            for head, positions in zip(heads, detector._positions, strict=True)
        ]
    grid = max(grids, key=lambda hw: hw[0] * hw[1])
    return EnsembleHead(heads, detector._positions, detector.normalization_, grid)
