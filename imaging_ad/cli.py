"""``imaging-ad`` command line: a thin layer over the library calls.

imaging-ad dataset DATA                      what discovery finds
imaging-ad fit DATA --detector patchcore --out MODEL
imaging-ad evaluate MODEL DATA [--json PATH] [--plots DIR]
imaging-ad predict MODEL IMAGE_OR_DIR... [--heatmaps DIR] [--json PATH]
imaging-ad export MODEL --format onnx|torchscript --out PATH   one graph + JSON sidecar
imaging-ad keygen KEYFILE / imaging-ad sign MODEL --key KEYFILE  authenticity (see imaging_ad.trust)
imaging-ad info IMAGE...                     what the reader sees in a file
imaging-ad backbones                         backbones available offline
imaging-ad demo [--host H] [--port P] [--data-dir D] [--allowed-root DIR]   the Gradio web demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from imaging_ad.io import ImageReadError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ImageReadError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"imaging-ad {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imaging-ad", description="Anomaly detection for medical and industrial images."
    )
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("dataset", help="describe what dataset discovery finds in DATA")
    p.add_argument("data", help="MVTec-style folder, folder of images, or CSV manifest")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_dataset)

    p = sub.add_parser("fit", help="fit a detector on the normal training images of DATA")
    p.add_argument("data")
    p.add_argument("--detector", default="patchcore", help="registered detector name (default: patchcore)")
    p.add_argument("--backbone", default=None, help="timm model name (default: tf_efficientnet_lite0)")
    p.add_argument(
        "--backbone-weights", default=None, help="local .safetensors/.pth weights for the backbone"
    )
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--aspect", choices=("stretch", "letterbox"), default=None)
    p.add_argument(
        "--clahe", action="store_true", help="contrast-limited histogram equalisation (radiographs)"
    )
    p.add_argument("--target-fpr", type=float, default=None, help="false-positive rate the threshold aims at")
    p.add_argument(
        "--validation", default=None, help="folder of normal images for thresholds (default: hold out)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="any detector hyperparameter"
    )
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    p.set_defaults(run=_fit)

    p = sub.add_parser("evaluate", help="metrics of MODEL on the test split of DATA")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    p.add_argument("--plots", default=None, help="write ROC/PR curves and example overlays here")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("predict", help="score images or folders of images")
    p.add_argument("model", help="checkpoint (.safetensors) or exported model (.onnx, .pt/.ts + its .json)")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--heatmaps", default=None, help="write heatmap overlays (PNG) here")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_predict)

    p = sub.add_parser("export", help="export a fitted model to ONNX or TorchScript, with a JSON sidecar")
    p.add_argument("model", help="fitted model file (.safetensors)")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, help="file to write (.onnx, .pt); the sidecar is OUT.json")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.set_defaults(run=_export)

    p = sub.add_parser(
        "scan", help="score every image in a folder (resumable); results.csv/.jsonl, overlays, report.html"
    )
    p.add_argument("input_dir", help="folder searched recursively (DICOM without extension included)")
    p.add_argument("--model", required=True, help="fitted model file (.safetensors)")
    p.add_argument("--out", required=True, help="output folder; re-running the same command resumes")
    p.add_argument("--threshold", type=float, default=None, help="raw score threshold (default: calibrated)")
    p.add_argument("--heatmaps", choices=("flagged", "all", "none"), default="flagged", help="overlays")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="read/preprocess threads (default: 2-4)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's batch size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_scan)

    p = sub.add_parser(
        "sign", help="sign a model file (or an export and its sidecar) with an Ed25519 key: writes MODEL.sig"
    )
    p.add_argument("model", help="model file (.safetensors) or exported model (.onnx, .pt/.ts + its .json)")
    p.add_argument(
        "--key", required=True, help="Ed25519 private key file (make one with `imaging-ad keygen`)"
    )
    p.set_defaults(run=_sign)

    p = sub.add_parser(
        "keygen", help="make an Ed25519 key pair for `imaging-ad sign`: KEYFILE and KEYFILE.pub"
    )
    p.add_argument("keyfile", help="private key to write (kept secret); the public key goes to KEYFILE.pub")
    p.set_defaults(run=_keygen)

    p = sub.add_parser("info", help="show what the reader sees in image files")
    p.add_argument("images", nargs="+")
    p.set_defaults(run=_info)

    p = sub.add_parser("backbones", help="list backbones (offline-available first)")
    p.add_argument(
        "--all", action="store_true", help="also list every timm model (needs a network for weights)"
    )
    p.set_defaults(run=_backbones)

    p = sub.add_parser(
        "demo", help="web demo (Gradio): inspect, review, batch, learn; serves 127.0.0.1 unless --host"
    )
    try:  # options live with the demo (also `python -m demo`); importing them loads no Gradio
        from demo.launcher import add_arguments as demo_arguments
    except ImportError:  # demo/ not installed alongside: `imaging-ad demo` says so when run
        pass
    else:
        demo_arguments(p)
    p.set_defaults(run=_demo)
    return parser


def _dataset(args: argparse.Namespace) -> int:
    from imaging_ad.data import discover_dataset

    dataset = discover_dataset(args.data)
    print(json.dumps(dataset.summary(), indent=2) if args.json else dataset.describe())
    return 0


def _fit(args: argparse.Namespace) -> int:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector

    dataset = discover_dataset(args.data)
    params = {key: value for key, value in (_parse_param(p) for p in args.param)}
    for option, name in (
        ("backbone", "backbone"),
        ("backbone_weights", "backbone_weights"),
        ("image_size", "image_size"),
        ("aspect", "aspect"),
        ("target_fpr", "target_fpr"),
    ):
        if getattr(args, option) is not None:
            params[name] = getattr(args, option)
    if args.clahe:
        params["clahe"] = True
    params["device"] = args.device
    detector = create_detector(args.detector, **params)
    validation = discover_dataset(args.validation).train if args.validation else None
    print(
        f"fitting {args.detector} on {len(dataset.train)} normal images from {dataset.root}", file=sys.stderr
    )
    start = time.perf_counter()
    detector.fit(dataset.train, validation_images=validation)
    seconds = time.perf_counter() - start
    path = detector.save(args.out)
    cal = detector.calibration_
    print(
        f"fitted in {seconds:.1f} s; image threshold {cal.image_threshold:.4g} at {cal.target_fpr:.1%} FPR "
        f"on {cal.n_normal} held-out normals; saved {path}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import load_detector
    from imaging_ad.evaluation import evaluate, save_plots

    detector = load_detector(Path(args.model), device=args.device)
    _say_trust(args.model)
    dataset = discover_dataset(args.data)
    evaluation = evaluate(detector, dataset)
    report = evaluation.report
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "average_precision", "precision", "recall"):
        value = report.get(key)
        print(f"{key:>18}: {'n/a' if value is None else f'{value:.4f}'}")
    print(f"{'images_per_second':>18}: {evaluation.images_per_second:.2f}")
    for category, values in sorted(report.get("per_category", {}).items()):
        auroc = values.get("image_auroc")
        print(
            f"{'AUROC ' + category:>18}: {'n/a' if auroc is None else f'{auroc:.4f}'} ({values['num_images']} images)"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plots:
        written = save_plots(evaluation, dataset, args.plots)
        print(f"wrote {len(written)} plots to {args.plots}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from imaging_ad.export.runtime import is_exported_model, load_exported
    from imaging_ad.io import read_image
    from imaging_ad.io.safe_text import printable
    from imaging_ad.visualize import overlay, save_png

    if is_exported_model(args.model):  # ONNX runs without torch: import no detector code for it
        detector = load_exported(args.model, device=args.device)
    else:
        from imaging_ad.detectors import load_detector

        detector = load_detector(Path(args.model), device=args.device)
    _say_trust(args.model)
    paths = _expand_inputs(args.inputs)
    if not paths:
        raise ValueError("no image files found in the given inputs")
    rows = []
    chunk = max(detector.batch_size * 4, 1)  # bounded memory however many files are given
    for offset in range(0, len(paths), chunk):
        readable = []
        for path in paths[offset : offset + chunk]:  # a bad file gets a row with its error, the run goes on
            try:
                readable.append((path, read_image(path)))
            except ImageReadError as exc:
                rows.append({"path": str(path), "error": str(exc)})
        results = detector.predict([record for _, record in readable]) if readable else []
        for (path, record), result in zip(readable, results, strict=True):
            if result.error is not None:  # a NaN score or map: an error row, never a verdict
                rows.append({"path": str(path), "error": f"{path}: {result.error}"})
                continue
            row = {
                "path": str(path),
                "score": result.score,
                "normalized_score": result.normalized_score,
                "is_anomaly": result.is_anomaly,
                "threshold": detector.calibration_.image_threshold,
                "height": record.meta.height,
                "width": record.meta.width,
            }
            if args.heatmaps:
                out = Path(args.heatmaps) / f"{len(rows):05d}_{path.stem}_heatmap.png"  # stems can repeat
                row["heatmap"] = str(save_png(out, overlay(record.pixels, result.heatmap)))
            rows.append(row)
            flag = "ANOMALY" if result.is_anomaly else "normal "
            print(f"{flag}  {result.normalized_score:.3f}  {result.score:10.4f}  {printable(path)}")
    for row in rows:
        if "error" in row:
            print(f"ERROR    {printable(row['error'])}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2, allow_nan=False))  # strict JSON: no NaN
    return 0


def _export(args: argparse.Namespace) -> int:
    from imaging_ad.export import export_model

    files = export_model(args.model, args.out, args.format, opset=args.opset)
    check = files.verification
    print(
        f"exported {files.format} to {files.model} (sidecar {files.sidecar}); checked against the model: "
        f"scores within {check['max_score_relative_difference']:.1e} relative, heatmaps within "
        f"{check['max_heatmap_difference_relative_to_max']:.1e} of their maximum"
    )
    return 0


def _scan(args: argparse.Namespace) -> int:
    from imaging_ad.scan import scan

    try:
        summary = scan(
            args.input_dir,
            args.model,
            args.out,
            threshold=args.threshold,
            heatmaps=args.heatmaps,
            device=args.device,
            workers=args.workers,
            batch_size=args.batch_size,
            progress_bar=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(
            "imaging-ad scan: interrupted; finished batches are saved, run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except OSError as exc:  # e.g. the output folder: disk full, no permission (bad input files are rows)
        print(f"imaging-ad scan: error: {exc}", file=sys.stderr)
        return 1
    print(summary)
    _say_trust(args.model)
    return 0


def _sign(args: argparse.Namespace) -> int:
    from imaging_ad.export.sidecar import is_exported_model, sidecar_path
    from imaging_ad.trust import KEYS_ENV, sign_model

    sidecar = sidecar_path(args.model) if is_exported_model(args.model) else None
    signature = sign_model(args.model, args.key, sidecar=sidecar)
    covered = f"{args.model} and its sidecar {sidecar}" if sidecar else args.model
    print(
        f"signed {covered}: {signature}. Machines that list the public key in {KEYS_ENV} load the model only "
        "while it and this signature are unchanged"
    )
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from imaging_ad.trust import KEYS_ENV, generate_key

    private, public = generate_key(args.keyfile)
    print(
        f"wrote the private key {private} (keep it secret; it signs models) and the public key {public} "
        f"(give it to machines that load models: {KEYS_ENV}={public})"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from imaging_ad.io import read_image

    status = 0
    for path in args.images:
        try:
            record = read_image(path)
        except ImageReadError as exc:
            print(f"{path}: ERROR {exc.reason}", file=sys.stderr)
            status = 1
            continue
        meta = record.meta
        print(
            f"{path}: {meta.format} {meta.width}x{meta.height} {meta.channels}ch {meta.bit_depth}-bit "
            f"dtype={record.pixels.dtype} range=[{record.pixels.min()}, {record.pixels.max()}]"
            + (
                f" modality={meta.modality} window={meta.window} voi={meta.voi_applied}"
                if meta.format == "DICOM"
                else ""
            )
        )
    return status


def _backbones(args: argparse.Namespace) -> int:
    from imaging_ad.backbones import list_backbones

    offline = list_backbones(offline_only=True)
    for name in offline:
        print(f"{name}  (bundled weights, works offline)")
    if args.all:
        for name in list_backbones():
            if name not in offline:
                print(name)
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from demo.launcher import run
    except ImportError as exc:
        raise RuntimeError(
            f"the demo package is not installed ({exc}); install the project with `pip install -e .`"
        ) from exc
    return run(args)


def _say_trust(model: str) -> None:
    """What loading the model established: integrity only, or authenticity (see imaging_ad.trust)."""
    from imaging_ad.trust import trust_note

    print(f"model {model}: {trust_note()}", file=sys.stderr)


def _expand_inputs(inputs: list[str]) -> list[Path]:
    from imaging_ad.data import collect_images

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        paths.extend(collect_images(path) if path.is_dir() else [path])
    return paths


def _parse_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"--param expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


if __name__ == "__main__":
    raise SystemExit(main())
