"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Normal images -> locally aggregated mid-level patch features -> memory bank reduced by greedy coreset.
A test patch's anomaly score is its distance to the nearest memory-bank patch; the image score is the
largest patch score, re-weighted by how isolated its nearest neighbour is in the bank.

One addition to the paper: the image score ranks patches by their distance *standardised per position*
with statistics of held-out normal images (the ones calibration uses anyway). Some positions (image
borders, the edges of stretched objects) are far from the bank even in normal images, so the plain
maximum lands there and hides a real defect elsewhere; standardising lifted image AUROC from 0.946 to
0.970 on magnetic_tile and from 0.852 to 0.874 on chest_xray (benchmarks/RESULTS.md). Heatmaps stay
plain distances, which localise better.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.coreset import StreamingCoreset
from imaging_ad.detectors.features import patch_grid
from imaging_ad.detectors.inputs import ImageInput
from imaging_ad.detectors.registry import register_detector

# Below this many memory-bank rows an exact search is about as fast as a graph search.
_EXACT_SEARCH_LIMIT = 4096
# With fewer held-out normals per-position statistics are too noisy to standardise by.
_MIN_IMAGES_FOR_POSITION_STATISTICS = 8
# Each image's top patches searched again at this wider beam before the exact passes (see
# _search_top_again): 8 and 32 left those passes a quarter of the rows on magnetic_tile.
_TOP_PATCHES_SEARCHED_AGAIN = 8
_WIDER_EF_SEARCH = 32


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
        # selection costs chunk rows x chunk share, so 8-image chunks halve 16-image ones' time
        # (same accuracy on magnetic_tile to +-0.001, benchmarks/RESULTS.md)
        chunk_images: int = 8,
        search: str = "auto",
        hnsw_links: int = 16,
        hnsw_ef_search: int = 8,
        position_statistics: bool = True,
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
        self.hnsw_links = hnsw_links
        self.hnsw_ef_search = hnsw_ef_search
        self.position_statistics = position_statistics
        self.memory_bank_: torch.Tensor | None = None
        self.bank_neighbours_: torch.Tensor | None = None
        # per-position mean and spread of held-out normals' patch distances, (h * w,) each
        self.position_mean_: torch.Tensor | None = None
        self.position_std_: torch.Tensor | None = None
        # while calibrating: each held-out batch's patch distances and re-weighting factors
        self._held_out_maps: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- features -------------------------------------------------------------------------------

    def _embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps -> (B, D, h, w) patch embeddings on the finest selected stage's grid."""
        k = self.neighbourhood
        return patch_grid(
            [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in features]
        )

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
        self.use_memory_bank(coreset.result())

    def use_memory_bank(self, bank: torch.Tensor, bank_neighbours: torch.Tensor | None = None) -> None:
        """Adopt ``bank`` as the memory bank: build its search index and (unless given) the table of each
        row's nearest rows that the re-weighting looks up."""
        self.memory_bank_ = bank.to(self.device_).float().contiguous()
        self._bank_norms = (self.memory_bank_ * self.memory_bank_).sum(1)
        self._build_index()
        self.bank_neighbours_ = (
            bank_neighbours.to(self.device_, torch.int64)
            if bank_neighbours is not None
            else self._find_bank_neighbours()
        )

    def _build_index(self) -> None:
        """faiss on CPU: exact for small banks, HNSW graph search for large ones. On magnetic_tile
        (17.5k-row bank) 16 links and efSearch=8 search 12x faster than exact and 1.9x faster than
        32 links / efSearch=16, for the same image AUROC and pixel AUROC 0.001 lower (see
        benchmarks/RESULTS.md). On GPU a plain matrix product is fastest."""
        self._index = None
        if self.device_.type != "cpu":
            return
        if self.search not in ("auto", "flat", "hnsw"):
            raise ValueError(f"search must be 'auto', 'flat' or 'hnsw', got {self.search!r}")
        bank = self.memory_bank_.cpu().numpy().astype(np.float32)
        use_hnsw = self.search == "hnsw" or (self.search == "auto" and bank.shape[0] > _EXACT_SEARCH_LIMIT)
        if use_hnsw:
            self._index = faiss.IndexHNSWFlat(bank.shape[1], self.hnsw_links)
            self._index.hnsw.efConstruction = 64
            self._index.add(bank)
            self._index.hnsw.efSearch = self.hnsw_ef_search
        else:
            self._index = faiss.IndexFlatL2(bank.shape[1])
            self._index.add(bank)

    def _find_bank_neighbours(self) -> torch.Tensor:
        """(N, b) int64: each memory-bank row's ``b`` nearest rows, itself first — the neighbourhood of
        PatchCore's re-weighting, looked up once here instead of a distance pass over the bank per image.
        Found with the search index (graph search at a wider beam), or by matrix products on the GPU."""
        bank = self.memory_bank_
        b = min(max(self.reweight_neighbours, 1), bank.shape[0])
        if self._index is not None:
            # a beam of 2b finds 99.2% of the 8 nearest rows of the tiles bank (99.6% at 32, 1.6x slower)
            wider = faiss.SearchParametersHNSW(efSearch=max(16, 2 * b)) if self._uses_graph() else None
            _, found = self._index.search(self.memory_bank_.cpu().numpy(), b + 1, params=wider)  # -1 pads
            found = torch.from_numpy(found)
        else:
            found = torch.cat(
                [
                    (self._bank_norms - 2 * rows @ bank.T)
                    .topk(min(b + 1, len(bank)), dim=1, largest=False)
                    .indices
                    for rows in bank.split(4096)
                ]
            ).cpu()
        # the row itself first, then its nearest others in search order (a graph search may miss the row
        # itself, or return -1 when it finds too few); a stable sort moves the usable hits to the front
        own = torch.arange(bank.shape[0])[:, None]
        usable = (found != own) & (found >= 0)
        order = torch.argsort((~usable).to(torch.uint8), dim=1, stable=True)[:, : b - 1]
        others = torch.where(usable.gather(1, order), found.gather(1, order), own)
        neighbours = torch.cat([own, others], dim=1)
        return neighbours.to(bank.device)

    # -- score ----------------------------------------------------------------------------------

    def _nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distance to, and index of, the nearest memory-bank row for each query row."""
        if self._index is not None:
            distances, indices = self._index.search(queries.float().cpu().numpy(), 1)
            distances = torch.from_numpy(distances[:, 0]).clamp_min_(0).sqrt_()
            return distances.to(queries.device), torch.from_numpy(indices[:, 0]).to(queries.device)
        return self._exact_nearest(queries)

    def _exact_nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_nearest` by matrix products over the whole bank, a bounded block of queries at a time."""
        distances, indices = [], []
        for block in queries.split(1024):
            partial, where = torch.addmm(self._bank_norms, block, self.memory_bank_.T, alpha=-2).min(dim=1)
            distances.append((partial + (block * block).sum(1)).clamp_min_(0).sqrt_())  # |q - m|, minimised
            indices.append(where)
        return torch.cat(distances), torch.cat(indices)

    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self._embed(features)
        b, d, h, w = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(b, h * w, d).float()
        distances, indices = self._nearest(queries.view(-1, d))
        patch_scores = distances.view(b, h * w)
        nearest = indices.view(b, h * w)
        if self._uses_graph():
            self._search_top_again(queries, patch_scores, nearest)
            self._make_maximum_exact(queries, patch_scores, nearest)
        if self._held_out_maps is not None:
            # calibrating: which patch will rank first is known only once the statistics are, so keep
            # every patch's re-weighting factor; the scores returned here are not used
            self._held_out_maps.append(
                (patch_scores.cpu(), self._reweighting_factors(queries, nearest).cpu())
            )
            return patch_scores.max(dim=1).values, patch_scores.view(b, h, w)
        scores = self._reweighted_image_scores(queries, patch_scores, nearest)
        return scores, patch_scores.view(b, h, w)

    def _ranked(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """What the image score maximises: patch distances standardised per position when statistics
        of held-out normals are known, plain distances otherwise."""
        if self.position_mean_ is None:
            return patch_scores
        return (patch_scores - self.position_mean_) / self.position_std_

    def _uses_graph(self) -> bool:
        return isinstance(self._index, faiss.IndexHNSWFlat)

    def _search_top_again(
        self, queries: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor
    ) -> None:
        """A graph search that misses a patch's nearest row overestimates its distance, so the misses
        gather at the top of each image's ranking, where :meth:`_make_maximum_exact` must then recompute
        many rows (a full read of the bank per pass). Searching each image's top few patches again at a
        wider beam corrects most misses for a fraction of that: on magnetic_tile the exact passes got a
        quarter of the rows and scoring fell from 5.2 to 3.4-4.2 ms per image. Distances only go down,
        so they stay upper bounds and the exact passes keep their guarantee."""
        # (only on CPU: the graph index exists there alone)
        k = min(_TOP_PATCHES_SEARCHED_AGAIN, patch_scores.shape[1])
        top = self._ranked(patch_scores).topk(k, dim=1).indices  # (B, k)
        rows = queries.gather(1, top[..., None].expand(-1, -1, queries.shape[2]))
        wider = faiss.SearchParametersHNSW(efSearch=max(_WIDER_EF_SEARCH, self.hnsw_ef_search))
        squared, found = self._index.search(rows.reshape(-1, rows.shape[2]).float().numpy(), 1, params=wider)
        distances = torch.from_numpy(squared[:, 0]).clamp_min_(0).sqrt_().view_as(top)
        found = torch.from_numpy(found[:, 0]).view_as(top)
        current = patch_scores.gather(1, top)
        closer = (distances < current) & (found >= 0)  # faiss pads with -1 when it finds nothing
        patch_scores.scatter_(1, top, torch.where(closer, distances, current))
        nearest.scatter_(1, top, torch.where(closer, found, nearest.gather(1, top)))

    def _make_maximum_exact(
        self, queries: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor
    ) -> None:
        """Graph search can only overestimate a distance, and the image score is a maximum, so a rare miss
        would inflate it. Recompute exactly each image's top two patches, then every patch whose graph
        distance reaches the exact maximum so found: no patch left can exceed it. Two passes over the
        bank at most, since each pass costs a full read of it whatever the number of rows. "Top" is by
        :meth:`_ranked`, which only shifts and scales each position, so the argument holds for it too.
        While calibrating (no statistics yet) plain distances rank, so a held-out image's standardised
        maximum may rarely stay overestimated: its threshold errs on the high side."""
        ranked = self._ranked(patch_scores)
        todo = torch.zeros_like(patch_scores, dtype=torch.bool)
        todo.scatter_(1, ranked.topk(min(2, patch_scores.shape[1]), dim=1).indices, True)
        exact = torch.zeros_like(todo)
        for last_pass in (False, True):
            images, patches = todo.nonzero(as_tuple=True)
            distances, indices = self._exact_nearest(queries[images, patches])
            patch_scores[images, patches] = distances
            nearest[images, patches] = indices
            exact |= todo
            if last_pass:
                return
            ranked = self._ranked(patch_scores)
            exact_maximum = ranked.masked_fill(~exact, -torch.inf).max(dim=1, keepdim=True).values
            todo = ~exact & (ranked >= exact_maximum)
            if not todo.any():
                return

    def _reweighted_image_scores(
        self, queries: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor
    ) -> torch.Tensor:
        """PatchCore eq. 7: s = (1 - softmax over the bank neighbourhood of m*) * max patch score, the
        patch score being :meth:`_ranked`'s."""
        max_scores, where = self._ranked(patch_scores).max(dim=1)
        rows = torch.arange(queries.shape[0], device=queries.device)
        factors = self._reweighting_factors(queries[rows, where][:, None], nearest[rows, where][:, None])
        return factors[:, 0] * max_scores

    def _reweighting_factors(self, queries: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """(B, P) ``1 - softmax`` of each query's distances to the ``b`` bank rows nearest its nearest
        bank row m* (m* first): near 1 when m* is isolated in the bank, lower in dense regions.
        ``queries`` is (B, P, D), ``nearest`` (B, P)."""
        b = self.reweight_neighbours
        if b <= 1 or self.memory_bank_.shape[0] <= b:
            return torch.ones(nearest.shape, device=queries.device)
        factors = []
        images_at_once = max(1, 1024 // nearest.shape[1])  # bounds the (B, P, b, D) gather below
        for image_queries, image_nearest in zip(
            queries.split(images_at_once), nearest.split(images_at_once), strict=True
        ):
            neighbours = self.memory_bank_[self.bank_neighbours_[image_nearest, :b]]  # (B, P, b, D)
            distances = torch.linalg.vector_norm(image_queries[:, :, None] - neighbours, dim=3)  # (B, P, b)
            factors.append(1 - torch.softmax(distances, dim=2)[..., 0])
        return torch.cat(factors)

    # -- calibration ----------------------------------------------------------------------------

    @contextmanager
    def _learning_from_held_out(
        self, held_out: list[ImageInput]
    ) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """Learn the per-position statistics from the held-out normals in the same pass that calibrates
        on them: :meth:`_score` keeps every held-out patch distance while inside. The function yielded
        returns each held-out image's score standardised by the *other* images' statistics (leave one
        out), so the threshold is set on scores like those unseen normal images will get."""
        self.position_mean_ = self.position_std_ = None
        if not self.position_statistics or len(held_out) < _MIN_IMAGES_FOR_POSITION_STATISTICS:
            yield lambda scores: scores
            return
        self._held_out_maps = []
        try:
            yield lambda _: self._learn_position_statistics()
        finally:
            self._held_out_maps = None

    def _learn_position_statistics(self) -> np.ndarray:
        """Set the statistics from the collected held-out distances; return leave-one-out image scores."""
        if not self._held_out_maps:
            raise RuntimeError("no held-out patch distances were collected")
        distances = torch.cat([maps for maps, _ in self._held_out_maps]).double()  # (N, P)
        factors = torch.cat([f for _, f in self._held_out_maps]).double()
        n = distances.shape[0]
        total, total_squares = distances.sum(0), distances.square().sum(0)
        mean = total / n
        std = ((total_squares - n * mean.square()) / (n - 1)).clamp_min(0).sqrt()
        # a floor keeps positions that hardly vary (letterbox padding) from dominating the maximum
        floor = max(0.5 * float(std.median()), 1e-6)
        self.position_mean_ = mean.float().to(self.device_)
        self.position_std_ = std.clamp_min(floor).float().to(self.device_)
        others_mean = (total - distances) / (n - 1)
        others_variance = (total_squares - distances.square() - (n - 1) * others_mean.square()) / (n - 2)
        standardised = (distances - others_mean) / others_variance.clamp_min(0).sqrt().clamp_min(floor)
        best, where = standardised.max(dim=1)
        return (factors.gather(1, where[:, None])[:, 0] * best).float().numpy()

    # -- persistence ----------------------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"memory_bank": self.memory_bank_, "bank_neighbours": self.bank_neighbours_}
        if self.position_mean_ is not None:
            state |= {"position_mean": self.position_mean_, "position_std": self.position_std_}
        return state

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        # files written before the neighbourhood table was stored get it computed on loading
        self.use_memory_bank(tensors["memory_bank"], tensors.get("bank_neighbours"))
        # files without positional statistics (older ones, or too few held-out images) rank plain distances
        mean, std = tensors.get("position_mean"), tensors.get("position_std")
        self.position_mean_ = mean.to(self.device_).float() if mean is not None else None
        self.position_std_ = std.to(self.device_).float() if std is not None else None
