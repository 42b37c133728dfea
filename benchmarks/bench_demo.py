"""The demo's Inspect latency: the library path the Inspect handler takes (read + predict + overlay + queue)
for one 224 px example X-ray with the shipped model, cold (first call of a fresh process: model load
included) and warm (median of the next calls), with the torch thread count the demo sets. Each run is a
fresh process, so runs of two checkouts can be paired. Prints a Markdown table and appends it to
benchmarks/RESULTS.md.

    python benchmarks/bench_demo.py [--repeats 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_detectors import RESULTS, machine  # noqa: E402


def child(repeats: int, runtime: str = "torch") -> dict:
    import numpy as np
    import torch

    from imaging_ad.app.config import EXAMPLES_DIR, DemoConfig
    from imaging_ad.app.launcher import default_threads
    from imaging_ad.app.service import DemoService

    torch.set_num_threads(default_threads())
    examples = sorted(EXAMPLES_DIR.glob("*.jpeg"))
    with tempfile.TemporaryDirectory() as data:
        service = DemoService(DemoConfig(data_dir=Path(data), device="cpu", runtime=runtime))
        start = time.perf_counter()
        service.inspect(examples[0])
        cold = time.perf_counter() - start
        warm = []
        for i in range(repeats):
            start = time.perf_counter()
            service.inspect(examples[1 + i % (len(examples) - 1)])
            warm.append(time.perf_counter() - start)
    return {"cold_ms": cold * 1000, "warm_ms": float(np.median(warm)) * 1000, "threads": default_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--runtimes",
        nargs="+",
        default=["torch"],
        help="demo --runtime values, run in turn in each run (onnxruntime: its graph cache next to the shipped "
        "model is cleared before the first run, so run 1's cold figure includes building it)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="torch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats, args.runtime)))
        return
    if any(r != "torch" for r in args.runtimes):
        import shutil

        for cache in (ROOT / "weights").glob("*.safetensors.ort"):
            shutil.rmtree(cache)
    rows = []
    for run in range(args.runs):
        for runtime in args.runtimes:
            done = subprocess.run(
                [sys.executable, __file__, "--child", "--repeats", str(args.repeats), "--runtime", runtime],
                capture_output=True,
                text=True,
                check=True,
            )
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(
                f"| {run + 1} | {runtime} | {figures['threads']} | {figures['cold_ms']:.0f} | "
                f"{figures['warm_ms']:.0f} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| run | runtime | threads | cold ms (first call) | warm ms (median) |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    section = (
        f"\n## Demo Inspect latency — {date.today().isoformat()}\n\n"
        f"Machine: {machine()}  \nCommand: `python benchmarks/bench_demo.py --repeats {args.repeats} "
        f"--runs {args.runs} --runtimes {' '.join(args.runtimes)}`\n\n{table}\n"
    )
    print(section)
    with RESULTS.open("a") as handle:
        handle.write(section)


if __name__ == "__main__":
    main()
