"""Runtimes side by side (issue 21): images/s predicting from files and from preprocessed tensors, for the
torch path, the ONNX Runtime path (``--runtime onnxruntime``) and, optionally, the code of an older commit
(``--base``: a worktree of it, run as a subprocess with PYTHONPATH pointing at it), paired in one run.

For each (dataset, detector): fit with default settings on ``--train`` training normals (the same images
for the base commit's own fit in its subprocess), then, ``--repeats`` times in rotating order, predict the
same ``--test`` test images (evenly spaced over the sorted test split, so both classes) from their files
with each runtime; then score the preprocessed tensors (reading and preprocessing left out), and the
backbone alone (torch eager vs. onnxruntime on the static-padded feature module). The CPU's fp32 peak is
a large matrix product in the same run (the best of NumPy's BLAS and torch), the backbone's FLOPs are
torch's FLOP counter. Also: parity (image scores, verdicts) and image AUROC per runtime on those images.
Prints a Markdown table; ``--record`` appends it to benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/bench_runtime.py --base /work/wt/base2c [--datasets magnetic_tile chest_xray]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from recording import spaced

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PARAMS = {"device": "cpu", "progress": False}


# -- the base commit's side, run in a subprocess with its own imaging_ad on PYTHONPATH ---------------


def base_child(listing: str, detector_name: str) -> int:
    """Fit on the listed training files, then time ``predict`` on test files ``start:stop`` each time a line
    ``go START STOP`` arrives; prints ``ready`` and then one number (seconds) per ``go``."""
    from imaging_ad.detectors import create_detector

    lines = Path(listing).read_text().splitlines()
    split = lines.index("--")
    train, test = lines[:split], lines[split + 1 :]
    detector = create_detector(detector_name, **PARAMS).fit(train)
    detector.predict(test[:16])  # warm-up
    print("ready", flush=True)
    for command in sys.stdin:
        words = command.split()
        if not words or words[0] != "go":
            break
        start = time.perf_counter()
        detector.predict(test[int(words[1]) : int(words[2])])
        print(f"{time.perf_counter() - start:.6f}", flush=True)
    return 0


class Base:
    """The older commit's predict, timed on request (one long-lived subprocess per model)."""

    def __init__(self, worktree: Path, listing: Path, detector_name: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(worktree)}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(listing), detector_name],
            cwd=worktree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"base commit's child did not start: {line!r}")

    def time(self, start: int, stop: int) -> float:
        self.proc.stdin.write(f"go {start} {stop}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


# -- this tree's side ---------------------------------------------------------------------------------


def peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matrix product of two n x n matrices: the best GFLOP/s of NumPy's BLAS and torch."""
    import torch

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.T.copy()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    best = 0.0
    for multiply in (lambda: a @ b, lambda: torch.mm(ta, tb)):
        multiply()
        for _ in range(repeats):
            start = time.perf_counter()
            multiply()
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def backbone_gflop(module, size: int) -> float:
    """Forward FLOPs of one image (torch's FLOP counter: a multiply-add counts 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def backbone_session(detector, folder: Path, threads: int):
    """onnxruntime session of the detector's feature module alone (static padding, as the full graph)."""
    import warnings

    import onnxruntime as ort
    import torch

    from imaging_ad.export.static_padding import with_static_padding

    size = detector.preprocessor_.image_size
    module = with_static_padding(detector.feature_module(), size).eval()
    path = folder / "backbone.onnx"
    outputs = [f"f{i}" for i in range(len(module(torch.zeros(1, 3, size, size))))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(2, 3, size, size),),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={"images": {0: "b"}, **{o: {0: "b"} for o in outputs}},
            opset_version=17,
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(run, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        out.append(time.perf_counter() - start)
    return out


def bench_one(dataset_dir: Path, detector_name: str, args, peak: float) -> dict:
    import torch

    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.export import load_model
    from imaging_ad.export.compiled import cpu_cores
    from imaging_ad.inference import load

    dataset = discover_dataset(dataset_dir)
    train = [str(s.path) for s in spaced(sorted(dataset.train, key=lambda s: str(s.path)), args.train)]
    test_samples = spaced(sorted(dataset.test, key=lambda s: str(s.path)), args.test)
    test = [str(s.path) for s in test_samples]
    labels = np.array([s.label for s in test_samples])
    row: dict = {"dataset": dataset_dir.name, "detector": detector_name, "n_test": len(test)}
    with tempfile.TemporaryDirectory(prefix="bench_runtime-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        path = create_detector(detector_name, **PARAMS).fit(train).save(folder / "model.safetensors")
        row["fit_s"] = time.perf_counter() - start
        torch_model = load_model(path, runtime="torch", device="cpu")
        start = time.perf_counter()
        ort_model = load_model(path, runtime="onnxruntime")
        row["ort_build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        load_model(path, runtime="onnxruntime")
        row["ort_cached_load_s"] = time.perf_counter() - start
        runs: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        base = None
        if args.base:
            listing = folder / "files.txt"
            listing.write_text("\n".join([*train, "--", *test]))
            base = Base(Path(args.base), listing, detector_name)
            runs["base"] = []
        torch_model.predict(test[:16]), ort_model.predict(test[:16])  # warm-up
        # chunk by chunk, each runtime in turn (rotating who goes first): a shared machine's load drifts
        # over minutes, and this way it hits every runtime alike
        order = list(runs)
        turn = 0
        for _ in range(args.repeats):
            for start in range(0, len(test), args.chunk):
                stop = min(start + args.chunk, len(test))
                for name in order[turn % len(order) :] + order[: turn % len(order)]:
                    if name == "base":
                        runs[name].append(base.time(start, stop))
                    else:
                        model = torch_model if name == "torch" else ort_model
                        runs[name].extend(timed(lambda m=model, a=start, b=stop: m.predict(test[a:b]), 1))
                turn += 1
        if base is not None:
            base.close()
        for name, seconds in runs.items():
            row[f"files_{name}"] = args.repeats * len(test) / float(np.sum(seconds))

        # results: parity and AUROC
        want, got = torch_model.predict(test), ort_model.predict(test)
        s_t = np.array([r.score for r in want])
        s_o = np.array([r.score for r in got])
        row["max_rel_score_diff"] = float(np.max(np.abs(s_o - s_t) / np.abs(s_t)))
        row["verdicts_equal"] = int(sum(a.is_anomaly == b.is_anomaly for a, b in zip(want, got, strict=True)))
        if 0 < labels.sum() < len(labels):
            from sklearn.metrics import roc_auc_score

            row["auroc_torch"] = roc_auc_score(labels, s_t)
            row["auroc_onnxruntime"] = roc_auc_score(labels, s_o)

        # preprocessed tensors: the model alone (plus smoothing), batch by batch
        pre = torch_model.preprocessor_
        tensors = np.stack([load(p, pre).image for p in test])
        size = torch_model.batch_size
        chunks = [tensors[i : i + size] for i in range(0, len(tensors), size)]
        tensor_runs: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        for _ in range(args.repeats):
            for chunk in chunks:  # batch by batch, in turn
                for name, model in (("torch", torch_model), ("onnxruntime", ort_model)):
                    tensor_runs[name].extend(timed(lambda m=model, c=chunk: m.score_batch(c), 1))
        for name, seconds in tensor_runs.items():
            row[f"tensors_{name}"] = args.repeats * len(test) / float(np.sum(seconds))

        # the backbone alone
        module = torch_model.feature_module()
        gflop = backbone_gflop(module, pre.image_size)
        session = backbone_session(torch_model, folder, cpu_cores())
        backbone_runs: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        batch = torch.from_numpy(chunks[0])
        with torch.inference_mode():
            module(batch), session.run(None, {"images": chunks[0]})
            for _ in range(args.repeats):
                for chunk in chunks:
                    backbone_runs["torch"].extend(timed(lambda c=chunk: module(torch.from_numpy(c)), 1))
                    backbone_runs["onnxruntime"].extend(
                        timed(lambda c=chunk: session.run(None, {"images": c}), 1)
                    )
        row["backbone_gflop_per_image"] = gflop
        row["image_size"] = pre.image_size
        row["batch_size"] = size
        for name, seconds in backbone_runs.items():
            per_second = args.repeats * len(test) / float(np.sum(seconds))
            row[f"backbone_{name}"] = per_second
            row[f"backbone_gflops_{name}"] = per_second * gflop
        row["peak_gflops"] = peak
    return row


def table(rows: list[dict], has_base: bool) -> str:
    head = "| dataset | detector | "
    if has_base:
        head += "base 2c36f86 files img/s | "
    head += (
        "torch files img/s | onnxruntime files img/s | "
        + ("ort / base | " if has_base else "")
        + "ort / torch | torch tensors img/s | ort tensors img/s | backbone torch img/s (GFLOP/s) | "
        "backbone ort img/s (GFLOP/s) | ort backbone % of peak | max rel. score diff | same verdicts | "
        "AUROC torch / ort |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["dataset"], r["detector"]]
        if has_base:
            cells.append(f"{r['files_base']:.1f}")
        cells += [f"{r['files_torch']:.1f}", f"{r['files_onnxruntime']:.1f}"]
        if has_base:
            cells.append(f"**{r['files_onnxruntime'] / r['files_base']:.2f}x**")
        cells += [
            f"{r['files_onnxruntime'] / r['files_torch']:.2f}x",
            f"{r['tensors_torch']:.1f}",
            f"{r['tensors_onnxruntime']:.1f}",
            f"{r['backbone_torch']:.1f} ({r['backbone_gflops_torch']:.0f})",
            f"{r['backbone_onnxruntime']:.1f} ({r['backbone_gflops_onnxruntime']:.0f})",
            f"{100 * r['backbone_gflops_onnxruntime'] / r['peak_gflops']:.0f}%",
            f"{r['max_rel_score_diff']:.1e}",
            f"{r['verdicts_equal']}/{r['n_test']}",
            f"{r.get('auroc_torch', float('nan')):.4f} / {r.get('auroc_onnxruntime', float('nan')):.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["magnetic_tile", "chest_xray"])
    parser.add_argument("--detectors", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--train", type=int, default=200, help="training normals per fit")
    parser.add_argument("--test", type=int, default=200, help="test images timed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=40, help="images per paired turn when predicting files")
    parser.add_argument("--base", default=None, help="worktree of the commit to compare with (e.g. 2c36f86)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return base_child(*args.child)
    load = os.getloadavg()
    peak = peak_gflops()
    print(f"fp32 peak (2048^3 matrix product): {peak:.0f} GFLOP/s", flush=True)
    rows = []
    for name in args.datasets:
        for detector_name in args.detectors:
            row = bench_one(SHARED / name, detector_name, args, peak)
            print(row, flush=True)
            rows.append(row)
    from imaging_ad.export.compiled import cpu_model

    text = table(rows, bool(args.base))
    load_after = os.getloadavg()
    build = ", ".join(f"{r['dataset']}/{r['detector']} {r['ort_build_s']:.1f} s" for r in rows)
    cached = ", ".join(f"{r['ort_cached_load_s']:.1f}" for r in rows)
    notes = (
        f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; fp32 peak measured in this run: {peak:.0f} GFLOP/s "
        f"(2048^3 matrix product). Load average before/after: {load[0]:.1f} / {load_after[0]:.1f}.  \n"
        f"Backbone FLOPs per image (torch FLOP counter): "
        + ", ".join(
            f"{r['dataset']} {r['backbone_gflop_per_image']:.2f} GFLOP at {r['image_size']} px"
            for r in rows[:: len(args.detectors)]
        )
        + f". First use (export, check, session): {build}; a cached load: {cached} s.\n"
    )
    print(text + notes)
    if args.record:
        command = "PYTHONPATH=. python " + " ".join(["benchmarks/bench_runtime.py", *sys.argv[1:]])
        with RESULTS.open("a") as handle:
            handle.write(
                f"\n## Runtimes: torch vs onnxruntime (issue 21) — {date.today().isoformat()}\n\n"
                f"Command: `{command}`  \n{args.train} training normals per fit, {args.test} test images "
                f"(evenly spaced over the sorted test split), {args.repeats} passes; files: chunks of {args.chunk} "
                "images, each runtime in turn on each chunk (rotating who goes first); tensors and backbone: "
                "batch by batch in turn. Images/s = images / total seconds per runtime.\n\n"
                + text
                + "\n"
                + notes
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
