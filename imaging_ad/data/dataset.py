"""What discovery returns: labelled samples, their split, and the masks that go with them.

A :class:`Dataset` is a plain list of :class:`Sample` records plus the layout it was found in. It never
holds pixels; :meth:`Dataset.load_mask` reads one mask on demand and checks it against its image.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imaging_ad.io.reader import is_dicom_bytes

NORMAL = 0
ANOMALOUS = 1
SPLITS = ("train", "test")
LAYOUTS = ("mvtec", "split_folders", "class_folders", "folder", "manifest", "explicit")

_EXIF_ORIENTATION_TAG = 0x0112
# Class folder names that read as a negative finding: only used to make an error message's example apt.
_NEGATIVE_NAMES = frozenset({"no", "n", "negative", "neg", "false", "0", "healthy", "pass"})


class DatasetError(ValueError):
    """A dataset folder or manifest that cannot be turned into labelled samples; the message says why."""


@dataclass(frozen=True)
class Sample:
    """One image: where it is, whether it is normal (0) or anomalous (1), its split and class folder."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    split: str  # "train" or "test"
    category: str  # class folder name ("good", "blowhole", "NORMAL", ...) or manifest category
    mask_path: Path | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.label == ANOMALOUS


@dataclass
class Dataset:
    """Samples found under ``root`` (a folder, or the CSV file for a manifest) in one of :data:`LAYOUTS`."""

    root: Path
    layout: str
    samples: list[Sample]
    # Non-fatal findings from discovery (anomalous images without masks, masks matching no image, ...).
    warnings: list[str] = field(default_factory=list)
    # Class folders whose names say neither normal nor anomalous (``yes``/``no``, ``positive``, patient
    # folders side by side): folder name -> its images. They are left out of ``samples``, and ``train``
    # and ``test`` refuse to answer while there are any: learning them as normal could teach a detector
    # that tumours are normal.
    unknown_classes: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def train(self) -> list[Sample]:
        """Normal training samples: the only images a one-class detector may learn from."""
        self.check_known_classes()
        return [s for s in self.samples if s.split == "train" and s.label == NORMAL]

    @property
    def test(self) -> list[Sample]:
        self.check_known_classes()
        return [s for s in self.samples if s.split == "test"]

    def check_known_classes(self) -> None:
        """Raise :class:`DatasetError` listing the class folders of unknown meaning, if there are any."""
        if self.unknown_classes:
            raise DatasetError(unknown_classes_message(self.root, self.unknown_classes))

    @property
    def name(self) -> str:
        return self.root.stem if self.layout == "manifest" else self.root.name

    def summary(self) -> dict:
        """Counts per split and per category, masks found and missing; JSON-serialisable."""
        splits = {}
        for split in SPLITS:
            members = [s for s in self.samples if s.split == split]
            splits[split] = {
                "total": len(members),
                "normal": sum(s.label == NORMAL for s in members),
                "anomalous": sum(s.label == ANOMALOUS for s in members),
                "categories": dict(sorted(Counter(s.category for s in members).items())),
            }
        n_masks = sum(s.mask_path is not None for s in self.samples)
        # Only a dataset that has masks at all (or should, like MVTec) can be missing some.
        expects_masks = n_masks > 0 or self.layout == "mvtec"
        missing = [s for s in self.test if s.is_anomalous and s.mask_path is None] if expects_masks else []
        return {
            "root": str(self.root),
            "layout": self.layout,
            "total": len(self.samples),
            "train": splits["train"],
            "test": splits["test"],
            "masks": n_masks,
            "missing_masks": len(missing),
            "unknown_classes": {name: len(paths) for name, paths in self.unknown_classes.items()},
            "warnings": list(self.warnings),
        }

    def describe(self) -> str:
        """A small aligned table (split, category, label, images, masks) for the command line."""
        groups: dict[tuple[str, str, int], list[Sample]] = {}
        for s in self.samples:
            groups.setdefault((s.split, s.category, s.label), []).append(s)
        # Train before test; normal classes before defect types; then by name.
        keys = sorted(groups, key=lambda k: (SPLITS.index(k[0]), k[2], k[1].lower(), k[1]))
        rows = [("split", "category", "label", "images", "masks")]
        for split, category, label in keys:
            members = groups[(split, category, label)]
            n_masks = sum(s.mask_path is not None for s in members)
            rows.append(
                (split, category, "anomalous" if label else "normal", str(len(members)), str(n_masks))
            )
        for name, paths in self.unknown_classes.items():
            rows.append(("?", name, "unknown", str(len(paths)), "0"))
        n_masks = sum(s.mask_path is not None for s in self.samples)
        n_images = len(self.samples) + sum(len(paths) for paths in self.unknown_classes.values())
        rows.append(("total", "", "", str(n_images), str(n_masks)))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [f"{self.name}: {self.layout} layout at {self.root}"]
        for i, row in enumerate(rows):
            left = "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths[:3], strict=True))
            right = "  ".join(cell.rjust(w) for cell, w in zip(row[3:], widths[3:], strict=True))
            lines.append(f"{left}  {right}".rstrip())
            if i == 0 or i == len(rows) - 2:
                lines.append("-" * (sum(widths) + 2 * 4))
        lines.extend(f"warning: {w}" for w in self.warnings)
        if self.unknown_classes:
            lines.append(f"error: {unknown_classes_message(self.root, self.unknown_classes)}")
        return "\n".join(lines)

    def load_mask(self, sample: Sample, shape: Sequence[int] | None = None) -> np.ndarray:
        """Boolean (height, width) mask for ``sample``; see :func:`load_mask`."""
        return load_mask(sample, shape)


def unknown_classes_message(root: Path, unknown: dict[str, list[Path]], *, max_listed: int = 8) -> str:
    """Why a folder of unnamed classes cannot be used, what was found, and how to say which is which."""
    listed = [f"{name}/ ({len(paths)} images)" for name, paths in list(unknown.items())[:max_listed]]
    if len(unknown) > max_listed:
        listed.append(f"... and {len(unknown) - max_listed} more")
    # Only a name that reads as "negative finding" is offered as the normal folder of the example.
    names = [name for name in unknown if not name.startswith("(")]
    negative = [name for name in names if name.strip().lower() in _NEGATIVE_NAMES]
    if len(negative) == 1 and len(names) > 1:
        example_normal, example_abnormal = negative[0], next(n for n in names if n != negative[0])
    else:
        example_normal, example_abnormal = "NORMAL_DIR", "ABNORMAL_DIR"
    return (
        f"{root}: found class folders whose names do not say whether they are normal: {', '.join(listed)}. "
        "Only folders named good, normal or ok are taken as normal, and nothing is guessed, because "
        "learning anomalous images as normal would teach the detector that they are normal. Say which is "
        f"which with explicit folders (relative to {root.name}/ or absolute), e.g. "
        f"--normal-dir {example_normal} --abnormal-dir {example_abnormal} "
        "(repeat --abnormal-dir for more, optionally named: --abnormal-dir NAME=DIR; masks: --mask-dir DIR); "
        "if every image here is normal, --normal-dir ."
    )


def load_mask(sample: Sample, shape: Sequence[int] | None = None) -> np.ndarray:
    """Read ``sample``'s mask as a boolean (height, width) array at the image's own resolution.

    ``shape`` is the image's size when the caller already knows it (``record.meta.size`` or
    ``pixels.shape``; only the first two entries count); otherwise the image header is read. A normal
    sample without a mask gets an all-False mask. The mask is never resized: a mask whose size differs
    from its image's raises :class:`DatasetError` naming both files, as does an anomalous sample
    without a mask (an all-False mask would silently score as a perfect miss).
    """
    expected = (int(shape[0]), int(shape[1])) if shape is not None else image_size(sample.path)
    if sample.mask_path is None:
        if sample.is_anomalous:
            raise DatasetError(f"{sample.path}: anomalous image has no ground-truth mask")
        return np.zeros(expected, dtype=bool)
    mask = _read_mask(Path(sample.mask_path))
    if mask.shape != expected:
        raise DatasetError(_size_mismatch_message(sample.path, expected, sample.mask_path, mask.shape))
    return mask


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image from its header alone, after EXIF orientation like ``read_image``.

    Raster files are opened with Pillow without decoding pixels; DICOM files are parsed without pixel
    data. Raises :class:`DatasetError` naming the file when neither can read the header.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    # DICOM first, as read_image does: a DICOM preamble may itself look like a TIFF header.
    if is_dicom_bytes(head):
        return _dicom_size(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                # Only look at EXIF when it is already parsed: Pillow's getexif() on a PNG whose eXIf
                # chunk follows the pixel data would decode the whole image.
                orientation = None
                if image.format in ("JPEG", "MPO", "TIFF") or "exif" in image.info:
                    try:
                        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
                    except Exception:  # malformed EXIF: the reader ignores it too
                        orientation = None
        if orientation in (5, 6, 7, 8):  # transposed or rotated by 90 degrees: axes swap
            width, height = height, width
        return int(height), int(width)
    except UnidentifiedImageError:
        pass
    except (OSError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot read image header ({exc})") from exc
    return _dicom_size(path)


def _dicom_size(path: Path) -> tuple[int, int]:
    import pydicom  # imported here: most datasets never need it
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable image (no raster or DICOM header found)") from exc


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            palette = image.mode == "P"
            values = np.asarray(image)
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{path}: cannot read mask ({exc})") from exc
    if values.ndim == 3:
        # Colour masks: any non-zero colour channel is foreground; alpha carries no label.
        channels = values.shape[2] - (1 if image.mode in ("RGBA", "LA", "PA") else 0)
        values = values[..., : max(channels, 1)].max(axis=2)
    if values.dtype == bool:
        return values
    if palette or values.size == 0 or values.max() <= 1:
        return values > 0  # 0/1 masks and palette indices (0 = background)
    if values.dtype == np.uint8:
        return values >= 128  # 0/255 masks; robust to JPEG ringing around edges
    return values > values.max() / 2


def _size_mismatch_message(
    image_path: Path, image_hw: tuple[int, int], mask_path: Path, mask_hw: tuple[int, ...]
) -> str:
    return (
        f"mask size {mask_hw[1]}x{mask_hw[0]} (WxH) does not match image size "
        f"{image_hw[1]}x{image_hw[0]}: mask {mask_path} for image {image_path}"
    )


def split_normals(
    samples: Sequence[Sample], fraction: float, *, min_test: int = 1
) -> tuple[list[Sample], list[Sample]]:
    """Deterministically send ``fraction`` of ``samples`` to test and the rest to train.

    Samples are sorted by path and picked evenly: with ``fraction=0.2`` that is every 5th (the 5th,
    10th, ...), the same rule the shared magnetic_tile split used. When ``fraction > 0`` at least
    ``min_test`` samples go to test as long as one stays in train, so a small folder still yields a
    test set with normals in it. Returns ``(train, test)`` with ``split`` set accordingly.
    """
    _check_fraction(fraction)
    ordered = sorted(samples, key=lambda s: Path(s.path).parts)
    n = len(ordered)
    # Exact rational arithmetic: floats would make e.g. 0.29 * 100 round down to 28 picks.
    rate = Fraction(fraction).limit_denominator(10_000)
    picked = {i for i in range(n) if math.floor((i + 1) * rate) > math.floor(i * rate)}
    if fraction > 0:
        wanted = min(min_test, n - 1)
        for i in range(n - 1, -1, -1):  # top up from the end, away from the evenly spaced picks
            if len(picked) >= wanted:
                break
            picked.add(i)
    train = [replace(s, split="train") for i, s in enumerate(ordered) if i not in picked]
    test = [replace(s, split="test") for i, s in enumerate(ordered) if i in picked]
    return train, test


def check_mask_sizes(samples: Sequence[Sample], *, max_listed: int = 5) -> None:
    """Compare every mask's size with its image's from headers only; raise listing the mismatches."""
    mismatches = []
    for s in samples:
        if s.mask_path is None:
            continue
        image_hw, mask_hw = image_size(s.path), image_size(s.mask_path)
        if image_hw != mask_hw:
            mismatches.append(_size_mismatch_message(s.path, image_hw, s.mask_path, mask_hw))
    if mismatches:
        listed = "\n  ".join(mismatches[:max_listed])
        more = f"\n  ... and {len(mismatches) - max_listed} more" if len(mismatches) > max_listed else ""
        raise DatasetError(f"{len(mismatches)} mask(s) differ in size from their image:\n  {listed}{more}")


def _check_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise DatasetError(f"test_fraction must be in [0, 1), got {fraction!r}")
