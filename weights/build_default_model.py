"""Rebuild the default model the demo ships with, measure it, and update ``weights/registry.json``.

    .venv/bin/python weights/build_default_model.py [--data ../shared/data/chest_xray] [--bank 2000] \
        [--param border=1 ...]

Fits PatchCore (tf_efficientnet_lite0, strides 16+32) on the normal training chest X-rays, evaluates its
image AUROC on the official test split, writes ``chest_xray_patchcore.safetensors`` next to this script
and records its size, SHA-256 and the measured metrics in ``registry.json``. The memory bank is kept
small (``--bank`` rows of float32) so that the file stays a few MB and fits in the repository.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from imaging_ad.io.checksum import file_sha256

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "chest_xray"
MODEL_NAME = "chest_xray_patchcore"


def build(
    data: Path,
    bank: int,
    image_size: int,
    out_dir: Path,
    evaluate_model: bool = True,
    params: dict | None = None,
) -> dict:
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.evaluation import evaluate

    dataset = discover_dataset(data)
    detector = create_detector(
        "patchcore",
        backbone="tf_efficientnet_lite0",
        image_size=image_size,
        max_memory_bank=bank,
        device="cpu",
        progress=False,
        **(params or {}),
    )
    start = time.perf_counter()
    detector.fit(dataset.train)
    fit_seconds = time.perf_counter() - start
    path = detector.save(out_dir / f"{MODEL_NAME}.safetensors")
    entry = {
        "name": MODEL_NAME,
        "file": path.name,
        "detector": "patchcore",
        "backbone": "tf_efficientnet_lite0",
        "description": (
            "PatchCore on tf_efficientnet_lite0 (strides 16+32), fitted on "
            f"{len(dataset.train)} normal paediatric chest X-rays (Kermany et al. 2018, CC BY 4.0)"
        ),
        "image_size": image_size,
        "params": params or {},
        "memory_bank_rows": int(detector.memory_bank_.shape[0]),
        "size_bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "fit_seconds": round(fit_seconds, 1),
        "trained_on": f"chest_xray/train/NORMAL ({len(dataset.train)} images)",
        "licence_of_training_data": "CC BY 4.0",
        "calibration": {
            "method": detector.calibration_.method,
            "normals": detector.calibration_.n_normal,
            "target_fpr": detector.calibration_.target_fpr,
            "fpr_upper_bound_95": detector.calibration_.fpr_upper_bound,
            "out_of_domain_guard": detector.calibration_.domain_threshold is not None,
        },
    }
    if evaluate_model:
        evaluation = evaluate(detector, dataset)
        report = evaluation.report
        entry["test_image_auroc"] = round(float(report["image_auroc"]), 4)
        entry["test_average_precision"] = round(float(report["average_precision"]), 4)
        entry["test_set"] = "chest_xray/test (234 NORMAL, 390 PNEUMONIA)"
    return entry


def update_registry(entry: dict, registry_path: Path) -> None:
    registry = json.loads(registry_path.read_text()) if registry_path.exists() else {"models": []}
    registry["models"] = [m for m in registry["models"] if m["name"] != entry["name"]] + [entry]
    registry_path.write_text(json.dumps(registry, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--bank", type=int, default=2000, help="memory bank rows (file size ~ rows * 1.7 kB)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--no-registry", action="store_true", help="do not update registry.json")
    parser.add_argument("--param", action="append", default=[], help="KEY=VALUE for PatchCore, repeatable")
    args = parser.parse_args()
    from imaging_ad.cli import parse_param

    params = dict(parse_param(item) for item in args.param)
    entry = build(args.data, args.bank, args.image_size, args.out_dir, params=params)
    if not args.no_registry:
        update_registry(entry, args.out_dir / "registry.json")
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
