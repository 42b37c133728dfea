"""Exploration: which teacher stages, averaging, width and training length suit reverse distillation
(and SimpleNet, and feature_draem's head) over the shared datasets, without refitting the backbone for
every variant.

``cache`` runs the detector's own extraction (reading, preprocessing, EfficientNet-Lite0 at 256 px)
once per dataset and keeps the stride-4/8/16/32 maps of the training and test images; ``train`` then
trains the detector's own network (``ReverseDistillationNetwork`` or ``SimpleNetNetwork``) on a
chosen subset of the cached maps for a fixed number of epochs (seed 0, no early stopping, 10% of the
training images held out as the detector holds them) and prints one JSON line: image AUROC from the
top-1% mean of the map, raw and standardised per position on the held-out normals (the detectors'
``position_statistics``), and where masks exist a pixel AUROC on the 64 x 64 grid (an approximation
for ranking variants, not the benchmark's metric). For ``feature_draem`` the row also gives the same
figures from its student's summed cosine distances (``dist_``) and from both standardised maps added
(``sum_``). ``table`` prints each tag's rows over the datasets with the mean. The defaults reached this way are then measured for real by ``bench_trained.py``.

    python benchmarks/explore_trained.py cache magnetic_tile
    python benchmarks/explore_trained.py train magnetic_tile --strides 16 32 --neighbourhood 3 \
        --width 64 --epochs 100 --tag w64
    python benchmarks/explore_trained.py train magnetic_tile --model simplenet --strides 8 16 --noise 0.3
    python benchmarks/explore_trained.py train busi --model feature_draem --epochs 100 --tag fd
    python benchmarks/explore_trained.py table w64
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import SHARED, dataset_names  # noqa: E402

from imaging_ad.detectors.layers import channel_statistics, top_mean  # noqa: E402
from imaging_ad.detectors.reverse_distillation import (  # noqa: E402
    ReverseDistillationNetwork,
    cosine_distances,
    local_average,
    summed_on_finest,
)
from imaging_ad.detectors.trained import position_statistics  # noqa: E402

STRIDES = (4, 8, 16, 32)
GRID = 64  # pixel AUROC approximation: masks and maps on this grid


def cache(args: argparse.Namespace) -> None:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors.reverse_distillation import ReverseDistillation

    warnings.simplefilter("ignore")
    data = discover_dataset(SHARED / args.dataset)
    detector = ReverseDistillation(progress=False, teacher_strides=STRIDES)
    detector._setup()
    out: dict = {}
    for split, samples in (("train", data.train), ("test", [s for s in data.samples if s.split == "test"])):
        maps: list[list[torch.Tensor]] = [[] for _ in STRIDES]
        for features, _ in detector.extracted_batches(samples, split):
            for kept, feature in zip(maps, features, strict=True):
                kept.append(feature.to(torch.float16))
        out[split] = [torch.cat(m) for m in maps]
        out[f"{split}_labels"] = torch.tensor([s.label for s in samples])
        out[f"{split}_masks"] = [str(s.mask_path) if s.mask_path else "" for s in samples]
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.cache_dir / f"{args.dataset}.pt")
    print(args.dataset, {split: [tuple(m.shape) for m in out[split]] for split in ("train", "test")})


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    cached = torch.load(args.cache_dir / f"{args.dataset}.pt")
    chosen = [STRIDES.index(s) for s in args.strides]
    inputs = _patch_grid if args.model == "simplenet" else _averaged
    train_maps = inputs([cached["train"][i] for i in chosen], args.neighbourhood)
    test_maps = inputs([cached["test"][i] for i in chosen], args.neighbourhood)
    n = len(train_maps[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 1))
    n_held = max(1, math.ceil(n * 0.1))
    held, fit = order[:n_held], order[n_held:]
    models = {
        "reverse_distillation": ReverseDistillationModel,
        "simplenet": SimpleNetModel,
        "feature_draem": FeatureDraemModel,
    }
    model = models[args.model](train_maps, fit, args)
    start = time.perf_counter()
    shuffle = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        model.network.train()
        rows = fit[torch.randperm(len(fit), generator=shuffle)]
        for first in range(0, len(rows), args.batch):
            batch = rows[first : first + args.batch]
            if len(batch) >= 2:  # a 1-image batch breaks batch norm, as in the detectors' loop
                model.step([m[batch].float() for m in train_maps])
    seconds = time.perf_counter() - start
    model.network.eval()
    labels = cached["test_labels"].numpy()
    row = {
        "dataset": args.dataset,
        "tag": args.tag,
        "model": args.model,
        "strides": args.strides,
        "neighbourhood": args.neighbourhood,
        "width": args.width,
        **({"head": "monotone, distances only"} if args.model == "feature_draem" else {}),
        "epochs": args.epochs,
        "s_per_epoch": round(seconds / args.epochs, 1),
    }
    # feature_draem: the segmentation head's map, and (prefixed dist_) its student's cosine distances
    scores = ("segmentation", "distance", "sum") if args.model == "feature_draem" else ("",)
    kept: dict = {}
    for score in scores:
        args.score = score
        prefix = {"distance": "dist_", "sum": "sum_"}.get(score, "")
        if score == "sum":  # the two standardised maps added (raw: their plain sum)
            test = kept["segmentation"][0] + kept["distance"][0]
            standardised = kept["segmentation"][1] + kept["distance"][1]
        else:
            test = model.maps(test_maps, torch.arange(len(labels)))
            position_mean, position_std = position_statistics(model.maps(train_maps, held))
            standardised = (test - position_mean) / position_std
            kept[score] = (test, standardised)
        row[prefix + "image_raw"] = round(roc_auc_score(labels, top_mean(test, 0.01).numpy()), 4)
        row[prefix + "image_positions"] = round(
            roc_auc_score(labels, top_mean(standardised, 0.01).numpy()), 4
        )
        if any(cached["test_masks"]):
            truth = np.stack([_mask(path) for path in cached["test_masks"]]).ravel()
            for key, maps in (("pix_raw", test), ("pix_positions", standardised)):
                grid = F.interpolate(maps[:, None], size=(GRID, GRID), mode="bilinear", align_corners=False)
                row[prefix + key] = round(roc_auc_score(truth, _blur(grid)[:, 0].numpy().ravel()), 4)
    print(json.dumps(row))
    with (args.cache_dir / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


class ReverseDistillationModel:
    """The detector's network, loss (1 - cosine per scale) and summed map, on cached teacher maps."""

    def __init__(self, maps: list[torch.Tensor], fit: torch.Tensor, args: argparse.Namespace) -> None:
        self.network = ReverseDistillationNetwork([m.shape[1] for m in maps], args.strides, args.width)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=args.lr, weight_decay=1e-5)

    def _distances(self, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return cosine_distances(teacher, self.network(teacher))

    def step(self, teacher: list[torch.Tensor]) -> None:
        self.optimizer.zero_grad()
        sum(d.mean() for d in self._distances(teacher)).backward()
        self.optimizer.step()

    def maps(self, data: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [summed_on_finest(self._distances([m[c].float() for m in data])) for c in rows.split(32)]
            )


class FeatureDraemModel:
    """The detector's network and loss (blobs of another image's features pasted in, the student trained
    to give back the clean maps, the head to segment the blobs) on cached teacher maps."""

    def __init__(self, maps: list[torch.Tensor], fit: torch.Tensor, args: argparse.Namespace) -> None:
        from imaging_ad.detectors.feature_draem import FeatureDraemNetwork, expected_blob_share

        self.synthetic = {
            "anomaly_probability": args.anomaly_probability,
            "coverage": tuple(args.coverage),
            "segmentation_weight": args.seg_weight,
        }
        prior = expected_blob_share(args.anomaly_probability, tuple(args.coverage))
        self.network = FeatureDraemNetwork(
            [m.shape[1] for m in maps], args.strides, args.width, args.head_width, prior
        )
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=args.lr, weight_decay=1e-5)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.args = args

    def step(self, teacher: list[torch.Tensor]) -> None:
        from imaging_ad.detectors.feature_draem import draem_loss

        loss = draem_loss(self.network, teacher, generator=self.generator, **self.synthetic)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def maps(self, data: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for c in rows.split(32):
                teacher = [m[c].float() for m in data]
                student = self.network.reconstruction(teacher)
                if self.args.score == "segmentation":
                    out.append(self.network.segmentation(teacher, student))
                else:
                    out.append(summed_on_finest(cosine_distances(teacher, student)))
        return torch.cat(out)


class SimpleNetModel:
    """The detector's adaptor + discriminator and truncated hinge on noised standardised patches."""

    def __init__(self, maps: list[torch.Tensor], fit: torch.Tensor, args: argparse.Namespace) -> None:
        from imaging_ad.detectors.simplenet import SimpleNetNetwork

        (grid,) = maps
        self.mean, self.std = channel_statistics(grid[fit])
        self.network = SimpleNetNetwork(grid.shape[1], args.hidden)
        if args.fixed_adaptor:  # identity, never trained: the adaptor cannot shrink features under the noise
            with torch.no_grad():
                self.network.adaptor.weight.copy_(torch.eye(grid.shape[1])[:, :, None, None])
                self.network.adaptor.bias.zero_()
        self.optimizer = torch.optim.Adam(
            [
                {"params": self.network.adaptor.parameters(), "lr": 0.0 if args.fixed_adaptor else args.lr},
                {"params": self.network.discriminator.parameters(), "lr": 2 * args.lr},
            ],
            weight_decay=1e-5,
        )
        self.noise, self.noise_range, self.positions = args.noise, args.noise_range, args.positions

    def step(self, maps: list[torch.Tensor]) -> None:
        (batch,) = maps
        b, d, h, w = batch.shape
        pick = torch.randperm(h * w)[: self.positions]
        patches = (batch.flatten(2)[:, :, pick].reshape(b, d, -1, 1) - self.mean) / self.std
        adapted = self.network.adaptor(patches)
        real = self.network.discriminator(adapted)
        scale = self.noise
        if self.noise_range is not None:  # fakes at many distances: each patch its own std, log-uniform
            low, high = (math.log(x) for x in self.noise_range)
            scale = torch.exp(low + (high - low) * torch.rand(b, 1, patches.shape[2], 1))
        fake = self.network.discriminator(adapted + scale * torch.randn_like(adapted))
        loss = (0.5 - real).clamp_min(0).mean() + (0.5 + fake).clamp_min(0).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def maps(self, data: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        (grid,) = data
        with torch.no_grad():
            return torch.cat(
                [-self.network((grid[c].float() - self.mean) / self.std) for c in rows.split(64)]
            )


def _averaged(maps: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Reverse distillation's input: each stage averaged as the detector averages it."""
    return [m.half() for m in local_average([m.float() for m in maps], k)]


def _patch_grid(maps: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """SimpleNet's input: the detector's own patch embeddings (stages averaged, resized onto the finest
    grid, concatenated)."""
    from imaging_ad.detectors.patchcore import patch_embeddings

    chunks = torch.arange(len(maps[0])).split(64)
    return [torch.cat([patch_embeddings([m[c].float() for m in maps], k).half() for c in chunks])]


def _mask(path: str) -> np.ndarray:
    if not path:
        return np.zeros((GRID, GRID), bool)
    return (
        cv2.resize(cv2.imread(path, cv2.IMREAD_GRAYSCALE), (GRID, GRID), interpolation=cv2.INTER_AREA) > 127
    )


def _blur(maps: torch.Tensor) -> torch.Tensor:
    import torchvision.transforms.functional as TF

    return TF.gaussian_blur(maps, 9, 1.0)


def table(args: argparse.Namespace) -> None:
    path = args.cache_dir / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    datasets = dataset_names(None)
    print("| tag | value | " + " | ".join(datasets) + " | mean |")
    print("|---" * (len(datasets) + 3) + "|")
    for tag in args.tags or sorted({r["tag"] for r in rows}):
        by = {r["dataset"]: r for r in rows if r["tag"] == tag}
        plain = ("image_raw", "image_positions", "pix_raw", "pix_positions")
        for key in [prefix + k for prefix in ("", "dist_", "sum_") for k in plain]:
            values = [by.get(d, {}).get(key) for d in datasets]
            known = [v for v in values if v is not None]
            if known:
                cells = " | ".join("" if v is None else f"{v:.3f}" for v in values)
                print(f"| {tag} | {key} | {cells} | {sum(known) / len(known):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/imaging_ad_explore_trained"))
    commands = parser.add_subparsers(dest="command", required=True)
    cached = commands.add_parser("cache", help="cache one dataset's stride-4/8/16/32 maps")
    cached.add_argument("dataset")
    trained = commands.add_parser("train", help="train one variant on a cached dataset, print a JSON line")
    trained.add_argument("dataset")
    trained.add_argument(
        "--model",
        choices=("reverse_distillation", "simplenet", "feature_draem"),
        default="reverse_distillation",
    )
    trained.add_argument("--head-width", type=int, default=64, help="feature_draem's head width")
    trained.add_argument("--anomaly-probability", type=float, default=0.5, help="feature_draem")
    trained.add_argument("--coverage", type=float, nargs=2, default=[0.02, 0.25], help="feature_draem")
    trained.add_argument("--seg-weight", type=float, default=1.0, help="feature_draem")
    trained.add_argument("--strides", type=int, nargs="+", default=[16, 32])
    trained.add_argument("--neighbourhood", type=int, default=3)
    trained.add_argument("--width", type=int, default=64, help="reverse distillation's decoder width")
    trained.add_argument("--epochs", type=int, default=100)
    trained.add_argument(
        "--lr", type=float, default=None, help="default: the detector's (2e-3 RD, 2e-4 SimpleNet)"
    )
    trained.add_argument(
        "--batch", type=int, default=None, help="default: the detector's (8 RD, 32 SimpleNet)"
    )
    trained.add_argument("--noise", type=float, default=0.3, help="SimpleNet's noise_std")
    trained.add_argument(
        "--noise-range", type=float, nargs=2, default=None, help="SimpleNet: per-patch std, log-uniform"
    )
    trained.add_argument(
        "--fixed-adaptor", action="store_true", help="SimpleNet: identity adaptor, not trained"
    )
    trained.add_argument("--hidden", type=int, default=256, help="SimpleNet's hidden_channels")
    trained.add_argument("--positions", type=int, default=256, help="SimpleNet's train_positions")
    trained.add_argument("--seed", type=int, default=0)
    trained.add_argument("--tag", default="")
    tabled = commands.add_parser("table", help="each tag's rows over the datasets, with the mean")
    tabled.add_argument("tags", nargs="*")
    args = parser.parse_args()
    if args.command == "train":
        rd = args.model != "simplenet"
        args.lr = args.lr if args.lr is not None else (2e-3 if rd else 2e-4)
        args.batch = args.batch if args.batch is not None else (8 if rd else 32)
    {"cache": cache, "train": train, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
