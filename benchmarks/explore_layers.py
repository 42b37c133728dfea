"""Exploration: which backbone stages, aggregation and bank size suit PatchCore on a dataset.

Extracts every stage of the backbone once per (dataset, image size, intensity, CLAHE) and caches it,
then evaluates PatchCore variants from the cache (exact faiss search), printing one JSON line each.
This is how the defaults in imaging_ad/detectors/patchcore.py were chosen (see RESULTS.md).

    python benchmarks/explore_layers.py magnetic_tile --size 256 --intensity robust \
        --combos '[{"strides": [16, 32], "frac": 0.1}, {"strides": [8, 16], "frac": 0.03, "k": 3}]'

Per-position standardisation of the image score (PatchCore's default since 2026-12-01): a combo with
``"holdout": 76, "position": "std"`` keeps 76 training images out of the bank, learns each position's
mean and spread of patch distances on them, and takes the image score as the largest standardised
distance (``"mean"`` subtracts the mean only); ``"standardise_heatmap": true`` standardises the heatmap
too. Image scores here are plain maxima (no re-weighting).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch
import torch.nn.functional as F

from imaging_ad.backbones import create_backbone
from imaging_ad.data import discover_dataset
from imaging_ad.detectors.components.coreset import greedy_coreset
from imaging_ad.io import read_image
from imaging_ad.metrics import evaluation_report
from imaging_ad.preprocess import Preprocessor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STAGE_OF_STRIDE = {4: 0, 8: 1, 16: 2, 32: 3}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--intensity", default="robust")
    parser.add_argument("--clahe", action="store_true")
    parser.add_argument("--sigma", type=float, default=4.0)
    parser.add_argument("--combos", default='[{"strides": [16, 32], "frac": 0.1}]')
    args = parser.parse_args()

    dataset = discover_dataset(SHARED / args.dataset)
    backbone = create_backbone(args.backbone, out_indices=(1, 2, 3, 4))
    pre = Preprocessor.for_backbone(
        backbone, image_size=args.size, intensity=args.intensity, clahe=args.clahe
    )
    tag = f"{args.dataset}_{args.backbone}_{args.size}_{args.intensity}_{int(args.clahe)}"
    cache = Path(tempfile.gettempdir()) / f"imaging_ad_explore_{tag}.pt"
    if cache.exists():
        train, test, sizes = torch.load(cache)
    else:
        start = time.perf_counter()
        train, _ = _extract(dataset.train, backbone, pre)
        test, sizes = _extract(dataset.test, backbone, pre)
        print(f"extracted in {time.perf_counter() - start:.0f} s", flush=True)
        torch.save((train, test, sizes), cache)

    labels = [s.label for s in dataset.test]
    has_masks = any(s.mask_path for s in dataset.test)
    masks = (
        [dataset.load_mask(s) if (s.mask_path or s.label == 0) else None for s in dataset.test]
        if has_masks
        else None
    )
    for combo in json.loads(args.combos):
        strides, k, frac = combo["strides"], combo.get("k", 3), combo.get("frac", 0.1)
        n_held_out = combo.get("holdout", 0)
        order = np.random.default_rng(0).permutation(train[0].shape[0])
        held_out, bank_images = (torch.from_numpy(np.sort(part)) for part in np.split(order, [n_held_out]))
        chunks = []
        for i in range(0, len(bank_images), 16):
            embedding = _embed(train, strides, k, bank_images[i : i + 16])
            rows = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
            keep = greedy_coreset(
                rows, max(1, int(frac * rows.shape[0])), 128, torch.Generator().manual_seed(0)
            )
            chunks.append(rows[keep])
        bank = torch.cat(chunks).numpy()
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
        position = combo.get("position", "none")
        mean, std = 0.0, 1.0
        if position != "none":
            normal_maps = _distance_maps(train, strides, k, index, held_out)
            mean = normal_maps.mean(0)
            if position == "std":
                std = normal_maps.std(0, ddof=1)
                std = np.maximum(std, 0.5 * np.median(std))  # the detector's floor
        scores, heatmaps = [], []
        for i in range(0, test[0].shape[0], 16):
            maps = _distance_maps(test, strides, k, index, slice(i, i + 16))
            standardised = (maps - mean) / std
            scores += list(standardised.reshape(len(maps), -1).max(1))
            if combo.get("standardise_heatmap"):
                maps = standardised.astype(np.float32)
            if has_masks:
                for j in range(len(maps)):
                    m = cv2.resize(maps[j], (args.size, args.size), interpolation=cv2.INTER_LINEAR)
                    heatmaps.append(
                        pre.heatmap_to_original(cv2.GaussianBlur(m, (0, 0), args.sigma), sizes[i + j])
                    )
        report = evaluation_report(labels, scores, masks=masks, heatmaps=heatmaps if has_masks else None)
        print(
            json.dumps(
                {
                    "dataset": args.dataset,
                    "size": args.size,
                    "backbone": args.backbone,
                    "intensity": args.intensity,
                    "clahe": args.clahe,
                    **combo,
                    "bank": int(bank.shape[0]),
                    **{key: report[key] for key in ("image_auroc", "pixel_auroc", "aupro")},
                }
            ),
            flush=True,
        )


def _extract(samples, backbone, pre):
    stages, sizes = [[] for _ in range(4)], []
    for i in range(0, len(samples), 16):
        records = [read_image(s.path) for s in samples[i : i + 16]]
        with torch.inference_mode():
            features = backbone(torch.stack([pre(r) for r in records]))
        for j, f in enumerate(features):
            stages[j].append(f.half())
        sizes += [r.meta.size for r in records]
    return [torch.cat(s) for s in stages], sizes


def _distance_maps(features, strides, k, index, rows) -> np.ndarray:
    """(B, h, w) distance of every patch of the selected images to its nearest memory-bank row."""
    embedding = _embed(features, strides, k, rows)
    b, d, h, w = embedding.shape
    distances, _ = index.search(embedding.permute(0, 2, 3, 1).reshape(-1, d).numpy(), 1)
    return np.sqrt(np.maximum(distances[:, 0], 0)).reshape(b, h, w)


def _embed(features, strides, k, rows):
    maps = [features[STAGE_OF_STRIDE[s]][rows].float() for s in strides]
    if k > 1:
        maps = [F.avg_pool2d(m, k, 1, k // 2, count_include_pad=False) for m in maps]
    grid = maps[0].shape[-2:]
    return torch.cat(
        [maps[0]] + [F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps[1:]], 1
    )


if __name__ == "__main__":
    main()
