"""Peak memory of fitting a detector on many images (default: PatchCore on 10,000).

Generates the images by augmenting the shared normal images (flips, small rotations, brightness and
contrast jitter, via albumentations), writes them to a temporary folder, then fits in a child process
and reports its peak RSS. Appends a row to benchmarks/RESULTS.md.

    python benchmarks/bench_fit_memory.py [--n 10000] [--detector patchcore] [--source ../shared/data/magnetic_tile/train/good]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_detectors import RESULTS, SHARED, machine  # noqa: E402


def generate(source: Path, out: Path, n: int, seed: int = 0) -> list[Path]:
    import albumentations as A
    import cv2
    import numpy as np

    from imaging_ad.data import collect_images
    from imaging_ad.io import read_image

    originals = [read_image(p).pixels for p in collect_images(source)]
    augment = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(rotate=(-8, 8), scale=(0.9, 1.1), p=0.8),
            A.RandomBrightnessContrast(0.15, 0.15, p=0.8),
        ],
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        image = augment(image=originals[int(rng.integers(len(originals)))])["image"]
        path = out / f"{i:06d}.jpg"
        cv2.imwrite(str(path), image if image.ndim == 2 else image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(path)
    return paths


def child(folder: str, detector_name: str, params: dict) -> None:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector

    dataset = discover_dataset(folder)
    detector = create_detector(detector_name, progress=False, **params)
    start = time.perf_counter()
    detector.fit(dataset.train)
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"n": len(dataset.train), "fit_s": seconds, "peak_rss_mb": rss_mb}))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--detector", default="patchcore")
    parser.add_argument("--source", default=str(SHARED / "magnetic_tile" / "train" / "good"))
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], json.loads(args.child[2]))
        return 0
    params = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}
    with tempfile.TemporaryDirectory(prefix="imaging_ad_mem_") as tmp:
        start = time.perf_counter()
        generate(Path(args.source), Path(tmp), args.n)
        print(f"generated {args.n} images in {time.perf_counter() - start:.0f} s", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", tmp, args.detector, json.dumps(params)],
            capture_output=True,
            text=True,
        )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    result = json.loads(line[len("RESULT ") :])
    row = (
        f"| {args.detector} {json.dumps(params) if params else ''} | {result['n']} (a fraction held out for thresholds) "
        f"| {result['fit_s']:.0f} | {result['peak_rss_mb']:.0f} |"
    )
    print(row)
    with RESULTS.open("a") as handle:
        handle.write(
            f"\n## Fit memory — {date.today().isoformat()}\n\nMachine: {machine()}  \n"
            f"Command: `python benchmarks/bench_fit_memory.py {' '.join(sys.argv[1:])}`\n\n"
            "| detector | training images | fit s | peak RSS MB |\n|---|---|---|---|\n" + row + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
