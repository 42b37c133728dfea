"""``scan`` per runtime, paired: the same folder scanned with ``runtime="torch"`` and ``"onnxruntime"`` in
turn (rotating who goes first), each into a fresh output folder, overlays of flagged images included.
Prints a Markdown table; ``--record`` appends it to benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/bench_scan_runtime.py --model weights/chest_xray_patchcore.safetensors
        [--source ../shared/data/chest_xray/test] [--n 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "weights" / "chest_xray_patchcore.safetensors"))
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "chest_xray" / "test"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from imaging_ad.data import collect_images
    from imaging_ad.detectors import load_detector
    from imaging_ad.export import with_runtime
    from imaging_ad.scan import scan

    files = sorted(collect_images(Path(args.source)))
    files = [files[i] for i in np.linspace(0, len(files) - 1, min(args.n, len(files))).round().astype(int)]
    detector = load_detector(Path(args.model), device="cpu")
    detector.progress = False
    models = {"torch": detector, "onnxruntime": with_runtime(detector, "onnxruntime", model_path=args.model)}
    rates: dict[str, list[float]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i, path in enumerate(files):
            os.symlink(path, folder / f"{i:05d}_{path.name}")
        order = list(models)
        for round_ in range(args.rounds):
            for name in order[round_ % 2 :] + order[: round_ % 2]:
                summary = scan(folder, args.model, Path(tmp) / f"out-{name}-{round_}", detector=models[name])
                rates[name].append(summary.images_per_second)
                print(name, f"{summary.images_per_second:.1f} images/s", flush=True)
    torch_rate, ort_rate = (float(np.mean(rates[n])) for n in ("torch", "onnxruntime"))
    text = (
        "| runtime | scan images/s (mean of rounds) | rounds |\n|---|---|---|\n"
        f"| torch | {torch_rate:.1f} | {', '.join(f'{r:.1f}' for r in rates['torch'])} |\n"
        f"| onnxruntime | {ort_rate:.1f} | {', '.join(f'{r:.1f}' for r in rates['onnxruntime'])} |\n\n"
        f"onnxruntime / torch: {ort_rate / torch_rate:.2f}x; {len(files)} images of {args.source}, model "
        f"{Path(args.model).name}, overlays of flagged images; load average {os.getloadavg()[0]:.1f}.\n"
    )
    print(text)
    if args.record:
        with RESULTS.open("a") as handle:
            handle.write(
                f"\n## scan per runtime, paired (issue 21) — {date.today()}\n\nCommand: `PYTHONPATH=. python "
                f"benchmarks/bench_scan_runtime.py --n {args.n} --rounds {args.rounds} --record`\n\n{text}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
