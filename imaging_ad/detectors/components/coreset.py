"""Greedy k-centre coreset selection, the step that makes or breaks PatchCore's fit time.

Two visible speed-ups over the textbook loop: a Johnson-Lindenstrauss random projection (distances in
``projection_dim`` dimensions instead of the full feature width) and streaming — the memory bank is
built chunk by chunk, each chunk contributing its share, so selection cost grows linearly with the
number of images and no more than one chunk of patch features is ever held in memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def greedy_coreset(
    features: torch.Tensor, k: int, projection_dim: int | None = 128, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` (N, D) chosen by greedy k-centre (farthest-point) selection."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    x = features.float()
    if projection_dim and x.shape[1] > projection_dim:
        projection = torch.randn(x.shape[1], projection_dim, generator=generator, device="cpu").to(x.device)
        x = x @ (projection / math.sqrt(projection_dim))
    start = int(torch.randint(n, (1,), generator=generator).item())
    if x.device.type == "cpu":
        return torch.from_numpy(_farthest_points_numpy(x.numpy(), k, start))
    return _farthest_points_torch(x, k, start)


def _farthest_points_numpy(x: np.ndarray, k: int, start: int) -> np.ndarray:
    """The selection loop on the CPU. Each step is a few microseconds of arithmetic on a 4096 x 128
    chunk, so per-call overhead dominates: numpy's is a fraction of torch's (0.036 s vs 0.08 s for 410
    centres of 4096 rows; same centres)."""
    squared_norms = np.einsum("ij,ij->i", x, x)
    selected = np.empty(k, dtype=np.int64)
    selected[0] = start
    min_distance = squared_norms - 2 * (x @ x[start]) + squared_norms[start]
    for i in range(1, k):
        index = int(min_distance.argmax())
        selected[i] = index
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one matrix-vector product per new centre
        distance = x @ x[index]
        distance *= -2
        distance += squared_norms
        distance += squared_norms[index]
        np.minimum(min_distance, distance, out=min_distance)
    return selected


def _farthest_points_torch(x: torch.Tensor, k: int, start: int) -> torch.Tensor:
    """The same loop on an accelerator, where the data stays."""
    squared_norms = (x * x).sum(1)
    selected = torch.empty(k, dtype=torch.long, device=x.device)
    selected[0] = start
    min_distance = squared_norms - 2 * (x @ x[start]) + squared_norms[start]
    distance = torch.empty_like(min_distance)
    for i in range(1, k):
        index = torch.argmax(min_distance)
        selected[i] = index
        torch.mv(x, x[index], out=distance)
        distance.mul_(-2).add_(squared_norms).add_(squared_norms[index])
        torch.minimum(min_distance, distance, out=min_distance)
    return selected


class StreamingCoreset:
    """Accumulates patch features chunk by chunk and keeps each chunk's coreset share.

    ``bank_size`` is the final memory-bank size; ``total`` the number of patches expected overall, so
    each chunk keeps ``bank_size * chunk / total`` rows (with the rounding carried forward).
    """

    def __init__(
        self, bank_size: int, total: int, chunk_rows: int, projection_dim: int | None, seed: int
    ) -> None:
        self.bank_size = bank_size
        self.total = max(total, 1)
        self.chunk_rows = chunk_rows
        self.projection_dim = projection_dim
        self.generator = torch.Generator().manual_seed(seed)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        self._seen = 0
        self._kept: list[torch.Tensor] = []
        self._kept_sources: list[torch.Tensor] = []
        self._kept_rows = 0

    def add(self, rows: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        """Rows (N, D) and, optionally, where each came from (N,) (an image's position, for cross-fitting)."""
        if sources is None:
            sources = torch.full((rows.shape[0],), -1, dtype=torch.int64)
        # a batch larger than a chunk is split: selection costs (chunk rows x chunk share) per chunk
        for piece, origin in zip(rows.split(self.chunk_rows), sources.split(self.chunk_rows), strict=True):
            self._pending.append((piece, origin))
            self._pending_rows += piece.shape[0]
            if self._pending_rows >= self.chunk_rows:
                self._reduce_pending()

    def result(self) -> torch.Tensor:
        """The memory bank (see :meth:`sources` for where its rows came from)."""
        if self._pending:
            self._reduce_pending(final=True)
        if not self._kept:
            raise ValueError("no features were added")
        return torch.cat(self._kept)

    def sources(self) -> torch.Tensor:
        """(N,) where each row of :meth:`result` came from, as given to :meth:`add` (-1: not given)."""
        return torch.cat(self._kept_sources)

    def _reduce_pending(self, final: bool = False) -> None:
        chunk = torch.cat([rows for rows, _ in self._pending])
        origin = torch.cat([sources for _, sources in self._pending])
        self._pending, self._pending_rows = [], 0
        self._seen += chunk.shape[0]
        target_so_far = self.bank_size if final else round(self.bank_size * min(1.0, self._seen / self.total))
        k = max(1, target_so_far - self._kept_rows)
        chosen = greedy_coreset(chunk, k, self.projection_dim, self.generator)
        self._kept.append(chunk[chosen].clone())
        self._kept_sources.append(origin[chosen.cpu()].clone())
        self._kept_rows += len(chosen)


def select_more_centres(centres: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-centre continued from existing ``centres``: indices of up to ``k`` ``candidates`` rows, each
    the one farthest from the centres and the rows already chosen. Rows the centres already cover exactly
    add nothing and are never picked."""
    centre_norms = (centres * centres).sum(1)
    min_distance = torch.cat(
        [
            ((block * block).sum(1, keepdim=True) - 2 * block @ centres.T + centre_norms).min(dim=1).values
            for block in candidates.split(4096)
        ]
    ).clamp_min_(0)
    chosen: list[int] = []
    for _ in range(min(k, candidates.shape[0])):
        index = int(torch.argmax(min_distance))
        if float(min_distance[index]) <= 0.0:
            break
        chosen.append(index)
        torch.minimum(min_distance, (candidates - candidates[index]).pow(2).sum(1), out=min_distance)
    return torch.tensor(chosen, dtype=torch.long)
