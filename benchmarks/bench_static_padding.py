"""tf-style "same" padding, dynamic (timm's Conv2dSame: pad amounts computed from the input's shape at run
time) vs static (fixed for the input size, imaging_ad.export.static_padding), as ONNX Runtime runs the
backbone: node counts of the exported and the optimised graphs, and images/s on one random batch, the
two sessions in turn. Prints a Markdown table; ``--record`` appends it to benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/bench_static_padding.py [--size 256] [--batch 16] [--rounds 6]
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    import onnx
    import onnxruntime as ort
    import torch

    from imaging_ad.backbones import create_backbone
    from imaging_ad.export.static_padding import count_dynamic_padding, with_static_padding

    module = create_backbone(args.backbone, out_indices=(3, 4)).eval()
    variants = {"dynamic": copy.deepcopy(module), "static": with_static_padding(module, args.size)}
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    rows, sessions, outputs = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in variants.items():
            path, optimised = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.opt.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    variant,
                    (torch.zeros(2, 3, args.size, args.size),),
                    str(path),
                    dynamo=False,
                    input_names=["images"],
                    dynamic_axes={"images": {0: "b"}},
                    opset_version=17,
                )
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = len(os.sched_getaffinity(0))
            options.optimized_model_filepath = str(optimised)
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            outputs[name] = sessions[name].run(None, {"images": x})
            before = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
            after = collections.Counter(n.op_type for n in onnx.load(str(optimised)).graph.node)
            rows.append(
                [
                    name,
                    count_dynamic_padding(variant),
                    before["Pad"],
                    before["Shape"],
                    after["Pad"],
                    after["Shape"],
                    after["ReorderInput"] + after["ReorderOutput"],
                ]
            )
        seconds = {name: 0.0 for name in sessions}
        for _ in range(args.rounds):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"images": x})
                seconds[name] += time.perf_counter() - start
    same = max(float(np.abs(a - b).max()) for a, b in zip(outputs["dynamic"], outputs["static"], strict=True))
    head = (
        "| padding | dynamic-pad modules | Pad (exported) | Shape (exported) | Pad (optimised) | Shape (optimised) "
        "| layout reorders (optimised) | images/s |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head] + [
        "| " + " | ".join(str(v) for v in row) + f" | {args.rounds * args.batch / seconds[row[0]]:.1f} |"
        for row in rows
    ]
    text = "\n".join(lines) + (
        f"\n\nstatic / dynamic: {seconds['dynamic'] / seconds['static']:.2f}x; largest output difference "
        f"{same:.1e}. {args.backbone}, {args.size} px, batch {args.batch}, {args.rounds} rounds in turn, "
        f"load average {os.getloadavg()[0]:.1f}.\n"
    )
    print(text)
    if args.record:
        with RESULTS.open("a") as handle:
            handle.write(
                f"\n## Static vs dynamic tf 'same' padding in ONNX Runtime (issue 21) — {date.today()}\n\n"
                f"Command: `PYTHONPATH=. python benchmarks/bench_static_padding.py --record`\n\n{text}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
