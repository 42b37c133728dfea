"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Normal images -> locally aggregated mid-level patch features -> memory bank reduced by greedy coreset.
A test patch's anomaly score is its distance to the nearest memory-bank patch; the image score is the
largest patch score, re-weighted by how isolated its nearest neighbour is in the bank.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.coreset import StreamingCoreset
from imaging_ad.detectors.registry import register_detector

# Below this many memory-bank rows an exact search is about as fast as a graph search.
_EXACT_SEARCH_LIMIT = 4096


@register_detector("patchcore")
class PatchCore(Detector):
    # Strides 16 and 32 of EfficientNet-Lite measured best on magnetic_tile (image AUROC 0.936 vs 0.873
    # for strides 8 and 16, see benchmarks/RESULTS.md); the coarser grid also means 4x fewer queries.
    feature_strides = (16, 32)

    def __init__(
        self,
        *,
        coreset_ratio: float = 0.1,
        max_memory_bank: int = 20_000,
        projection_dim: int = 128,
        neighbourhood: int = 3,
        reweight_neighbours: int = 9,
        chunk_images: int = 16,
        search: str = "auto",
        hnsw_ef_search: int = 16,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.coreset_ratio = coreset_ratio
        self.max_memory_bank = max_memory_bank
        self.projection_dim = projection_dim
        self.neighbourhood = neighbourhood
        self.reweight_neighbours = reweight_neighbours
        self.chunk_images = chunk_images
        self.search = search
        self.hnsw_ef_search = hnsw_ef_search
        self.memory_bank_: torch.Tensor | None = None

    # -- features -------------------------------------------------------------------------------

    def _embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps -> (B, D, h, w) patch embeddings on the finest selected stage's grid."""
        k = self.neighbourhood
        pooled = [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in features]
        grid = pooled[0].shape[-2:]
        pooled = [pooled[0]] + [
            F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in pooled[1:]
        ]
        return torch.cat(pooled, dim=1)

    # -- fit ------------------------------------------------------------------------------------

    def _fit_stream(self, batches: Iterator[list[torch.Tensor]], n_images: int) -> None:
        coreset: StreamingCoreset | None = None
        for features in batches:
            embedding = self._embed(features)
            b, d, h, w = embedding.shape
            if coreset is None:
                total = n_images * h * w
                bank_size = max(1, min(round(self.coreset_ratio * total), self.max_memory_bank))
                coreset = StreamingCoreset(
                    bank_size, total, self.chunk_images * h * w, self.projection_dim, self.seed
                )
            coreset.add(embedding.permute(0, 2, 3, 1).reshape(-1, d).float())
        self.memory_bank_ = coreset.result().contiguous()
        self._build_index()

    def _build_index(self) -> None:
        """faiss on CPU: exact for small banks, HNSW graph search for large ones (measured 99.7% of
        nearest neighbours exact at efSearch=16 on magnetic-tile features, 5x faster than exact).
        On GPU a plain matrix product is fastest."""
        self._index = None
        if self.device_.type != "cpu":
            return
        if self.search not in ("auto", "flat", "hnsw"):
            raise ValueError(f"search must be 'auto', 'flat' or 'hnsw', got {self.search!r}")
        bank = self.memory_bank_.cpu().numpy().astype(np.float32)
        use_hnsw = self.search == "hnsw" or (self.search == "auto" and bank.shape[0] > _EXACT_SEARCH_LIMIT)
        if use_hnsw:
            self._index = faiss.IndexHNSWFlat(bank.shape[1], 32)
            self._index.hnsw.efConstruction = 64
            self._index.add(bank)
            self._index.hnsw.efSearch = self.hnsw_ef_search
        else:
            self._index = faiss.IndexFlatL2(bank.shape[1])
            self._index.add(bank)

    # -- score ----------------------------------------------------------------------------------

    def _nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distance to, and index of, the nearest memory-bank row for each query row."""
        if self._index is not None:
            distances, indices = self._index.search(queries.float().cpu().numpy(), 1)
            distances = torch.from_numpy(distances[:, 0]).clamp_min_(0).sqrt_()
            return distances.to(queries.device), torch.from_numpy(indices[:, 0]).to(queries.device)
        bank = self.memory_bank_
        squared = (queries * queries).sum(1, keepdim=True) - 2 * queries @ bank.T + (bank * bank).sum(1)
        distances, indices = squared.min(dim=1)
        return distances.clamp_min_(0).sqrt_(), indices

    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self._embed(features)
        b, d, h, w = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, d).float()
        distances, indices = self._nearest(queries)
        patch_scores = distances.view(b, h * w)
        nearest = indices.view(b, h * w)
        if isinstance(self._index, faiss.IndexHNSWFlat):
            self._make_maximum_exact(queries.view(b, h * w, d), patch_scores, nearest)
        scores = self._reweighted_image_scores(queries.view(b, h * w, d), patch_scores, nearest)
        return scores, patch_scores.view(b, h, w)

    def _make_maximum_exact(
        self, queries: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor
    ) -> None:
        """Graph search can only overestimate a distance, and the image score is a maximum, so a rare miss
        would inflate it. Recompute the top patches exactly until the maximum is an exact distance."""
        exact = torch.zeros_like(patch_scores, dtype=torch.bool)
        rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)[:, None]
        bank = self.memory_bank_
        bank_norms = (bank * bank).sum(1)
        for _ in range(4):
            if exact[rows[:, 0], patch_scores.argmax(dim=1)].all():
                return
            candidates = (
                patch_scores.masked_fill(exact, -1.0).topk(min(8, patch_scores.shape[1]), dim=1).indices
            )
            q = queries[rows, candidates]  # (B, k, D)
            squared = (q * q).sum(-1, keepdim=True) - 2 * q @ bank.T + bank_norms
            best, where = squared.min(dim=-1)
            patch_scores[rows, candidates] = best.clamp_min(0).sqrt()
            nearest[rows, candidates] = where
            exact[rows, candidates] = True

    def _reweighted_image_scores(
        self, queries: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor
    ) -> torch.Tensor:
        """PatchCore eq. 7: s = (1 - softmax over the bank neighbourhood of m*) * max patch distance."""
        max_scores, where = patch_scores.max(dim=1)
        b = self.reweight_neighbours
        if b <= 1 or self.memory_bank_.shape[0] <= b:
            return max_scores
        bank = self.memory_bank_
        rows = torch.arange(queries.shape[0], device=queries.device)
        test_patch = queries[rows, where]  # (B, D)
        bank_nearest = bank[nearest[rows, where]]  # m*, (B, D)
        # b nearest bank rows to m* (m* itself first), then the test patch's distances to them
        neighbours = torch.cdist(bank_nearest, bank).topk(b, largest=False).indices  # (B, b)
        distances = torch.linalg.vector_norm(test_patch[:, None] - bank[neighbours], dim=2)  # (B, b)
        weight = 1 - torch.softmax(distances, dim=1)[:, 0]
        return weight * max_scores

    # -- persistence ----------------------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank_}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.memory_bank_ = tensors["memory_bank"].to(self.device_).float().contiguous()
        self._build_index()
