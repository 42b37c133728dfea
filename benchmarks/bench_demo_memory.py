"""Resident memory of the demo server while it handles large uploads (issue 18).

Starts ``demo/launch.py`` on a free port with a fresh data folder, then sends, through the HTTP API as a
browser would, zips of eight large PNGs (small on disk: black pixels compress ~1000:1) to the Batch tab,
alone, two at once, and one with a large Inspect at the same time. Samples the server's VmRSS every
20 ms and prints a Markdown table (baseline before, peak during, resident after each scenario).

    python benchmarks/bench_demo_memory.py [--max-megapixels 25]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.hostile_files import huge_png  # noqa: E402
from tests.test_demo_attacks import rss_mb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-megapixels", type=float, default=25.0)
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    work = Path(tempfile.mkdtemp(prefix="bench-demo-memory-"))
    zips = {}
    for side in (9999, 5000):
        png = huge_png(work / f"big_{side}.png", side, side, rgb=True)
        zips[side] = work / f"eight_{side}.zip"
        with zipfile.ZipFile(zips[side], "w", zipfile.ZIP_STORED) as zf:
            for i in range(8):
                zf.write(png, f"big_{i}.png")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        str(ROOT / "demo" / "launch.py"),
        "--data-dir",
        str(work / "data"),
        "--port",
        str(port),
    ]
    command += ["--device", "cpu", "--max-megapixels", str(args.max_megapixels)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGING_AD_TRUST")}
    server = subprocess.Popen(
        command, cwd=ROOT, env=env | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(360):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        rows = []

        def batch(side: int, out: list) -> None:
            start = time.time()
            summary = Client(url, verbose=False).predict(
                [handle_file(str(zips[side]))], "", None, api_name="/do_batch"
            )[0]
            out.append(f"{time.time() - start:.0f} s: {summary.split(' All scored')[0].replace('**', '')}")

        def inspect(side: int, out: list) -> None:
            time.sleep(2)  # while the batch runs
            start = time.time()
            png = handle_file(str(work / f"big_{side}.png"))
            Client(url, verbose=False).predict(png, None, "", 0.5, 0.45, api_name="/do_inspect")
            out.append(f"inspect {time.time() - start:.0f} s")

        scenarios = [
            ("eight 9999 x 9999 PNGs (2.3 MB zip)", [(batch, 9999)]),
            ("the same, two uploads at once", [(batch, 9999), (batch, 9999)]),
            ("eight 5000 x 5000 PNGs (25 MP, at the cap)", [(batch, 5000)]),
            ("the same, two uploads at once", [(batch, 5000), (batch, 5000)]),
            ("one 25 MP batch + a 25 MP Inspect", [(batch, 5000), (inspect, 5000)]),
        ]
        for name, calls in scenarios:
            baseline = rss_mb(server.pid)
            peak, done, notes = baseline, threading.Event(), []

            def sample(done: threading.Event = done) -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_mb(server.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            threads = [threading.Thread(target=f, args=(side, notes)) for f, side in calls]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            done.set()
            sampler.join()
            rows.append((name, baseline, peak, rss_mb(server.pid), "; ".join(notes)))
    finally:
        server.terminate()
        server.wait(30)
    print(f"--max-megapixels {args.max_megapixels}\n")
    print("| upload | RSS before MB | peak MB | after MB | result |\n|---|---|---|---|---|")
    for name, before, peak, after, notes in rows:
        print(f"| {name} | {before:.0f} | {peak:.0f} | {after:.0f} | {notes} |")


if __name__ == "__main__":
    main()
