"""``imaging-ad`` command line: a thin layer over the library calls.

imaging-ad dataset DATA                      what discovery finds
imaging-ad fit DATA --detector patchcore --out MODEL
imaging-ad evaluate MODEL DATA [--json PATH] [--plots DIR]
imaging-ad predict MODEL IMAGE_OR_DIR... [--heatmaps DIR] [--json PATH]
imaging-ad calibrate MODEL NORMALS... --out MODEL2   thresholds from a new site's normals
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
import textwrap
import time
import warnings
from collections.abc import Callable
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


class _Parser(argparse.ArgumentParser):
    """A parser whose epilog can be made when its help is shown: ``fit``'s lists the registered detectors,
    and importing the registry loads torch, which every other command line should not wait for."""

    def __init__(self, *args, epilog_factory: Callable[[], str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epilog_factory = epilog_factory

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def _detector_guide() -> str:
    """``fit --help``'s epilog: the detectors to use, then those kept for comparison, each with the reason
    measured against it (``Detector.recommended``)."""
    from imaging_ad.detectors import DETECTORS, list_detectors

    lines = ["recommended detectors:", "  " + ", ".join(list_detectors(recommended=True))]
    comparison = list_detectors(recommended=False)
    if comparison:
        lines += ["", "for comparison only (not recommended):"]
        lines += [
            textwrap.fill(
                f"{name}: {DETECTORS[name].not_recommended_because}",
                width=100,
                initial_indent="  ",
                subsequent_indent="    ",
            )
            for name in comparison
        ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imaging-ad", description="Anomaly detection for medical and industrial images."
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("dataset", help="describe what dataset discovery finds in DATA")
    _add_data_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_dataset)

    p = sub.add_parser(
        "fit",
        help="fit a detector on the normal training images of DATA",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog_factory=_detector_guide,
    )
    _add_data_arguments(p)
    p.add_argument(
        "--detector",
        default="patchcore",
        help="registered detector name (default: patchcore; the recommended ones are listed below)",
    )
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
    p.add_argument("--out", required=True, help="model file to write; must end in .safetensors")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="ray: fit on a Ray cluster (PaDiM, DFM, PatchCore; the [cluster] extra)",
    )
    p.add_argument("--address", default=None, help="with --engine ray: an existing Ray cluster's address")
    p.add_argument(
        "--workers", type=int, default=None, help="with --engine ray: Ray tasks (default: cluster CPUs)"
    )
    p.set_defaults(run=_fit)

    p = sub.add_parser("evaluate", help="metrics of MODEL on the test split of DATA")
    p.add_argument("model")
    _add_data_arguments(p)
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    p.add_argument("--plots", default=None, help="write ROC/PR curves and example overlays here")
    p.add_argument("--device", default="auto")
    _add_runtime_argument(p)
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("predict", help="score images or folders of images")
    p.add_argument("model", help="checkpoint (.safetensors) or exported model (.onnx, .pt/.ts + its .json)")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--heatmaps", default=None, help="write heatmap overlays (PNG) here")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--device", default="auto")
    _add_runtime_argument(p)
    p.add_argument(
        "--allow-errors",
        action="store_true",
        help="exit 0 even when some inputs could not be scored (default: exit 1 then)",
    )
    p.set_defaults(run=_predict)

    p = sub.add_parser(
        "calibrate", help="re-set a model's thresholds from a new site's normal images, without refitting"
    )
    p.add_argument("model", help="fitted model file (.safetensors)")
    p.add_argument("normals", nargs="+", help="normal images of the site, or folders of them")
    p.add_argument("--out", required=True, help="the re-calibrated model file to write (.safetensors)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_calibrate)

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
    _add_runtime_argument(p)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="read/preprocess threads (default: 2-4); with --engine ray: model-holding Ray workers "
        "(default: one per CPU of the cluster)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's batch size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where images are scored: this process (default) or a Ray cluster (the [cluster] extra); "
        "outputs are written here either way",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --engine ray: an existing Ray cluster (e.g. ray://head:10001 or auto); default: a local one",
    )
    p.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="with --engine ray: GPUs each worker reserves"
    )
    p.add_argument(
        "--dicom-out",
        default=None,
        metavar="DIR",
        help="for flagged DICOM inputs, write DICOM results here: a Secondary Capture of the overlay, a "
        "Parametric Map of the heatmap, one Key Object Selection per study (needs the [dicom] extra)",
    )
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
    from imaging_ad.app.launcher import add_arguments as demo_arguments  # loads no Gradio

    demo_arguments(p)
    p.set_defaults(run=_demo)
    return parser


def _add_runtime_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=("auto", "torch", "onnxruntime"),
        default="auto",
        help="what runs the model: onnxruntime (the fitted graph exported once, cached next to the model "
        "as MODEL.ort/, several times faster on a CPU), torch, or auto (default: whichever of the two scored "
        "this model faster on this CPU, timed once at first use and recorded beside the graph; torch when "
        "onnxruntime is missing or the detector cannot be exported; says which)",
    )


def _with_runtime(detector, args: argparse.Namespace):  # Detector -> Detector | CompiledDetector
    """The detector scored by ``--runtime``; says on stderr which runtime runs it and why."""
    from imaging_ad.export.compiled import with_runtime

    model = with_runtime(detector, args.runtime, model_path=Path(args.model))
    print(f"imaging-ad {args.command}: {model.runtime_choice}", file=sys.stderr)
    return model


def _load_for_runtime(args: argparse.Namespace):  # -> Detector (on the device the runtime wants)
    from imaging_ad.detectors import load_detector

    # onnxruntime runs a graph exported from a CPU copy: load on the CPU rather than move it later
    device = "cpu" if args.runtime == "onnxruntime" and args.device == "auto" else args.device
    return load_detector(Path(args.model), device=device)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "data",
        nargs="?",
        default=None,
        help="dataset folder (MVTec-style, train/test class folders, plain folder) or CSV manifest; with "
        "explicit folders, the folder they are relative to",
    )
    p.add_argument(
        "--normal-dir",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="folder of normal images (repeatable); a share becomes test images",
    )
    p.add_argument(
        "--abnormal-dir",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="folder of anomalous images, named NAME or after the folder (repeatable)",
    )
    p.add_argument(
        "--mask-dir",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="masks of the anomalous images, <stem>.png or <stem>_mask.png (NAME=DIR: that folder only)",
    )


def _open_dataset(args: argparse.Namespace):  # -> imaging_ad.data.Dataset
    from imaging_ad.data import open_dataset

    return open_dataset(
        args.data, normal_dirs=args.normal_dir, abnormal_dirs=args.abnormal_dir, mask_dirs=args.mask_dir
    )


def _dataset(args: argparse.Namespace) -> int:
    dataset = _open_dataset(args)
    print(json.dumps(dataset.summary(), indent=2) if args.json else dataset.describe())
    return 1 if dataset.unknown_classes else 0


def _fit(args: argparse.Namespace) -> int:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector, resolve_detector_name
    from imaging_ad.detectors.ray_fit import fits_on_ray

    # Everything that can be checked without reading an image is checked first.
    if Path(args.out).suffix != ".safetensors":
        raise ValueError(
            f"--out {args.out}: a fitted model is saved as .safetensors; name it "
            f"{Path(args.out).with_suffix('.safetensors')} (`imaging-ad export` writes .onnx or TorchScript .pt)"
        )
    detector_name = resolve_detector_name(args.detector)
    params = dict(parse_param(p) for p in args.param)
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
    detector = create_detector(detector_name, **params)  # checks every hyperparameter, reads nothing
    if args.engine == "ray" and (args.validation or not fits_on_ray(detector)):
        raise ValueError(
            "--engine ray fits PaDiM and DFM (sums of statistics) and PatchCore (a two-level coreset) with "
            "cross-fitted thresholds; "
            f"not {detector_name}" + (" with --validation" if args.validation else "")
        )
    dataset = _open_dataset(args)
    train = dataset.train  # refuses class folders of unknown meaning, naming them
    validation = discover_dataset(args.validation).train if args.validation else None
    print(f"fitting {detector_name} on {len(train)} normal images from {dataset.root}", file=sys.stderr)
    start = time.perf_counter()
    if args.engine == "ray":
        from imaging_ad.detectors.ray_fit import fit_on_ray

        fit_on_ray(detector, train, workers=args.workers, address=args.address)
    else:
        from imaging_ad.detectors.base import CalibrationWarning

        with warnings.catch_warnings():  # _report_calibration prints them, once, after the summary
            warnings.simplefilter("ignore", CalibrationWarning)
            detector.fit(train, validation_images=validation)
    seconds = time.perf_counter() - start
    path = detector.save(args.out)
    print(f"fitted in {seconds:.1f} s; saved {path}")
    _report_calibration(detector.calibration_)
    return 0


def _report_calibration(calibration) -> None:
    """What the thresholds promise, the warnings, and the training images that look least normal."""
    print(calibration.describe())
    for warning in calibration.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if calibration.outliers:
        print("most outlying calibration images (check them for anomalies, other views or scanners):")
        for name, score in calibration.outliers:
            print(f"  {score:10.4f}  {name}")


def _calibrate(args: argparse.Namespace) -> int:
    from imaging_ad.data import collect_images
    from imaging_ad.detectors import load_detector

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(
            f"--out {args.out}: a model is saved as .safetensors; name it {out.with_suffix('.safetensors')}"
        )
    images = [
        image
        for folder in args.normals
        for image in (collect_images(Path(folder)) if Path(folder).is_dir() else [Path(folder)])
    ]
    if len(images) < 2:
        raise ValueError(
            f"found {len(images)} image(s) in {', '.join(args.normals)}: site calibration needs normal images"
        )
    detector = load_detector(Path(args.model), device=args.device)
    _say_trust(args.model)
    when = time.strftime("%Y-%m-%d")
    from imaging_ad.detectors.base import CalibrationWarning

    with warnings.catch_warnings():  # _report_calibration prints them, once, after the summary
        warnings.simplefilter("ignore", CalibrationWarning)
        detector.recalibrate(
            images, source=f"site calibration on {when}: {len(images)} normals from {', '.join(args.normals)}"
        )
    path = detector.save(out)
    print(f"re-calibrated {args.model} on {len(images)} site normals; saved {path}")
    _report_calibration(detector.calibration_)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from imaging_ad.evaluation import evaluate, format_metrics, save_plots

    dataset = _open_dataset(args)
    dataset.check_known_classes()  # before the model loads
    detector = _with_runtime(_load_for_runtime(args), args)
    _say_trust(args.model)
    evaluation = evaluate(detector, dataset)
    report = evaluation.report
    print(format_metrics(report))
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
    from imaging_ad.inference import stream
    from imaging_ad.io.safe_text import printable
    from imaging_ad.visualize import ColourScale, overlay_with_legend, save_png

    if is_exported_model(args.model):  # ONNX runs without torch: import no detector code for it
        model = load_exported(args.model, device=args.device)
        if args.runtime != "auto":
            print(
                f"imaging-ad predict: {args.model} is an exported model: it runs in its own format's runtime "
                f"({model.description.get('model_format')}), --runtime {args.runtime} does not apply",
                file=sys.stderr,
            )
    else:
        model = _with_runtime(_load_for_runtime(args), args)
    _say_trust(args.model)
    paths = _expand_inputs(args.inputs)
    if not paths:
        raise ValueError("no image files found in the given inputs")
    print(f"{'verdict':<8} {'normalised':>10}  {'score':>10}  path")
    rows = []
    keep = bool(args.heatmaps)  # overlays need the pixels
    for outcome in stream(model, paths, keep_records=keep):  # a bad file gets a row with its error
        if not outcome.ok:  # unreadable, or a NaN score or map: an error row, never a verdict
            rows.append({"path": outcome.path, "error": outcome.error})
            continue
        result = outcome.result
        height, width = outcome.size
        row = {
            "path": outcome.path,
            "score": result.score,
            "normalized_score": result.normalized_score,
            "is_anomaly": result.is_anomaly,
            "verdict": result.verdict,
            "threshold": model.calibration_.image_threshold,
            "domain_score": result.domain_score,
            "out_of_domain": list(result.out_of_domain),
            "height": height,
            "width": width,
        }
        if args.heatmaps:
            pixels = getattr(outcome.record, "pixels", outcome.record)
            stem = Path(outcome.path).stem
            out = Path(args.heatmaps) / f"{len(rows):05d}_{stem}_heatmap.png"  # stems can repeat
            picture = overlay_with_legend(pixels, result.heatmap, ColourScale.of(model.calibration_))
            row["heatmap"] = str(save_png(out, picture))
        rows.append(row)
        flag = {"anomalous": "ANOMALY", "normal": "normal", "out of domain": "OUTSIDE"}[result.verdict]
        line = f"{flag:<8} {result.normalized_score:>10.3f}  {result.score:>10.4f}  {printable(outcome.path)}"
        if not result.in_domain:  # a confident-looking score on an image the model knows nothing of
            line += f"  (outside this model's training domain, score not meaningful: {'; '.join(result.out_of_domain)})"
        print(line)
    errors = [row for row in rows if "error" in row]
    for row in errors:
        print(f"ERROR    {printable(row['error'])}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2, allow_nan=False))  # strict JSON: no NaN
    if errors and not args.allow_errors:
        print(
            f"imaging-ad predict: {len(errors)} of {len(rows)} input(s) could not be scored "
            "(exit code 1; --allow-errors exits 0)",
            file=sys.stderr,
        )
        return 1
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
            runtime=args.runtime,
            workers=args.workers,
            batch_size=args.batch_size,
            progress_bar=not args.no_progress,
            dicom_out=args.dicom_out,
            engine=args.engine,
            address=args.address,
            gpus_per_worker=args.gpus_per_worker,
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
    print(f"imaging-ad scan: {summary.runtime}", file=sys.stderr)
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
    from imaging_ad.app.launcher import run

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


def parse_param(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (numbers, true/false, lists), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--param expects KEY=VALUE, got {text!r}")
    key = key.strip().replace("-", "_")
    if value.strip().lower() in ("true", "false"):
        return key, value.strip().lower() == "true"
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


if __name__ == "__main__":
    raise SystemExit(main())
