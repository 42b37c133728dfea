"""Greedy k-centre coreset: the fast loops agree with a plain farthest-point reference."""

from __future__ import annotations

import numpy as np
import torch

from imaging_ad.detectors.components.coreset import (
    StreamingCoreset,
    _farthest_points_torch,
    greedy_coreset,
    select_more_centres,
)


def _reference_farthest_points(x: np.ndarray, k: int, start: int) -> list[int]:
    """Textbook farthest-point selection with full pairwise distances (float64)."""
    x = x.astype(np.float64)
    selected = [start]
    for _ in range(1, k):
        distances = np.linalg.norm(x[:, None] - x[selected][None], axis=2).min(axis=1)
        selected.append(int(distances.argmax()))
    return selected


def test_greedy_coreset_matches_the_reference_and_both_loops_agree() -> None:
    rng = np.random.default_rng(3)
    # well-separated clusters, so float32 rounding cannot change which point is farthest
    centres = rng.normal(scale=20.0, size=(12, 6))
    points = (centres[rng.integers(0, 12, size=300)] + rng.normal(size=(300, 6))).astype(np.float32)
    features = torch.from_numpy(points)

    chosen = greedy_coreset(features, 12, projection_dim=None, generator=torch.Generator().manual_seed(0))
    start = int(torch.randint(300, (1,), generator=torch.Generator().manual_seed(0)).item())
    assert chosen.tolist() == _reference_farthest_points(points, 12, start)
    assert _farthest_points_torch(features, 12, start).tolist() == chosen.tolist()
    # one point from each cluster: the k-centre cover
    nearest_centre = np.linalg.norm(points[chosen.numpy()][:, None] - centres[None], axis=2).argmin(axis=1)
    assert sorted(nearest_centre.tolist()) == list(range(12))


def test_streaming_coreset_keeps_the_requested_bank_size() -> None:
    generator = torch.Generator().manual_seed(0)
    coreset = StreamingCoreset(bank_size=50, total=1000, chunk_rows=256, projection_dim=8, seed=0)
    for rows in torch.randn(1000, 32, generator=generator).split(100):
        coreset.add(rows)
    bank = coreset.result()
    assert bank.shape == (50, 32)
    assert torch.unique(bank, dim=0).shape[0] == 50


def test_streaming_coreset_does_not_depend_on_how_rows_arrive() -> None:
    """A batch larger than a chunk is split into chunks, so selection cost stays (chunk rows x chunk
    share) and the bank is the one that chunk-sized batches give."""
    rows = torch.randn(1000, 32, generator=torch.Generator().manual_seed(1))
    banks = []
    for batch in (1000, 400, 200):
        coreset = StreamingCoreset(bank_size=60, total=1000, chunk_rows=200, projection_dim=8, seed=0)
        for part in rows.split(batch):
            coreset.add(part)
        banks.append(coreset.result())
    assert banks[0].shape == (60, 32)
    assert torch.equal(banks[0], banks[1]) and torch.equal(banks[0], banks[2])


def test_select_more_centres_continues_k_centre_from_the_centres() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    candidates = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 4.8], [20.0, 0.0]])
    chosen = select_more_centres(centres, candidates, 3).tolist()
    assert chosen == [4, 2, 3]  # farthest from the centres first, then farthest from centres + chosen
    assert 0 not in chosen  # a row the centres hold exactly adds nothing
    assert select_more_centres(centres, candidates[:1], 5).tolist() == []


def test_patchcore_two_level_coreset_on_one_machine() -> None:
    """With ``coreset_oversampling`` (default 2) the first level keeps twice the bank and the second selects the bank
    (the one-machine fit's size) from those candidates: real training patches, and defects still rank
    above normals."""
    from imaging_ad.detectors import create_detector
    from tests.synthetic import paste_defect, texture

    rng = np.random.default_rng(5)
    train = [texture(rng) for _ in range(16)]
    test = [texture(rng) for _ in range(4)] + [paste_defect(texture(rng), rng)[0] for _ in range(4)]
    params = {"image_size": 96, "batch_size": 8, "progress": False, "device": "cpu", "search": "flat"}
    params["coreset_ratio"] = 0.2
    one_level = create_detector("patchcore", **params, coreset_oversampling=1).fit(train)
    two_level = create_detector("patchcore", **params, coreset_oversampling=2).fit(train)
    assert two_level.memory_bank_.shape == one_level.memory_bank_.shape
    assert not torch.equal(two_level.memory_bank_, one_level.memory_bank_)
    rows = torch.cat([two_level.patch_rows(f)[0] for f, _ in two_level.extracted_batches(train, "rows")])
    exact = "donot_use_mm_for_euclid_dist"  # the matrix-product form rounds too coarsely to test identity
    nearest = torch.cdist(two_level.memory_bank_, rows, compute_mode=exact).min(dim=1).values
    assert float(nearest.max()) < 1e-4  # every bank row is a training patch
    scores = np.array([r.score for r in two_level.predict(test)])
    assert scores[4:].min() > scores[:4].max()
