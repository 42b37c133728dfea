"""Nearest memory-bank rows: an exact search that is part of every exported graph, and a faster graph
search (faiss HNSW) that eager scoring may use instead on the CPU, with visible, named corrections that
keep each image's score exact."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import nn

#: what an image's score maximises, given its patch distances (B, P): plain or standardised per position
Ranking = Callable[[torch.Tensor], torch.Tensor]

# With cross-fitting, a graph search asks for this many neighbours so that one not from the query's own
# image is almost always among them (the rest are searched exactly).
_CANDIDATES_WITH_EXCLUSION = 4
# Each image's top patches searched again at this wider beam before the exact passes (see
# GraphSearch.search_top_again): 8 and 32 left those passes a quarter of the rows on magnetic_tile.
TOP_PATCHES_SEARCHED_AGAIN = 8
WIDER_EF_SEARCH = 32


@dataclass(frozen=True)
class Exclusion:
    """Bank rows a query may not match, for cross-fitting: the rows that came from the query's own image.
    ``bank_sources`` (N,) gives each bank row's image, ``image_sources`` (B,) each query image's."""

    bank_sources: torch.Tensor
    image_sources: torch.Tensor

    def per_query(self, patches_per_image: int) -> torch.Tensor:
        """(B * P,) the source of every query row, image by image."""
        return self.image_sources.repeat_interleave(patches_per_image)


class ExactSearch(nn.Module):
    """Euclidean distance to, and index of, the nearest bank row for each query row, by one matrix product.

    Squared distances expand as ``|q|^2 - 2 q.m + |m|^2``; ``|m|^2 - 2 q.m`` for the whole bank is one GEMM
    (``addmm``, an ONNX ``Gemm`` reading the bank in place, so an export holds it once) that finds the
    nearest row (``|q|^2`` is the same for every row). That row's distance is then computed from the
    difference ``q - m``: the expansion cancels large norms, so its rounding depends on how the GEMM is
    blocked, i.e. on the batch and the runtime (up to 7e-4 of the threshold in image scores on deeppcb),
    while the difference's does not."""

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_norms", (bank * bank).sum(1))

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        partial = torch.addmm(self.bank_norms, queries, self.bank.T, alpha=-2)
        nearest = partial.argmin(dim=1)
        return self.distance_to(queries, nearest), nearest

    def distance_to(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(M,) Euclidean distance of each query row to its bank row ``rows`` (M,), from the difference."""
        difference = queries - self.bank.index_select(0, rows)
        return (difference * difference).sum(1).sqrt()

    def in_blocks(
        self,
        queries: torch.Tensor,
        sources: torch.Tensor | None = None,
        bank_sources: torch.Tensor | None = None,
        block: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` a bounded block of queries at a time (eager only: bounds the distance matrix);
        with ``sources`` (M,) and ``bank_sources`` (N,), a query never matches a row of its own source."""
        if sources is None:
            found = [self(part) for part in queries.split(block)]
        else:
            found = [
                self._excluding(part, own, bank_sources)
                for part, own in zip(queries.split(block), sources.split(block), strict=True)
            ]
        return torch.cat([d for d, _ in found]), torch.cat([i for _, i in found])

    def _excluding(
        self, queries: torch.Tensor, sources: torch.Tensor, bank_sources: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        partial = torch.addmm(self.bank_norms, queries, self.bank.T, alpha=-2)
        partial.masked_fill_(bank_sources[None, :] == sources[:, None], torch.inf)
        partial_min, nearest = partial.min(dim=1)
        # a query whose every bank row is its own (a one-image bank) has no neighbour: infinitely far
        distances = torch.where(partial_min.isinf(), partial_min, self.distance_to(queries, nearest))
        return distances, nearest


class GraphSearch:
    """faiss HNSW over the bank (CPU). On magnetic_tile's 17.5k-row bank, 16 links and efSearch=8 searched
    12x faster than exact and 1.9x faster than 32 links / efSearch=16, for the same image AUROC and pixel
    AUROC 0.001 lower; PatchCore's default beam is 16 since its missed cells were measured in the heatmaps
    (benchmarks/RESULTS.md). Graph search can only overestimate a distance; two corrections,
    :meth:`search_top_again` and :meth:`make_maximum_exact`, make each image's top patch exact, so image
    scores equal an exact search's while other heatmap cells may stay overestimated."""

    def __init__(self, bank: torch.Tensor, exact: ExactSearch, links: int, ef_search: int) -> None:
        self.ef_search = ef_search
        self.exact = exact
        # the graph keeps its copy of the bank in float16: half the memory read per search step, and on
        # magnetic_tile's 19.5k-row bank the same share of exact nearest rows found (0.970 at efSearch 16)
        # in 35% less time; every found row's distance is then computed in float32 (_graph_nearest)
        self.index = faiss.IndexHNSWSQ(bank.shape[1], faiss.ScalarQuantizer.QT_fp16, links)
        self.index.hnsw.efConstruction = 64
        vectors = bank.cpu().numpy().astype(np.float32)
        self.index.train(vectors)
        self.index.add(vectors)
        self.index.hnsw.efSearch = ef_search

    def nearest_rows(self, rows: torch.Tensor, k: int, ef_search: int) -> torch.Tensor:
        """(N, k) indices of the ``k`` nearest bank rows of each row (-1 where too few were found)."""
        params = faiss.SearchParametersHNSW(efSearch=ef_search)
        _, found = self.index.search(rows.float().cpu().numpy(), k, params=params)
        return torch.from_numpy(found)

    def search(
        self, queries: torch.Tensor, ranked: Ranking, exclusion: Exclusion | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, D) queries -> (distances, indices), each (B, P), every image's top patch by ``ranked``
        exact; with an ``exclusion``, no query matches a bank row of its own image."""
        b, p, d = queries.shape
        sources = None if exclusion is None else exclusion.per_query(p)
        distances, nearest = self._graph_nearest(queries.reshape(-1, d), sources, exclusion, None)
        distances, nearest = distances.view(b, p), nearest.view(b, p)
        self.search_top_again(queries, distances, nearest, ranked, exclusion)
        self.make_maximum_exact(queries, distances, nearest, ranked, exclusion)
        return distances, nearest

    def _graph_nearest(
        self,
        rows: torch.Tensor,
        sources: torch.Tensor | None,
        exclusion: Exclusion | None,
        params: faiss.SearchParametersHNSW | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) rows -> (distances, indices) by graph search; -1 where it found nothing. With an
        exclusion, the nearest of a few candidates that is not from the row's own source; rows whose
        candidates all are get an exact search. Distances of found rows are float32 (the graph's are
        float16's)."""
        k = 1 if sources is None else _CANDIDATES_WITH_EXCLUSION
        squared, found = self.index.search(rows.float().numpy(), k, params=params)
        squared, found = torch.from_numpy(squared), torch.from_numpy(found)
        if sources is not None:
            allowed = (found >= 0) & (exclusion.bank_sources[found.clamp_min(0)] != sources[:, None])
            first = allowed.to(torch.uint8).argmax(dim=1, keepdim=True)  # candidates come nearest first
            squared, found = (
                squared.gather(1, first),
                torch.where(allowed.gather(1, first), found.gather(1, first), -1),
            )
            lost = (found[:, 0] < 0).nonzero()[:, 0]
            if len(lost):
                exact_distances, exact_found = self.exact.in_blocks(
                    rows[lost], sources[lost], exclusion.bank_sources
                )
                squared[lost, 0], found[lost, 0] = exact_distances.square(), exact_found
        distances, found = squared[:, 0].clamp_min(0).sqrt(), found[:, 0]
        # rows with a neighbour (not -1, not infinitely far: a one-image bank when cross-fitting)
        measured = (found >= 0) & distances.isfinite()
        distances[measured] = self.exact.distance_to(rows[measured], found[measured])
        return distances, found

    def search_top_again(
        self,
        queries: torch.Tensor,
        distances: torch.Tensor,
        nearest: torch.Tensor,
        ranked: Ranking,
        exclusion: Exclusion | None = None,
    ) -> None:
        """A graph search that misses a patch's nearest row overestimates its distance, so the misses gather
        at the top of each image's ranking, where :meth:`make_maximum_exact` must then recompute many rows
        (a full read of the bank per pass). Searching each image's top few patches again at a wider beam
        corrects most misses for a fraction of that: on magnetic_tile the exact passes got a quarter of the
        rows and scoring fell from 5.2 to 3.4-4.2 ms per image. Distances only go down, so they stay upper
        bounds and the exact passes keep their guarantee."""
        k = min(TOP_PATCHES_SEARCHED_AGAIN, distances.shape[1])
        top = ranked(distances).topk(k, dim=1).indices  # (B, k)
        rows = queries.gather(1, top[..., None].expand(-1, -1, queries.shape[2]))
        wider = faiss.SearchParametersHNSW(efSearch=max(WIDER_EF_SEARCH, self.ef_search))
        sources = None if exclusion is None else exclusion.per_query(k)
        again, found = self._graph_nearest(rows.reshape(-1, rows.shape[2]), sources, exclusion, wider)
        again, found = again.view_as(top), found.view_as(top)
        current = distances.gather(1, top)
        closer = (again < current) & (found >= 0)  # faiss pads with -1 when it finds nothing
        distances.scatter_(1, top, torch.where(closer, again, current))
        nearest.scatter_(1, top, torch.where(closer, found, nearest.gather(1, top)))

    def make_maximum_exact(
        self,
        queries: torch.Tensor,
        distances: torch.Tensor,
        nearest: torch.Tensor,
        ranked: Ranking,
        exclusion: Exclusion | None = None,
    ) -> None:
        """The image score is a maximum, so a rare overestimate would inflate it. Recompute exactly each
        image's top two patches, then every patch whose graph distance reaches the exact maximum so found:
        no patch left can exceed it. Two passes over the bank at most, since each costs a full read of it
        whatever the number of rows. "Top" is by ``ranked``, which only shifts and scales each position,
        so the argument holds for it too."""
        order = ranked(distances)
        todo = torch.zeros_like(distances, dtype=torch.bool)
        todo.scatter_(1, order.topk(min(2, distances.shape[1]), dim=1).indices, True)
        exact = torch.zeros_like(todo)
        for last_pass in (False, True):
            images, patches = todo.nonzero(as_tuple=True)
            if exclusion is None:
                found_distances, found = self.exact.in_blocks(queries[images, patches])
            else:
                found_distances, found = self.exact.in_blocks(
                    queries[images, patches], exclusion.image_sources[images], exclusion.bank_sources
                )
            distances[images, patches] = found_distances
            nearest[images, patches] = found
            exact |= todo
            if last_pass:
                return
            order = ranked(distances)
            exact_maximum = order.masked_fill(~exact, -torch.inf).max(dim=1, keepdim=True).values
            todo = ~exact & (order >= exact_maximum)
            if not todo.any():
                return
