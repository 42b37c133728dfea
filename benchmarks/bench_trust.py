"""Can the answers be trusted on data nobody tuned for? The acceptance figures of issue 17, over every
dataset in ../shared/data, for the default detector:

- accuracy (image AUROC; pixel AUROC and AUPRO where masks exist) next to a baseline run of older code;
- the verdict's promise: the realised false-positive rate on the test normals at the calibrated
  threshold (target 1 %), the recall there and the best recall any threshold reaches at 1 % and 3 %,
  and what the calibration says it can promise (normals, 95 % bound, warnings);
- the out-of-domain guard: the share of images it calls foreign, for own test images (normal and
  anomalous), every other dataset's test images and the photos that ship with scikit-image;
- heatmaps on content: the share of images whose heatmap maximum lies in the outer 8 % border band;
- site calibration: the shipped chest X-ray model re-calibrated on 200 normals of chest_xray's test
  split, its realised false-positive rate on the other test normals.

    python benchmarks/bench_trust.py measure --out /tmp/trust_new.json            # this checkout
    PYTHONPATH=/old/checkout python benchmarks/bench_trust.py measure --accuracy-only --out /tmp/old.json
    python benchmarks/bench_trust.py report --new /tmp/trust_new.json --baseline /tmp/old.json --label 2c36f86
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_detectors import RESULTS, SHARED, machine  # noqa: E402

DATASETS = ("magnetic_tile", "chest_xray", "bsdata_pitting", "deeppcb", "busi", "head_ct")
#: the issue's false-positive promise is checked where the data can support it
MIN_TRAIN, MIN_TEST_NORMALS = 100, 50
BORDER = 0.08


def photos() -> list[np.ndarray]:
    """The pictures of ``skimage.data`` (colour ones also as grey), as 8-bit arrays."""
    import skimage.data as data
    from skimage.color import rgb2gray

    images = []
    names = (
        "astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock",
        "coffee", "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
        "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
        "shepp_logan_phantom", "text",
    )  # fmt: skip
    for name in names:
        image = getattr(data, name)()
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        elif image.dtype != np.uint8:
            image = np.round(255 * (image - image.min()) / max(np.ptp(image), 1e-9)).astype(np.uint8)
        image = np.ascontiguousarray(image[..., :3]) if image.ndim == 3 else image
        images.append(image)
        if image.ndim == 3:
            images.append(np.round(rgb2gray(image) * 255).astype(np.uint8))
    return images


def in_border(heatmap: np.ndarray, band: float = BORDER) -> bool:
    """Whether the heatmap's maximum lies in the outer ``band`` of the image (each side)."""
    h, w = heatmap.shape
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return y < band * h or y >= (1 - band) * h or x < band * w or x >= (1 - band) * w


def measure_dataset(name: str, accuracy_only: bool, params: dict | None = None) -> tuple[dict, object]:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.evaluation import evaluate

    dataset = discover_dataset(SHARED / name)
    detector = create_detector("patchcore", progress=False, **(params or {}))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector.fit(dataset.train)
    fit_s = time.perf_counter() - start
    evaluation = evaluate(detector, dataset)
    report = evaluation.report
    labels = np.array([s.label for s in dataset.test], bool)
    scores = np.array([r.score for r in evaluation.results])
    threshold = detector.calibration_.image_threshold
    flagged = scores > threshold
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    row = {
        "dataset": name,
        "train": len(dataset.train),
        "test_normals": int((~labels).sum()),
        "test_anomalies": int(labels.sum()),
        "image_auroc": report["image_auroc"],
        "pixel_auroc": report.get("pixel_auroc"),
        "aupro": report.get("aupro"),
        "realised_fpr": float(flagged[~labels].mean()),
        "recall_at_threshold": float(flagged[labels].mean()),
        "best_recall_fpr1": float(tpr[fpr <= 0.01].max()),
        "best_recall_fpr3": float(tpr[fpr <= 0.03].max()),
        "fit_s": fit_s,
        "params": params or {},
    }
    if accuracy_only:
        return row, detector
    calibration = detector.calibration_
    in_domain = np.array([r.in_domain for r in evaluation.results])
    row |= {
        "calibration_normals": calibration.n_normal,
        "fpr_upper_bound": calibration.fpr_upper_bound,
        "warnings": list(calibration.warnings),
        "own_normals_out_of_domain": float((~in_domain[~labels]).mean()),
        "own_anomalies_out_of_domain": float((~in_domain[labels]).mean()),
        "heatmap_max_in_border": float(np.mean([in_border(r.heatmap) for r in evaluation.results])),
    }
    return row, detector


def out_of_domain_share(detector, images) -> float:
    results = detector.predict(images)
    return float(np.mean([not r.in_domain for r in results]))


def site_calibration() -> dict:
    """The shipped chest model, re-calibrated on 200 normals of chest_xray/test, tested on the rest."""
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import load_detector

    normals = [s.path for s in discover_dataset(SHARED / "chest_xray").test if s.label == 0]
    order = np.random.default_rng(0).permutation(len(normals))
    calibrate_on, test_on = [normals[i] for i in order[:200]], [normals[i] for i in order[200:]]
    detector = load_detector(ROOT / "weights" / "chest_xray_patchcore.safetensors", device="cpu")
    detector.progress = False
    before = float(np.mean([r.is_anomaly for r in detector.predict(test_on)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector.recalibrate(calibrate_on, source="chest_xray test/NORMAL, 200 images")
    results = detector.predict(test_on)
    return {
        "calibrated_on": len(calibrate_on),
        "tested_on": len(test_on),
        "fpr_before": before,
        "fpr_after": float(np.mean([r.is_anomaly for r in results])),
        "out_of_domain_after": float(np.mean([not r.in_domain for r in results])),
    }


def shipped_model_borders() -> dict:
    """Where the shipped chest model's heatmaps peak: the six demo examples and chest_xray's test images."""
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import load_detector

    detector = load_detector(ROOT / "weights" / "chest_xray_patchcore.safetensors", device="cpu")
    detector.progress = False
    examples = sorted((ROOT / "demo" / "examples").glob("*.jpeg"))
    test = [s.path for s in discover_dataset(SHARED / "chest_xray").test]
    return {
        "examples_in_border": int(sum(in_border(r.heatmap) for r in detector.predict(examples))),
        "examples": len(examples),
        "test_in_border": float(np.mean([in_border(r.heatmap) for r in detector.predict(test)])),
    }


def measure(args: argparse.Namespace) -> None:
    from imaging_ad.cli import parse_param
    from imaging_ad.data import discover_dataset

    out: dict = {"rows": [], "machine": machine(), "date": date.today().isoformat()}
    models = {}
    for name in args.datasets:
        row, detector = measure_dataset(name, args.accuracy_only, dict(parse_param(p) for p in args.param))
        out["rows"].append(row)
        models[name] = detector
        print(json.dumps(row), flush=True)
    if not args.accuracy_only:
        foreign = photos()
        matrix = {}
        for name in [m for m in ("chest_xray", "magnetic_tile") if m in models]:
            matrix[name] = {"skimage photos": out_of_domain_share(models[name], foreign)}
            for other in args.datasets:
                if other != name:
                    test = [s.path for s in discover_dataset(SHARED / other).test]
                    matrix[name][other] = out_of_domain_share(models[name], test)
            print(name, json.dumps(matrix[name]), flush=True)
        out["out_of_domain"] = matrix
        out["site_calibration"] = site_calibration()
        out["shipped_model"] = shipped_model_borders()
        print(json.dumps(out["site_calibration"]), json.dumps(out["shipped_model"]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


def variants(args: argparse.Namespace) -> None:
    """Scoring-time hyperparameters (ones that need no refit, e.g. PatchCore's ``border`` and ``heatmap``)
    in several combinations: each dataset is fitted once with the defaults, then scored with each
    combination (AUROC and AUPRO need no threshold, so the defaults' calibration does)."""
    from imaging_ad.cli import parse_param
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.evaluation import evaluate

    combos = [dict(parse_param(item) for item in combo.split(",")) for combo in args.combos]
    rows = []
    for name in args.datasets:
        dataset = discover_dataset(SHARED / name)
        detector = create_detector("patchcore", progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            detector.fit(dataset.train)
        for combo in combos:
            for key, value in combo.items():
                setattr(detector, key, value)
            detector.refresh_head()
            evaluation = evaluate(detector, dataset)
            report = evaluation.report
            row = {
                "dataset": name,
                "setting": ", ".join(f"{k}={v}" for k, v in combo.items()),
                "image_auroc": report["image_auroc"],
                "pixel_auroc": report.get("pixel_auroc"),
                "aupro": report.get("aupro"),
                "heatmap_max_in_border": float(np.mean([in_border(r.heatmap) for r in evaluation.results])),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    _variants_table(rows, args)


def _variants_table(rows: list[dict], args: argparse.Namespace) -> None:
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lines = [
        f"\n## PatchCore's heatmap settings over every dataset — {date.today().isoformat()}\n",
        f"Machine: {machine()}  \nCommand: `python benchmarks/bench_trust.py variants --combos "
        f"{' '.join(repr(c) for c in args.combos)}` (default PatchCore fitted once per dataset, then "
        "scored with each setting; heatmap max in border: share of test images whose heatmap peaks in "
        "the outer 8% band).\n",
        "| dataset | setting | image AUROC | pixel AUROC | AUPRO | heatmap max in 8% border |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['setting']} | {_f(r['image_auroc'])} | {_f(r['pixel_auroc'])} "
            f"| {_f(r['aupro'])} | {r['heatmap_max_in_border']:.1%} |"
        )
    for setting in settings:
        chosen = [r for r in rows if r["setting"] == setting]
        mean = {
            key: np.mean([r[key] for r in chosen if r[key] is not None])
            for key in ("image_auroc", "pixel_auroc", "aupro", "heatmap_max_in_border")
        }
        lines.append(
            f"| **mean** | {setting} | {_f(mean['image_auroc'])} | {_f(mean['pixel_auroc'])} "
            f"| {_f(mean['aupro'])} | {mean['heatmap_max_in_border']:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        with RESULTS.open("a") as handle:
            handle.write(text)


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(args: argparse.Namespace) -> None:
    new = json.loads(Path(args.new).read_text())
    old = (
        {r["dataset"]: r for r in json.loads(Path(args.baseline).read_text())["rows"]}
        if args.baseline
        else {}
    )
    lines = [
        f"\n## Trust on unseen data (issue 17) — {new['date']}\n",
        f"Machine: {new['machine']}  \nCommand: `python benchmarks/bench_trust.py measure` (this checkout) and, "
        f"for the baseline columns, the same with `--accuracy-only` under {args.label}; default PatchCore.\n",
        "| dataset | train / test normals / anomalies | image AUROC (baseline) | pixel AUROC (baseline) | AUPRO (baseline) "
        "| calibration normals, 95% bound | realised FPR (baseline) | recall at threshold (baseline) | best recall at FPR <= 1% / 3% "
        "| own test images out of domain (normal / anomalous) | heatmap max in 8% border |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    means = {
        k: []
        for k in ("image_auroc", "pixel_auroc", "aupro", "old_image_auroc", "old_pixel_auroc", "old_aupro")
    }
    for r in new["rows"]:
        b = old.get(r["dataset"], {})
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            if r.get(key) is not None:
                means[key].append(r[key])
            if b.get(key) is not None:
                means["old_" + key].append(b[key])
        lines.append(
            f"| {r['dataset']} | {r['train']} / {r['test_normals']} / {r['test_anomalies']} "
            f"| {_f(r['image_auroc'])} ({_f(b.get('image_auroc'))}) | {_f(r['pixel_auroc'])} ({_f(b.get('pixel_auroc'))}) "
            f"| {_f(r['aupro'])} ({_f(b.get('aupro'))}) | {r.get('calibration_normals')}, {_f(r.get('fpr_upper_bound'))}"
            f"{' (warned)' if r.get('warnings') else ''} | {r['realised_fpr']:.1%} ({_f(b.get('realised_fpr'))}) "
            f"| {r['recall_at_threshold']:.1%} ({_f(b.get('recall_at_threshold'))}) "
            f"| {r['best_recall_fpr1']:.1%} / {r['best_recall_fpr3']:.1%} "
            f"| {r.get('own_normals_out_of_domain', 0):.1%} / {r.get('own_anomalies_out_of_domain', 0):.1%} "
            f"| {r.get('heatmap_max_in_border', 0):.1%} |"
        )
    mean = {k: (np.mean(v) if v else None) for k, v in means.items()}
    lines.append(
        f"| **mean** | | {_f(mean['image_auroc'])} ({_f(mean['old_image_auroc'])}) | {_f(mean['pixel_auroc'])} "
        f"({_f(mean['old_pixel_auroc'])}) | {_f(mean['aupro'])} ({_f(mean['old_aupro'])}) | | | | | | |"
    )
    if "out_of_domain" in new:
        lines += [
            "",
            "Out-of-domain guard, share of images called foreign (model fitted on the row's dataset):",
            "",
        ]
        columns = sorted({c for row in new["out_of_domain"].values() for c in row})
        lines.append("| model | " + " | ".join(columns) + " |")
        lines.append("|---" * (len(columns) + 1) + "|")
        for model, row in new["out_of_domain"].items():
            lines.append(
                f"| {model} | " + " | ".join(f"{row[c]:.1%}" if c in row else "-" for c in columns) + " |"
            )
    if "site_calibration" in new:
        s = new["site_calibration"]
        lines += [
            "",
            f"Site calibration of the shipped chest model on {s['calibrated_on']} normals of chest_xray/test: "
            f"realised false-positive rate on the other {s['tested_on']} normals {s['fpr_before']:.1%} before, "
            f"{s['fpr_after']:.1%} after ({s['out_of_domain_after']:.1%} of them out of domain).",
        ]
    if "shipped_model" in new:
        s = new["shipped_model"]
        lines.append(
            f"The shipped chest model's heatmap maximum lies in the outer 8% border band for {s['examples_in_border']} "
            f"of the {s['examples']} demo examples and {s['test_in_border']:.1%} of chest_xray's test images."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        with RESULTS.open("a") as handle:
            handle.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--datasets", nargs="+", default=list(DATASETS))
    m.add_argument("--accuracy-only", action="store_true")
    m.add_argument("--param", action="append", default=[], help="KEY=VALUE for the detector, repeatable")
    m.add_argument("--out", required=True)
    m.set_defaults(run=measure)
    v = sub.add_parser("variants")
    v.add_argument("--combos", nargs="+", required=True, help='e.g. "border=0,heatmap=excess"')
    v.add_argument("--datasets", nargs="+", default=list(DATASETS))
    v.add_argument("--out", required=True)
    v.add_argument("--record", action="store_true")
    v.set_defaults(run=variants)
    r = sub.add_parser("report")
    r.add_argument("--new", required=True)
    r.add_argument("--baseline", default=None)
    r.add_argument("--label", default="the baseline")
    r.add_argument("--no-record", action="store_true")
    r.set_defaults(run=report)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
