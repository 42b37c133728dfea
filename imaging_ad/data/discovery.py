"""Find labelled images in a folder or manifest: ``discover_dataset`` and the folder layouts it knows.

Labels come from folder names: a class folder named like a normal class (``good``, ``normal``, ``ok``,
any case) holds normal images, any other class folder holds anomalies of that type. Files are found
recursively, sorted, and filtered cheaply by name, so discovery never decodes an image; only mask and
image headers are read to check that their sizes agree.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from imaging_ad.data.dataset import (
    ANOMALOUS,
    NORMAL,
    Dataset,
    DatasetError,
    Sample,
    _check_fraction,
    check_mask_sizes,
    split_normals,
)
from imaging_ad.data.manifest import read_manifest
from imaging_ad.io.reader import is_supported_path

log = logging.getLogger("imaging_ad.data")

NORMAL_NAMES = frozenset({"good", "normal", "ok"})
# Class folder names that are labels of a yes/no question, not a finding type: "no" beside "yes" may
# well be the normal class. Discovery never guesses them (not even as anomalous beside a "good" folder).
LABEL_LIKE_NAMES = frozenset(
    {"yes", "no", "y", "n", "true", "false", "positive", "negative", "pos", "neg", "0", "1"}
)
# Folders holding masks, not images to score; skipped wherever they appear during discovery.
MASK_DIR_NAMES = ("ground_truth", "groundtruth", "ground-truth", "gt", "masks", "mask")
_SKIP_DIR_NAMES = frozenset(MASK_DIR_NAMES) | {"__macosx"}
# Suffix-less files are accepted because DICOM often has no suffix; these names never are images.
_NON_IMAGE_NAMES = frozenset(
    {"readme", "license", "licence", "copying", "notice", "changelog", "authors", "makefile", "dicomdir"}
)
_MASK_SUFFIX = "_mask"

ACCEPTED_LAYOUTS = (
    "accepted layouts: an MVTec-style folder (train/good, test/<type>, "
    "ground_truth/<type>/<stem>_mask.png); a folder with train/ and test/ holding normal-named "
    "(good/normal/ok) and anomalous class folders; a folder with a normal-named class folder plus "
    "anomalous class folders; a plain folder of normal images; or a CSV manifest with header "
    "path,label[,mask][,split]"
)


def discover_dataset(path: str | os.PathLike, *, test_fraction: float = 0.2) -> Dataset:
    """Find every image under ``path`` with its label, split and mask.

    Layouts, tried in this order:

    * a ``.csv`` file: a manifest (``path,label[,mask][,split]``, see :func:`read_manifest`);
    * ``train/`` and/or ``test/`` subfolders holding class folders: ``"mvtec"`` when a ``ground_truth``
      folder holds masks (``ground_truth/<type>/<stem>_mask.png`` or ``<stem>.png``), else
      ``"split_folders"``;
    * one or more normal-named class folders next to anomalous ones, no split: ``"class_folders"``;
      ``test_fraction`` of the normals (every k-th by sorted path) become test images;
    * anything else with images in it: ``"folder"``, all normal training images.

    Mask sizes are checked against image headers; a mismatch raises :class:`DatasetError`, as does a
    path that fits no layout.
    """
    _check_fraction(test_fraction)
    root = Path(os.path.abspath(os.fspath(path)))  # absolute, without resolving symlinks
    if not root.exists():
        raise DatasetError(f"{root}: does not exist; {ACCEPTED_LAYOUTS}")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return read_manifest(root, test_fraction=test_fraction)
        raise DatasetError(f"{root}: is a file but not a .csv manifest; {ACCEPTED_LAYOUTS}")

    subdirs = _subdirs(root)
    train_dir, test_dir = _child(subdirs, "train"), _child(subdirs, "test")
    if train_dir is not None or test_dir is not None:
        return _discover_split(root, train_dir, test_dir, _mask_root(subdirs))

    # A folder of dataset folders (e.g. all of MVTec AD) would otherwise look like a plain folder and
    # turn every defect image into a training image.
    nested = [name for name, d in subdirs.items() if {"train", "test"} & {n.lower() for n in _subdirs(d)}]
    if nested:
        raise DatasetError(
            f"{root}: holds several datasets ({', '.join(nested[:5])}{', ...' if len(nested) > 5 else ''}); "
            "point at one of them"
        )
    if any(is_normal_name(name) for name in subdirs):
        return _discover_class_folders(root, subdirs, _mask_root(subdirs), test_fraction)
    images = collect_images(root)
    if not images:
        raise DatasetError(f"{root}: no images found; {ACCEPTED_LAYOUTS}")
    unknown = _unnamed_classes(root, subdirs)
    if unknown:
        return Dataset(root=root, layout="folder", samples=[], unknown_classes=unknown)
    samples = [Sample(p, NORMAL, "train", "normal") for p in images]
    return Dataset(root=root, layout="folder", samples=samples)


def _unnamed_classes(root: Path, subdirs: dict[str, Path]) -> dict[str, list[Path]]:
    """Subfolders of a folder without normal-named ones that look like classes: two or more folders of
    images side by side (``yes/`` and ``no/``, ``tumour/`` and ``healthy/``), or one with a label-like
    name. Empty when the folder reads as plain normal images (loose files, at most one subfolder)."""
    classes = {
        name: images
        for name, folder in subdirs.items()
        if not _skip_dir(name) and (images := collect_images(folder))
    }
    if len(classes) < 2 and not any(_is_label_like(name) for name in classes):
        return {}
    loose = [p for p in sorted(root.iterdir()) if p.is_file() and _is_image_name(p.name)]
    return classes | ({"(top level)": loose} if loose else {})


def is_normal_name(name: str) -> bool:
    """True for class folder names that mean "normal": good, normal, ok (any case)."""
    return name.strip().lower() in NORMAL_NAMES


def _is_label_like(name: str) -> bool:
    return name.strip().lower() in LABEL_LIKE_NAMES


def _label_like(folder: Path) -> dict[str, list[Path]]:
    """Subfolders of ``folder`` with a label-like name (yes, no, positive, ...) and their images."""
    return {
        name: images
        for name, sub in _subdirs(folder).items()
        if _is_label_like(name) and (images := collect_images(sub))
    }


def collect_images(folder: Path, confine_to: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """Image files under ``folder``, recursively, sorted by relative path.

    Skips hidden files and folders, mask folders (``ground_truth``, ``masks``, ...) and files whose
    name says they are not images (``.txt``, ``.csv``, ``README``, ...). Symlinked folders are followed
    once each. With ``confine_to``, only files whose real path (links resolved) lies inside one of those
    folders are kept, and linked folders outside them are not even listed: a link inside an allowed
    folder must not lead out of it.
    """
    found: list[Path] = []
    seen: set[str] = set()
    roots = None if confine_to is None else [os.path.realpath(r) for r in confine_to]
    n_outside = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or not _confined(real, roots):  # a symlink loop, a folder linked twice, or outside
            n_outside += real not in seen
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        images = [Path(dirpath, f) for f in filenames if _is_image_name(f)]
        if roots is not None:
            inside = [p for p in images if _confined(os.path.realpath(p), roots)]
            n_outside += len(images) - len(inside)
            images = inside
        found.extend(images)
    if n_outside:
        log.warning("%s: %d link(s) lead outside the allowed folders and were skipped", folder, n_outside)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _confined(real: str, roots: list[str] | None) -> bool:
    return roots is None or any(
        real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots
    )


def _discover_split(
    root: Path, train_dir: Path | None, test_dir: Path | None, mask_root: Path | None
) -> Dataset:
    warnings: list[str] = []
    unknown: dict[str, list[Path]] = {}
    for split_dir in (train_dir, test_dir):
        if split_dir is not None:
            unknown |= {f"{split_dir.name}/{name}": images for name, images in _label_like(split_dir).items()}
    samples = _train_samples(train_dir, warnings) if train_dir is not None else []
    if test_dir is not None:
        test_subdirs = _subdirs(test_dir)
        _warn_loose_images(test_dir, warnings)
        for name, folder in test_subdirs.items():
            if not _skip_dir(name) and not _is_label_like(name):
                label = NORMAL if is_normal_name(name) else ANOMALOUS
                samples += [Sample(p, label, "test", name) for p in collect_images(folder)]
    if mask_root is not None:
        samples = _attach_masks(samples, test_dir or root, mask_root, warnings)
    layout = "mvtec" if mask_root is not None else "split_folders"
    return _finish(root, layout, samples, warnings, unknown)


def _discover_class_folders(
    root: Path, subdirs: dict[str, Path], mask_root: Path | None, test_fraction: float
) -> Dataset:
    warnings: list[str] = []
    _warn_loose_images(root, warnings)
    unknown = _label_like(root)
    normals: list[Sample] = []
    anomalies: list[Sample] = []
    for name, folder in subdirs.items():
        if _skip_dir(name) or name in unknown:
            continue
        if is_normal_name(name):
            normals += [Sample(p, NORMAL, "train", name) for p in collect_images(folder)]
        else:
            anomalies += [Sample(p, ANOMALOUS, "test", name) for p in collect_images(folder)]
    train, test_normals = split_normals(normals, test_fraction)
    samples = train + test_normals + anomalies
    if mask_root is not None:
        samples = _attach_masks(samples, root, mask_root, warnings)
    return _finish(root, "class_folders", samples, warnings, unknown)


def _train_samples(train_dir: Path, warnings: list[str]) -> list[Sample]:
    """Training images: normal-named class folders, plus loose files (training is normal-only)."""
    loose = [p for p in sorted(train_dir.iterdir()) if p.is_file() and _is_image_name(p.name)]
    samples = [Sample(p, NORMAL, "train", "normal") for p in loose]
    classes = {
        name: d for name, d in _subdirs(train_dir).items() if not _skip_dir(name) and not _is_label_like(name)
    }
    normal = {name: d for name, d in classes.items() if is_normal_name(name)}
    for name, folder in classes.items():
        images = collect_images(folder)
        if name in normal:
            samples += [Sample(p, NORMAL, "train", name) for p in images]
        elif images and not normal:
            raise DatasetError(
                f"{train_dir}: class folder {name!r} is not named as a normal class and there is no "
                f"normal-named one (good/normal/ok); training uses normal images only"
            )
        elif images:
            warnings.append(
                f"{folder}: {len(images)} anomalous training images are listed but never trained on"
            )
            samples += [Sample(p, ANOMALOUS, "train", name) for p in images]
    return samples


def _attach_masks(
    samples: list[Sample], image_root: Path, mask_root: Path, warnings: list[str]
) -> list[Sample]:
    """Give each test image under ``image_root/<type>/`` its mask from ``mask_root/<type>/``."""
    index = _index_masks(mask_root)
    used: set[Path] = set()
    out = []
    for s in samples:
        mask = None
        if s.split == "test":
            for key in _mask_keys(s, image_root):
                if key in index:
                    mask = index[key][1]
                    break
        if mask is not None:
            used.add(mask)
            s = Sample(s.path, s.label, s.split, s.category, mask)
        out.append(s)
    missing = [s for s in out if s.split == "test" and s.label == ANOMALOUS and s.mask_path is None]
    if missing:
        warnings.append(
            f"{len(missing)} anomalous test image(s) have no mask in {mask_root} (e.g. {missing[0].path}); "
            "pixel metrics skip them"
        )
    orphans = sorted({path for _, path in index.values()} - used)
    if orphans:
        warnings.append(f"{len(orphans)} mask(s) match no test image (e.g. {orphans[0]})")
    return out


def _index_masks(mask_root: Path) -> dict[tuple[str, str], tuple[tuple[int, int], Path]]:
    """(type, relative stem) -> (priority, mask path); ``<stem>_mask.png`` beats ``<stem>.png``."""
    index: dict[tuple[str, str], tuple[tuple[int, int], Path]] = {}
    for name, folder in _subdirs(mask_root).items():
        for path in collect_images(folder):
            rel = path.relative_to(folder)
            stem = rel.stem
            is_mask_named = stem.endswith(_MASK_SUFFIX)
            if is_mask_named:
                stem = stem[: -len(_MASK_SUFFIX)]
            key = (name.lower(), (rel.parent / stem).as_posix())
            priority = (0 if is_mask_named else 1, 0 if path.suffix.lower() == ".png" else 1)
            if key not in index or priority < index[key][0]:
                index[key] = (priority, path)
    return index


def _mask_keys(sample: Sample, image_root: Path) -> Iterable[tuple[str, str]]:
    try:
        rel = sample.path.relative_to(image_root / sample.category)
    except ValueError:
        return ()
    keys = [(sample.category.lower(), rel.with_suffix("").as_posix())]
    if rel.parent != Path("."):  # nested class folder: also accept a flat ground_truth/<type>/
        keys.append((sample.category.lower(), rel.stem))
    return keys


def _finish(
    root: Path,
    layout: str,
    samples: list[Sample],
    warnings: list[str],
    unknown: dict[str, list[Path]] | None = None,
) -> Dataset:
    if not samples and not unknown:
        raise DatasetError(f"{root}: no images found in its class folders; {ACCEPTED_LAYOUTS}")
    check_mask_sizes(samples)
    # Deterministic order whatever the discovery path: train, then test; normals first; by class folder.
    samples = sorted(samples, key=lambda s: (s.split != "train", s.label, s.category, s.path.parts))
    dataset = Dataset(
        root=root, layout=layout, samples=samples, warnings=warnings, unknown_classes=unknown or {}
    )
    if unknown:  # the dataset is unusable as it is; its error says why, warnings would only distract
        return dataset
    if not dataset.train:
        warnings.append("no normal training images")
    test_labels = {s.label for s in dataset.test}
    if dataset.test and test_labels != {NORMAL, ANOMALOUS}:
        kind = "normal" if NORMAL not in test_labels else "anomalous"
        warnings.append(f"test split has no {kind} images: image-level AUROC is undefined")
    return dataset


def _warn_loose_images(folder: Path, warnings: list[str]) -> None:
    loose = [p for p in sorted(folder.iterdir()) if p.is_file() and _is_image_name(p.name)]
    if loose:
        warnings.append(
            f"{folder}: {len(loose)} image(s) outside any class folder were ignored (e.g. {loose[0].name})"
        )


def _subdirs(folder: Path) -> dict[str, Path]:
    """Visible subfolders by name, sorted."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot be listed ({exc.strerror or exc})") from exc
    return {e.name: Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()}


def _child(subdirs: dict[str, Path], name: str) -> Path | None:
    """The subfolder called ``name`` in any case (``train``, ``Train``, ``TRAIN``)."""
    return next((d for n, d in subdirs.items() if n.lower() == name), None)


def _mask_root(subdirs: dict[str, Path]) -> Path | None:
    for name in MASK_DIR_NAMES:
        found = _child(subdirs, name)
        if found is not None:
            return found
    return None


def _skip_dir(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SKIP_DIR_NAMES


def _is_image_name(name: str) -> bool:
    if name.startswith("."):
        return False
    suffix = Path(name).suffix
    if not suffix:
        return name.lower() not in _NON_IMAGE_NAMES
    # DICOM files named by UID ("1.2.840.113619.2.55.3") have a numeric "suffix".
    return is_supported_path(name) or suffix[1:].isdigit()
