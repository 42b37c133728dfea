"""The same folder scanned by the local engine and by Ray (a local cluster, two 1-CPU workers), in one run.

Each engine runs in its own child process, so each driver's peak resident memory is its own; the Ray
workers' peaks are their kernel high-water marks (``VmHWM``), sampled while they live. The two scans'
rows are compared file by file (score to 1e-5 relative, verdict, error). Throughput is images per second
of each scan's scanning loop (for Ray that includes starting the actors and loading the model in them;
the cluster's own start-up is timed apart); the ratio Ray/local is what is judged. On a shared machine
``--rounds R`` splits the files into R folders and alternates the engines' order round by round, so a
load that changes during the run weighs on both engines alike.

    python benchmarks/bench_ray.py [--model M] [--source ../shared/data/magnetic_tile/test] [--n 20000]
        [--rounds 4] [--workers 2] [--heatmaps none] [--order local ray] [--no-record]

Without ``--model`` a PatchCore model is fitted on ``../shared/data/magnetic_tile`` first (a few minutes).
``--n`` builds a folder of that many hard links to the source images (1000 per sub-folder).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_detectors import RESULTS, SHARED, machine  # noqa: E402
from bench_scan import build_folder, fit_model  # noqa: E402


class WorkerMemory:
    """Peak resident memory (VmHWM, MB) of every Ray scan worker process seen, sampled in a thread."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if not (entry / "cmdline").read_bytes().startswith(b"ray::ScanWorker"):
                        continue
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        mb = int(line.split()[1]) / 1024
                        self.peaks[int(entry.name)] = max(self.peaks.get(int(entry.name), 0.0), mb)


def child(input_dir: str, model: str, options: dict) -> dict:
    from imaging_ad.scan import scan

    engine = options["engine"]
    extra: dict = {}
    ray_start_s = 0.0
    if engine == "ray":
        import ray

        start = time.perf_counter()
        from imaging_ad.scan.ray_engine import LOCAL_RAY_OPTIONS

        # as the scan starts its own local Ray: workers at the driver's priority, not Ray's niceness 15
        ray.init(num_cpus=options["workers"], log_to_driver=False, **LOCAL_RAY_OPTIONS)
        ray_start_s = time.perf_counter() - start
        extra = {"engine": "ray", "workers": options["workers"]}
    started = time.perf_counter()
    with WorkerMemory() as memory:
        summary = scan(input_dir, model, options["out"], heatmaps=options["heatmaps"], **extra)
    wall = time.perf_counter() - started
    return {
        "engine": engine,
        "n_files": summary.n_files,
        "rows": summary.n_rows,
        "errors": summary.n_errors,
        "flagged": summary.n_flagged,
        "overlays": summary.n_overlays,
        "scan_s": summary.seconds,
        "scan_ips": summary.images_per_second,
        "wall_s": wall,
        "ray_start_s": ray_start_s,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": sorted(memory.peaks.values(), reverse=True),
    }


def driver_write_rate(folder: Path, n_rows: int = 20000, block: int = 64) -> float:
    """Rows per second the driver's store appends (JSONL + fsync, CSV copy), in blocks of a Ray block's
    size: the ceiling of any cluster's scan rate, since every row passes through it."""
    from imaging_ad.scan import ResultStore, ScanSettings

    store = ResultStore(folder, ScanSettings("0" * 64, "/in", 1.0, "none")).open()
    row = {"score": 1.5, "normalized_score": 0.2, "is_anomaly": False, "threshold": 1.0, "domain_score": 0.5}
    row |= {"width": 512, "height": 384, "size": 123456, "mtime_ns": 1764000000000000000}
    start = time.perf_counter()
    for first in range(0, n_rows, block):
        store.append(
            [row | {"path": f"part{i // 1000:03d}/{i:06d}.png"} for i in range(first, first + block)]
        )
    seconds = time.perf_counter() - start
    store.release()
    return n_rows / seconds


def compare(local_out: Path, ray_out: Path) -> dict:
    """Row-by-row parity of two scans of the same folder."""
    from imaging_ad.scan import read_rows

    local = {r["path"]: r for r in read_rows(local_out)}
    remote = {r["path"]: r for r in read_rows(ray_out)}
    worst, verdicts, errors = 0.0, 0, 0
    for path, row in local.items():
        other = remote.get(path)
        if other is None:
            errors += 1
            continue
        if row["error"] != other["error"] or row["error_code"] != other["error_code"]:
            errors += 1
        if row["is_anomaly"] != other["is_anomaly"] or row["out_of_domain"] != other["out_of_domain"]:
            verdicts += 1
        if row["score"] is not None and other["score"] is not None:
            worst = max(worst, abs(other["score"] - row["score"]) / max(abs(row["score"]), 1e-12))
    return {
        "local_rows": len(local),
        "ray_rows": len(remote),
        "same_paths": set(local) == set(remote),
        "max_rel_score_diff": worst,
        "verdict_mismatches": verdicts,
        "error_mismatches": errors,
    }


def combined(rows: list[dict]) -> dict:
    """One engine's rounds as one scan: counts and seconds add up, memory peaks take the maximum."""
    total = {key: sum(r[key] for r in rows) for key in ("n_files", "rows", "errors", "flagged", "scan_s")}
    workers = [max(peaks) for peaks in zip(*(r["worker_peak_rss_mb"] for r in rows), strict=False)]
    return {
        **total,
        "engine": rows[0]["engine"],
        "rounds": len(rows),
        "scan_ips": total["rows"] / total["scan_s"],
        "ray_start_s": max(r["ray_start_s"] for r in rows),
        "driver_peak_rss_mb": max(r["driver_peak_rss_mb"] for r in rows),
        "worker_peak_rss_mb": sorted(workers, reverse=True),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="fitted model (default: fit PatchCore on magnetic_tile)"
    )
    parser.add_argument("--source", default=str(SHARED / "magnetic_tile" / "test"))
    parser.add_argument("--n", type=int, default=None, help="scan this many files built from --source")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (and the local cluster's CPUs)")
    parser.add_argument("--heatmaps", default="none", choices=("none", "flagged", "all"))
    parser.add_argument("--order", nargs=2, default=["local", "ray"], choices=("local", "ray"))
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --n: split the files into this many folders, engines alternating",
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            "RESULT " + json.dumps(child(args.child[0], args.child[1], json.loads(args.child[2]))), flush=True
        )
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tmp / "tiles.safetensors"
        if not args.model:
            print("fitting PatchCore on magnetic_tile ...", file=sys.stderr, flush=True)
            fit_model(model)
        folders = [Path(args.source)]
        if args.n:  # one folder per round, of n / rounds files each
            folders = [tmp / f"input{r}" for r in range(args.rounds)]
            for r, folder in enumerate(folders):
                build_folder(Path(args.source), folder, args.n // args.rounds + (r < args.n % args.rounds))
        runs: dict[str, list[dict]] = {"local": [], "ray": []}
        parities = []
        for r, folder in enumerate(folders):
            # the order alternates between rounds (ABBA), so a load that drifts weighs on both alike
            for engine in args.order if r % 2 == 0 else args.order[::-1]:
                options = {"engine": engine, "workers": args.workers, "heatmaps": args.heatmaps}
                options["out"] = str(tmp / f"out_{engine}_{r}")
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", str(folder), str(model), json.dumps(options)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(f"{engine} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    return 1
                row = json.loads(line[len("RESULT ") :])
                runs[engine].append(row)
                print(
                    f"round {r} {engine}: {row['rows']} rows, {row['scan_ips']:.2f} img/s, wall "
                    f"{row['wall_s']:.0f} s, driver peak {row['driver_peak_rss_mb']:.0f} MB, workers "
                    f"{row['worker_peak_rss_mb']}",
                    flush=True,
                )
            parities.append(compare(tmp / f"out_local_{r}", tmp / f"out_ray_{r}"))
            shutil.rmtree(tmp / f"out_local_{r}")
            shutil.rmtree(tmp / f"out_ray_{r}")
        write_rate = driver_write_rate(tmp / "store_rate")
    results = {engine: combined(rows) for engine, rows in runs.items()}
    parity = {
        "local_rows": sum(p["local_rows"] for p in parities),
        "ray_rows": sum(p["ray_rows"] for p in parities),
        "same_paths": all(p["same_paths"] for p in parities),
        "max_rel_score_diff": max(p["max_rel_score_diff"] for p in parities),
        "verdict_mismatches": sum(p["verdict_mismatches"] for p in parities),
        "error_mismatches": sum(p["error_mismatches"] for p in parities),
    }

    local, remote = results["local"], results["ray"]
    workers = ", ".join(f"{mb:.0f}" for mb in remote["worker_peak_rss_mb"]) or "-"
    table = (
        "| engine | files | rows | errors | flagged | scan s | img/s | driver peak RSS MB | worker peak RSS MB |\n"
        + "|---" * 9
        + "|\n"
        + "\n".join(
            f"| {r['engine']} | {r['n_files']} | {r['rows']} | {r['errors']} | {r['flagged']} | {r['scan_s']:.1f} | "
            f"{r['scan_ips']:.2f} | {r['driver_peak_rss_mb']:.0f} | {workers if r is remote else '-'} |"
            for r in (local, remote)
        )
    )
    ratio = remote["scan_ips"] / local["scan_ips"]
    order = " then ".join(args.order) + (
        f", alternating over {len(runs['ray'])} rounds" if len(runs["ray"]) > 1 else ""
    )
    note = (
        f"Throughput ratio Ray/local {ratio:.2f} (run order: {order}; heatmaps "
        f"{args.heatmaps}; Ray: {args.workers} workers of 1 CPU, local Ray start-up {remote['ray_start_s']:.1f} s "
        f"outside the timer). Parity: {parity['local_rows']} local rows, {parity['ray_rows']} Ray rows, same "
        f"paths {parity['same_paths']}, largest relative score difference {parity['max_rel_score_diff']:.2e}, "
        f"{parity['verdict_mismatches']} verdict and {parity['error_mismatches']} error mismatches. "
        f"The driver's store appends {write_rate:,.0f} rows/s (blocks of 64, fsync per block)."
    )
    print("\n" + table + "\n\n" + note)
    ok = parity["same_paths"] and not parity["verdict_mismatches"] and not parity["error_mismatches"]
    ok = ok and math.isfinite(parity["max_rel_score_diff"]) and parity["max_rel_score_diff"] <= 1e-5
    if not args.no_record:
        command = "python benchmarks/bench_ray.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a") as handle:
            handle.write(
                f"\n## Scan on Ray vs local (issue 20) — {date.today().isoformat()}\n\nMachine: {machine()}  \n"
                f"Command: `{command.strip()}`\n\n{table}\n\n{note}\n"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
