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

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.components.coreset import StreamingCoreset, select_more_centres
from imaging_ad.detectors.components.features import patch_grid
from imaging_ad.detectors.components.region import read_region, region_cells
from imaging_ad.detectors.components.search import ExactSearch, Exclusion, GraphSearch
from imaging_ad.detectors.params import Interval, OneOf
from imaging_ad.detectors.registry import register_detector
from imaging_ad.io.items import ImageInput

# Below this many memory-bank rows an exact search is about as fast as a graph search.
_EXACT_SEARCH_LIMIT = 4096
# With fewer held-out normals per-position statistics are too noisy to standardise by.
_MIN_IMAGES_FOR_POSITION_STATISTICS = 8


class PatchCoreHead(nn.Module):
    """Feature maps -> (image scores, patch-distance maps): PatchCore's scoring, the only copy of it.

    Exact nearest-neighbour search by matrix product is part of the module (what an export runs); eager
    scoring on the CPU may hand the search to a :class:`GraphSearch` instead (``graph``), which is not
    part of the module's graph."""

    def __init__(
        self,
        bank: torch.Tensor,
        bank_neighbours: torch.Tensor,
        neighbourhood: int,
        reweight_neighbours: int,
        position_mean: torch.Tensor | None = None,
        position_std: torch.Tensor | None = None,
        graph: GraphSearch | None = None,
        border: int = 0,
        heatmap: str = "distance",
        region: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.neighbourhood = neighbourhood
        self.border = border
        self.heatmap = heatmap
        self.limited = border > 0 or region is not None  # some cells neither score nor show
        self.register_buffer("region", region)
        self.reweight = (
            reweight_neighbours if reweight_neighbours > 1 and bank.shape[0] > reweight_neighbours else 0
        )
        self.exact = ExactSearch(bank)
        self.register_buffer("bank_neighbours", bank_neighbours[:, : max(self.reweight, 1)].contiguous())
        self.standardise = position_mean is not None
        if self.standardise:
            self.register_buffer("position_mean", position_mean)
            self.register_buffer("position_std", position_std)
        self.graph = graph

    def without_graph_search(self) -> PatchCoreHead:
        """The same head searching exactly (what an export computes)."""
        exact = copy.copy(self)
        exact.graph = None
        return exact

    def embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        return patch_embeddings(features, self.neighbourhood)

    def ranked(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """What the image score maximises: patch distances standardised per position when statistics of
        held-out normals are known, plain distances otherwise; cells of the ignored border band rank
        last."""
        ranked = patch_scores
        if self.standardise:
            ranked = (patch_scores - self.position_mean) / self.position_std
        return ranked.masked_fill(self.ignored(patch_scores), -torch.inf) if self.limited else ranked

    def ignored(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(P,) True on the cells that neither score nor show: the grid's outer ``border`` cells and
        those outside the user's region of interest."""
        side = math.isqrt(patch_scores.shape[-1])
        assert side * side == patch_scores.shape[-1], "PatchCore's grid is square"
        inner = torch.zeros(side, side, dtype=torch.bool, device=patch_scores.device)
        inner[self.border : side - self.border, self.border : side - self.border] = True
        examined = inner.reshape(-1)
        if self.region is not None:
            examined = examined & self.region
        return ~examined

    def shown(self, distances: torch.Tensor) -> torch.Tensor:
        """(B, P) distances as the heatmap shows them (see :class:`PatchCore`'s ``heatmap``)."""
        if not self.standardise:
            return self.without_band(distances, distances.min(dim=1, keepdim=True).values)
        if self.heatmap == "excess":
            return self.without_band(distances - self.position_mean, 0.0)
        if self.heatmap == "standardised":
            return self.without_band((distances - self.position_mean) / self.position_std, 0.0)
        return self.without_band(distances, self.position_mean)

    def without_band(self, shown: torch.Tensor, typical: torch.Tensor | float) -> torch.Tensor:
        """The ignored cells at a normal position's typical value, so that they never look hot."""
        if not self.limited:
            return shown
        typical = torch.as_tensor(typical, dtype=shown.dtype, device=shown.device)
        return torch.where(self.ignored(shown), typical, shown)

    def patch_distances(
        self, features: list[torch.Tensor], ranked: bool = True, exclusion: Exclusion | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(queries (B, P, D), distances (B, P), nearest bank rows (B, P), grid (h, w)). With a graph search
        the top patches by :meth:`ranked` (plain distances when ``ranked`` is False) are exact; with an
        ``exclusion`` (cross-fitting) no patch matches a bank row of its own image."""
        embedding = self.embed(features)
        b, d, h, w = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(b, h * w, d).float()
        if self.graph is not None:
            distances, nearest = self.graph.search(queries, self.ranked if ranked else _plain, exclusion)
        elif exclusion is not None:
            sources = exclusion.per_query(h * w).to(queries.device)
            flat = self.exact.in_blocks(
                queries.reshape(-1, d), sources, exclusion.bank_sources.to(queries.device)
            )
            distances, nearest = flat[0].reshape(b, h * w), flat[1].reshape(b, h * w)
        else:
            flat_distances, flat_nearest = self.exact(queries.reshape(-1, d))
            distances, nearest = flat_distances.reshape(b, h * w), flat_nearest.reshape(b, h * w)
        return queries, distances, nearest, (h, w)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        queries, distances, nearest, (h, w) = self.patch_distances(features)
        return self.image_scores(queries, distances, nearest), self.shown(distances).reshape(-1, h, w)

    def image_scores(
        self, queries: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor
    ) -> torch.Tensor:
        """PatchCore eq. 7: s = (1 - softmax over the bank neighbourhood of m*) * max patch score, the patch
        score being :meth:`ranked`'s and m* the nearest bank row of the top patch."""
        max_scores, where = self.ranked(distances).max(dim=1)
        if not self.reweight:
            return max_scores
        d = queries.shape[2]
        test_patch = queries.gather(1, where.reshape(-1, 1, 1).expand(-1, 1, d))  # (B, 1, D)
        m_star = nearest.gather(1, where[:, None])  # (B, 1)
        return self.reweighting_factors(test_patch, m_star)[:, 0] * max_scores

    def reweighting_factors(self, queries: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """(B, P) ``1 - softmax`` of each query's distances to the ``b`` bank rows nearest its nearest bank
        row m* (m* first, from the stored neighbourhood table): near 1 when m* is isolated in the bank,
        lower in dense regions. ``queries`` is (B, P, D), ``nearest`` (B, P)."""
        b, p, d = queries.shape
        if not self.reweight:
            return torch.ones(b, p, device=queries.device)
        neighbours = self.bank_neighbours.index_select(0, nearest.reshape(-1))  # (B * P, b), m* first
        rows = self.exact.bank.index_select(0, neighbours.reshape(-1)).reshape(b, p, self.reweight, d)
        difference = queries[:, :, None] - rows
        distances = (difference * difference).sum(3).sqrt()
        return 1 - torch.softmax(distances, dim=2)[..., 0]


def patch_embeddings(features: list[torch.Tensor], neighbourhood: int) -> torch.Tensor:
    """Stage maps -> (B, D, h, w) PatchCore's locally aggregated patch embeddings on the finest stage's
    grid (:func:`~imaging_ad.detectors.components.features.patch_grid` with its neighbourhood)."""
    return patch_grid(features, neighbourhood)


def _plain(patch_scores: torch.Tensor) -> torch.Tensor:
    return patch_scores


@register_detector("patchcore")
class PatchCore(Detector):
    """PatchCore: a memory bank of normal patch features; distance to it is the anomaly.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.base.Detector`):

    coreset_ratio
        share of all training patches kept in the memory bank by greedy coreset selection (0-1].
    max_memory_bank
        cap on the bank's rows, whatever the number of images (bounds memory and search time).
    projection_dim
        random projection width used while selecting the coreset (speed; 0 or None: no projection).
    neighbourhood
        side of the local average that aggregates each patch with its neighbours (odd; 1: none).
    reweight_neighbours
        bank rows around the nearest one that the image score's re-weighting compares (PatchCore's b).
    chunk_images
        images per coreset-selection chunk (selection streams chunk by chunk).
    coreset_oversampling
        two-level selection: each chunk keeps this many times its share of the bank, and a second
        streaming pass selects the bank from those candidates, whose chunks span many more images (a
        more global choice; 1: one level). 2 measured best on the mean over every shared dataset
        (benchmarks/RESULTS.md). A fit on a Ray cluster runs the same two levels, its workers doing the
        first, so it keeps the bank a one-machine fit would.
    search, hnsw_links, hnsw_ef_search
        nearest-neighbour search: ``"auto"`` (graph search above 4096 bank rows on the CPU), ``"flat"``
        (exact), ``"hnsw"``; the HNSW graph's links per node and search beam. A graph search can miss a
        patch's nearest row; image scores stay exact (top patches are recomputed), but a missed cell reads
        too high in the heatmap. Beam 16 (since 2026-12-03; 8 before), chosen on the four shared datasets
        with graph-searched banks: at 8, 4-55% of anomalous test images (0.7-6.4% of normal ones) had over
        1% of their pixels coloured above the pixel threshold only by such misses, at 16 1.5-13% (0-0.9%),
        with accuracy equal or higher everywhere and the head 0.3-0.8 ms per image slower (less since the
        graph holds the bank in float16); 32 leaves
        0-1.8% but costs 1.0-2.2 ms (benchmarks/RESULTS.md). ``search="flat"`` gives exact maps.
    position_statistics
        rank patches for the image score by their distance standardised per position (see above).
    border
        feature cells of the outer band that neither score nor show in the heatmap (0: none). The band
        holds convolution padding and, on radiographs, collimator edges, markers and leads: see
        benchmarks/RESULTS.md for what it does to each dataset.
    region
        a region-of-interest mask image (white: examine, black: ignore; any size, stretched onto the
        images like they are onto the model's input), for a ruler, label or fixture that is in every image
        in the same place: grid cells mostly outside it neither score nor show. Read at fit; the model
        keeps the mask, so the file is not needed afterwards.
    heatmap
        what the heatmap shows: ``"distance"`` (each patch's distance to the memory bank),
        ``"excess"`` (that distance above the position's mean on held-out normals: positions that are
        far from the bank on every normal image, such as the frame, stop looking hot) or
        ``"standardised"`` (the excess in units of the position's spread, what the image score ranks;
        the default: best mean AUPRO over every shared dataset, benchmarks/RESULTS.md). Needs
        per-position statistics; without them it is the distance.
    """

    # Strides 16 and 32 of EfficientNet-Lite measured best on magnetic_tile (image AUROC 0.936 vs 0.873
    # for strides 8 and 16, see benchmarks/RESULTS.md); the coarser grid also means 4x fewer queries.
    feature_strides = (16, 32)
    cross_fitting = "leave-one-out: each training image searches the bank without its own patches"
    param_constraints = {
        "coreset_ratio": Interval(0, 1, "right"),
        "max_memory_bank": Interval(1, None),
        "projection_dim": Interval(0, None),
        "neighbourhood": Interval(1, 15),
        "reweight_neighbours": Interval(0, 1000),
        "chunk_images": Interval(1, None),
        "coreset_oversampling": Interval(1, 64),
        "search": OneOf(("auto", "flat", "hnsw")),
        "hnsw_links": Interval(2, 256),
        "hnsw_ef_search": Interval(1, 4096),
        "border": Interval(0, 8),
        "heatmap": OneOf(("distance", "excess", "standardised")),
    }

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
        coreset_oversampling: float = 2.0,
        search: str = "auto",
        hnsw_links: int = 16,
        hnsw_ef_search: int = 16,
        position_statistics: bool = True,
        border: int = 0,
        heatmap: str = "standardised",
        region: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.coreset_ratio = coreset_ratio
        self.max_memory_bank = max_memory_bank
        self.projection_dim = projection_dim
        self.neighbourhood = neighbourhood
        self.reweight_neighbours = reweight_neighbours
        self.chunk_images = chunk_images
        self.coreset_oversampling = coreset_oversampling
        self.search = search
        self.hnsw_links = hnsw_links
        self.hnsw_ef_search = hnsw_ef_search
        self.position_statistics = position_statistics
        self.border = border
        self.heatmap = heatmap
        self.region = region
        self.region_cells_: torch.Tensor | None = None  # (h * w,) bool, from ``region`` at fit
        self.memory_bank_: torch.Tensor | None = None
        self.bank_neighbours_: torch.Tensor | None = None
        # per-position mean and spread of held-out normals' patch distances, (h * w,) each
        self.position_mean_: torch.Tensor | None = None
        self.position_std_: torch.Tensor | None = None

    @classmethod
    def params_of_older_files(cls, params: dict) -> dict:
        # files from before these options scored the whole grid, showed distances, selected in one level
        return {"border": 0, "heatmap": "distance", "coreset_oversampling": 1.0, **params}

    # -- fit ------------------------------------------------------------------------------------

    def validate_params(self) -> None:
        super().validate_params()
        if self.region is not None:
            read_region(self.region)  # a missing or unreadable mask is refused before any image is read

    def begin_fit(self, n_images: int, *, first_image: int = 0, total_images: int | None = None) -> None:
        """Start the coreset over ``n_images`` images. A shard of a fit split over machines
        (:mod:`imaging_ad.detectors.ray_fit`) says where it starts in the whole training list
        (``first_image``) and how long that list is (``total_images``)."""
        self._n_images, self._seen = n_images, first_image
        self._total_images = total_images or n_images
        self._coreset: StreamingCoreset | None = None

    def partial_fit(self, features: list[torch.Tensor]) -> None:
        rows, self._grid = self.patch_rows(features)
        patches = self._grid[0] * self._grid[1]
        b = rows.shape[0] // patches
        if self._coreset is None:
            share = self.coreset_oversampling * self._n_images / self._total_images
            keep = share * self.memory_bank_rows(self._total_images * patches)
            candidates = self._n_images * patches
            self._coreset = self.coreset(max(1, min(round(keep), candidates)), candidates, patches)
        # each row remembers its image, so cross-fitting can score an image without its own rows
        self._coreset.add(rows, torch.arange(self._seen, self._seen + b).repeat_interleave(patches))
        self._seen += b

    def selected_rows(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """After the last ``partial_fit``: the first level's rows, each row's image position and the grid."""
        return self._coreset.result(), self._coreset.sources(), self._grid

    def end_fit(self) -> None:
        rows, sources, grid = self.selected_rows()
        if self.coreset_oversampling > 1:
            self.select_memory_bank(rows, sources, self._total_images, grid)
        else:  # the first level kept the bank itself
            self.adopt_fitted_bank(rows, sources, grid)
        del self._coreset, self._n_images, self._seen, self._grid, self._total_images

    def select_memory_bank(
        self, candidates: torch.Tensor, sources: torch.Tensor, n_images: int, grid: tuple[int, int]
    ) -> None:
        """The coreset's second level: the bank of a fit on ``n_images`` images chosen from the first
        level's ``candidates`` (rows with their images' positions, ``sources``), by the same streaming
        greedy coreset, and adopted."""
        patches = grid[0] * grid[1]
        coreset = self.coreset(self.memory_bank_rows(n_images * patches), len(candidates), patches)
        coreset.add(candidates, sources)
        self.adopt_fitted_bank(coreset.result(), coreset.sources(), grid)

    def release_fit_state(self) -> None:
        self.__dict__.pop("_bank_sources", None)

    # The pieces of the fit that a fit split over machines (imaging_ad.detectors.ray_fit) reuses: each
    # worker runs the first level over its images (begin_fit / partial_fit / selected_rows), the driver
    # the second over the union (select_memory_bank).

    def patch_rows(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """A batch's patch embeddings as memory-bank candidates, (B * h * w, D) float32 image by image,
        and the grid (h, w)."""
        embedding = self._embed(features)
        _, d, h, w = embedding.shape
        return embedding.permute(0, 2, 3, 1).reshape(-1, d).float(), (h, w)

    def memory_bank_rows(self, n_patches: int) -> int:
        """The memory bank's size for a fit on ``n_patches`` training patches (``coreset_ratio`` of them,
        at most ``max_memory_bank``)."""
        return max(1, min(round(self.coreset_ratio * n_patches), self.max_memory_bank))

    def coreset(self, rows: int, n_patches: int, patches_per_image: int) -> StreamingCoreset:
        """The fit's streaming greedy coreset, keeping ``rows`` of ``n_patches`` candidates, selecting
        ``chunk_images`` images' worth of rows at a time."""
        return StreamingCoreset(
            rows, n_patches, self.chunk_images * patches_per_image, self.projection_dim, self.seed
        )

    def adopt_fitted_bank(self, bank: torch.Tensor, sources: torch.Tensor, grid: tuple[int, int]) -> None:
        """End a fit with ``bank``: ``sources`` (N,) is each row's image (its position in the training list,
        which cross-fitted calibration excludes), ``grid`` the feature grid (h, w) the region mask is read
        onto."""
        self.region_cells_ = None
        if self.region is not None:
            self.region_cells_ = region_cells(read_region(self.region), grid).to(self.device_)
        self._bank_sources = sources.to(torch.int64)
        self.use_memory_bank(bank)

    def _embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        return patch_embeddings(features, self.neighbourhood)

    def use_memory_bank(self, bank: torch.Tensor, bank_neighbours: torch.Tensor | None = None) -> None:
        """Adopt ``bank`` as the memory bank: build its search and (unless given) the table of each row's
        nearest rows that the re-weighting looks up; statistics of the previous bank are dropped."""
        self.memory_bank_ = bank.to(self.device_).float().contiguous()
        self._exact = ExactSearch(self.memory_bank_)
        self._graph = self._build_graph_search()
        self.bank_neighbours_ = (
            bank_neighbours.to(self.device_, torch.int64)
            if bank_neighbours is not None
            else self._find_bank_neighbours()
        )
        self.position_mean_ = self.position_std_ = None
        self.refresh_head()

    def _build_graph_search(self) -> GraphSearch | None:
        """HNSW graph search for large banks on the CPU; on GPU a plain matrix product is fastest."""
        if self.device_.type != "cpu":
            return None
        large = self.memory_bank_.shape[0] > _EXACT_SEARCH_LIMIT
        if self.search == "hnsw" or (self.search == "auto" and large):
            return GraphSearch(self.memory_bank_, self._exact, self.hnsw_links, self.hnsw_ef_search)
        return None

    def _find_bank_neighbours(self) -> torch.Tensor:
        """(N, b) int64: each memory-bank row's ``b`` nearest rows, itself first — the neighbourhood of
        PatchCore's re-weighting, looked up once here instead of a distance pass over the bank per image.
        Found by matrix products, or for a large bank searched by graph, with the graph at a wider beam."""
        bank = self.memory_bank_
        b = min(max(self.reweight_neighbours, 1), bank.shape[0])
        if self._graph is not None and len(bank) > _EXACT_SEARCH_LIMIT:
            # a beam of 2b finds 99.2% of the 8 nearest rows of the tiles bank (99.6% at 32, 1.6x slower)
            found = self._graph.nearest_rows(bank, b + 1, ef_search=max(16, 2 * b))  # -1 pads
        else:
            norms = (bank * bank).sum(1)
            found = torch.cat(
                [
                    (norms - 2 * rows @ bank.T).topk(min(b + 1, len(bank)), dim=1, largest=False).indices
                    for rows in bank.split(4096)
                ]
            ).cpu()
        # the row itself first, then its nearest others in search order (a graph search may miss the row
        # itself, or return -1 when it finds too few); a stable sort moves the usable hits to the front
        own = torch.arange(bank.shape[0])[:, None]
        usable = (found != own) & (found >= 0)
        order = torch.argsort((~usable).to(torch.uint8), dim=1, stable=True)[:, : b - 1]
        others = torch.where(usable.gather(1, order), found.gather(1, order), own)
        return torch.cat([own, others], dim=1).to(bank.device)

    def _build_head(self) -> PatchCoreHead:
        return PatchCoreHead(
            self.memory_bank_,
            self.bank_neighbours_,
            self.neighbourhood,
            self.reweight_neighbours,
            self.position_mean_,
            self.position_std_,
            graph=self._graph,
            border=self.border,
            heatmap=self.heatmap,
            region=self.region_cells_,
        )

    def export_head(self) -> PatchCoreHead:
        return self.head_.without_graph_search()

    def export_notes(self) -> dict:
        return {
            "nearest_neighbour_search": "exact: squared distances to every memory-bank row by matrix product, then min",
            "memory_bank_rows": int(self.memory_bank_.shape[0]),
            "checkpoint_search": (
                f"approximate: faiss HNSW (efSearch={self.hnsw_ef_search}), with the top patches recomputed "
                "exactly, so image scores are exact but other heatmap cells may be overestimated"
                if self._graph is not None
                else "exact (matrix product)"
            ),
        }

    # -- learning from held-out normals ---------------------------------------------------------

    def held_out_evidence(
        self, features: list[torch.Tensor], exclusion: Exclusion | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch distances (B, h, w), every patch's re-weighting factor (B, h * w)): which patch will rank
        first is known only once the per-position statistics are, so every patch's factor is kept. Every
        patch's distance enters those statistics, so a small bank is searched exactly here even when
        scoring uses the graph (which is exact only for each image's top patches)."""
        head = self.head_
        if self._graph is not None and len(self.memory_bank_) <= _EXACT_SEARCH_LIMIT:
            head = head.without_graph_search()
        with torch.inference_mode():
            queries, distances, nearest, (h, w) = head.patch_distances(features, False, exclusion)
            images_at_once = max(1, 1024 // distances.shape[1])  # bounds the (B, P, b, D) gather
            factors = torch.cat(
                [
                    head.reweighting_factors(q, n)
                    for q, n in zip(queries.split(images_at_once), nearest.split(images_at_once), strict=True)
                ]
            )
            return distances.reshape(-1, h, w).cpu(), factors.cpu()

    def cross_fitted_evidence(
        self, features: list[torch.Tensor], positions: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`held_out_evidence` of training images, each searching the bank without the rows its own
        patches put there (leave one image out)."""
        exclusion = Exclusion(self._bank_sources, torch.tensor(positions, dtype=torch.int64))
        return self.held_out_evidence(features, exclusion)

    def learn_from_held_out(
        self, evidence: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Learn the per-position statistics from the held-out normals' patch distances; return their image
        scores standardised by the *other* images' statistics (leave one out), so the threshold is set on
        scores like those unseen normal images will get, and their maps as the heatmap shows them (also
        left-one-out, for the pixel threshold)."""
        maps = torch.cat([m for m, _ in evidence])
        distances = maps.flatten(1).double()  # (N, P)
        factors = torch.cat([f for _, f in evidence]).double()
        self.position_mean_ = self.position_std_ = None
        n = distances.shape[0]
        if not self.position_statistics or n < _MIN_IMAGES_FOR_POSITION_STATISTICS:
            self.refresh_head()
            best, where = self.head_.ranked(distances).max(dim=1)
            shown = self.head_.without_band(distances, distances.min(dim=1, keepdim=True).values)
            return (factors.gather(1, where[:, None])[:, 0] * best).float(), shown.reshape(maps.shape).float()
        total, total_squares = distances.sum(0), distances.square().sum(0)
        mean = total / n
        std = ((total_squares - n * mean.square()) / (n - 1)).clamp_min(0).sqrt()
        # a floor keeps positions that hardly vary (letterbox padding) from dominating the maximum
        floor = max(0.5 * float(std.median()), 1e-6)
        self.position_mean_ = mean.float().to(self.device_)
        self.position_std_ = std.clamp_min(floor).float().to(self.device_)
        self.refresh_head()
        others_mean = (total - distances) / (n - 1)
        others_variance = (total_squares - distances.square() - (n - 1) * others_mean.square()) / (n - 2)
        standardised = (distances - others_mean) / others_variance.clamp_min(0).sqrt().clamp_min(floor)
        if self.heatmap == "excess":
            shown = self.head_.without_band(distances - others_mean, 0.0)
        elif self.heatmap == "standardised":
            shown = self.head_.without_band(standardised, 0.0)
        else:
            shown = self.head_.without_band(distances, others_mean)
        if self.head_.limited:
            standardised = standardised.masked_fill(self.head_.ignored(standardised), -torch.inf)
        best, where = standardised.max(dim=1)
        return (factors.gather(1, where[:, None])[:, 0] * best).float(), shown.reshape(maps.shape).float()

    def extend_memory_bank(
        self,
        images: list[ImageInput],
        calibration_images: list[ImageInput],
        rows_per_image: int | None = None,
    ) -> int:
        """Add patches of ``images`` (normal images the model flagged or scored high) to the memory bank,
        then recalibrate from scratch on ``calibration_images`` (normal images kept out of the bank):
        per-position statistics and thresholds are those a fit with this bank would learn from them.

        New rows are chosen like the fit's coreset (greedy k-centre over the new patches, continued from
        the existing bank), ``coreset_ratio`` of them or ``rows_per_image`` per image. Returns the number
        of rows added."""
        self._check_fitted()
        if not images:
            raise ValueError("no images to add to the memory bank")
        if len(calibration_images) < 2:
            raise ValueError("recalibration needs at least two normal images that are not added to the bank")
        candidates = torch.cat(
            [
                self._embed(features).permute(0, 2, 3, 1).reshape(-1, self.memory_bank_.shape[1]).float()
                for features, _ in self.extracted_batches(list(images), desc=f"{self.name}: new patches")
            ]
        )
        k = (
            rows_per_image * len(images)
            if rows_per_image is not None
            else max(1, round(self.coreset_ratio * candidates.shape[0]))
        )
        with torch.inference_mode():
            chosen = select_more_centres(self.memory_bank_, candidates.to(self.memory_bank_.device), k)
        self.use_memory_bank(torch.cat([self.memory_bank_, candidates[chosen].to(self.memory_bank_.device)]))
        earlier = self.calibration_
        self.calibration_ = replace(  # the domain guard knows the same training images as before
            self._calibrate(
                list(calibration_images),
                "normals kept out of the extended bank",
                f"{len(calibration_images)} normals",
            ),
            domain_threshold=earlier.domain_threshold,
            training_facts=earlier.training_facts,
        )
        return int(chosen.numel())

    # -- persistence ----------------------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"memory_bank": self.memory_bank_, "bank_neighbours": self.bank_neighbours_}
        if self.position_mean_ is not None:
            state |= {"position_mean": self.position_mean_, "position_std": self.position_std_}
        if self.region_cells_ is not None:
            state["region_cells"] = self.region_cells_.to(torch.uint8)
        return state

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        region = tensors.get("region_cells")
        self.region_cells_ = region.to(self.device_, torch.bool) if region is not None else None
        # files written before the neighbourhood table was stored get it computed on loading
        self.use_memory_bank(tensors["memory_bank"], tensors.get("bank_neighbours"))
        # files without positional statistics (older ones, or too few held-out images) rank plain distances
        mean, std = tensors.get("position_mean"), tensors.get("position_std")
        self.position_mean_ = mean.to(self.device_).float() if mean is not None else None
        self.position_std_ = std.to(self.device_).float() if std is not None else None
