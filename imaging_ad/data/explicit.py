"""Datasets from folders the user names: which hold normal images, which anomalous, which the masks.

Like anomalib's ``Folder`` datamodule: ``folder_dataset(normal_dirs=["no"], abnormal_dirs=["yes"])``
needs no naming convention, so it works for any layout discovery cannot read (``yes/`` and ``no/``,
``healthy/`` and ``tumour/``, a folder of normals beside an export of flagged cases). Normal images are
split into train and test by the same deterministic every-k-th rule as class folders; anomalous images
are test images. Folders may be named (``"tumour=scans/yes"``) to set the category reported per type.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
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
from imaging_ad.data.discovery import _MASK_SUFFIX, collect_images, discover_dataset

#: a folder as the CLI takes it: ``DIR`` or ``NAME=DIR``; or already split as ``(name, dir)``
FolderSpec = str | os.PathLike | tuple[str, str | os.PathLike]


def parse_folder_spec(spec: FolderSpec, root: Path | None = None) -> tuple[str | None, Path]:
    """``"DIR"`` -> (None, DIR); ``"NAME=DIR"`` -> (NAME, DIR); relative folders are resolved against
    ``root`` (the dataset folder, when one is given) or else the working directory.

    A text with ``=`` is a name only when the part before it has no path separator and the whole text
    is not itself an existing folder, so folders whose names contain ``=`` still work.
    """
    if isinstance(spec, tuple):
        name, folder = spec
    else:
        text = os.fspath(spec)
        base = root if root is not None else Path.cwd()
        head, sep, tail = text.partition("=")
        named = sep and head and tail and "/" not in head and os.sep not in head
        if named and not (base / text).is_dir():
            name, folder = head.strip(), tail
        else:
            name, folder = None, text
    path = Path(folder).expanduser()
    if not path.is_absolute():
        path = (root if root is not None else Path.cwd()) / path
    return (name or None), Path(os.path.abspath(path))


def folder_dataset(
    normal_dirs: Sequence[FolderSpec],
    abnormal_dirs: Sequence[FolderSpec] = (),
    mask_dirs: Sequence[FolderSpec] = (),
    *,
    root: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
) -> Dataset:
    """A :class:`Dataset` (layout ``"explicit"``) from named folders of normal and anomalous images.

    ``normal_dirs``: folders of normal images (searched recursively); ``test_fraction`` of them (every
    k-th by sorted path) become test images, the rest training images. ``abnormal_dirs``: folders of
    anomalous images, all test images; the category of each is its name (``NAME=DIR``) or its folder
    name. ``mask_dirs``: ground-truth masks for the anomalous images, matched by relative path and stem
    (``<stem>.png`` or ``<stem>_mask.png``, also under ``<mask dir>/<category>/``); a named mask folder
    (``NAME=DIR``) serves only the anomalous folder of that name. Relative folders are taken relative to
    ``root`` when given. Images inside an anomalous or mask folder are never taken as normal, even when
    that folder lies inside a normal one (``--normal-dir . --abnormal-dir defects``).
    """
    _check_fraction(test_fraction)
    base = Path(os.path.abspath(os.fspath(root))) if root is not None else None
    if base is not None and not base.is_dir():
        raise DatasetError(f"{base}: the dataset folder does not exist or is not a folder")
    normals = [_existing_dir(*parse_folder_spec(spec, base), "--normal-dir") for spec in normal_dirs]
    abnormals = [_existing_dir(*parse_folder_spec(spec, base), "--abnormal-dir") for spec in abnormal_dirs]
    masks = [_existing_dir(*parse_folder_spec(spec, base), "--mask-dir") for spec in mask_dirs]
    if not normals:
        raise DatasetError(
            "name at least one folder of normal images (--normal-dir DIR): a one-class detector learns "
            "from normal images only"
        )
    _refuse_reuse(normals, abnormals, masks)

    excluded = [folder for _, folder in abnormals + masks]
    warnings: list[str] = []
    normal_samples: list[Sample] = []
    seen: set[Path] = set()
    for name, folder in normals:
        images = [p for p in collect_images(folder) if not _inside_any(p, excluded) and p not in seen]
        if not images:
            raise DatasetError(f"{folder}: no images in this --normal-dir")
        seen.update(images)
        normal_samples += [Sample(p, NORMAL, "train", name or folder.name) for p in images]
    train, test_normals = split_normals(normal_samples, test_fraction)

    anomalies: list[Sample] = []
    for name, folder in abnormals:
        inner = [f for _, f in abnormals if f != folder and _inside_any(f, [folder])]
        images = [p for p in collect_images(folder) if not _inside_any(p, inner + [m for _, m in masks])]
        if not images:
            raise DatasetError(f"{folder}: no images in this --abnormal-dir")
        category = name or folder.name
        anomalies += [Sample(p, ANOMALOUS, "test", category) for p in images]
    if masks:
        anomalies = _attach_masks(anomalies, abnormals, masks, warnings)

    samples = train + test_normals + anomalies
    check_mask_sizes(samples)
    samples = sorted(samples, key=lambda s: (s.split != "train", s.label, s.category, s.path.parts))
    if not test_normals and anomalies:
        warnings.append("test split has no normal images: image-level AUROC is undefined")
    root_dir = base or _common_root([folder for _, folder in normals + abnormals])
    return Dataset(root=root_dir, layout="explicit", samples=samples, warnings=warnings)


def open_dataset(
    data: str | os.PathLike | None = None,
    *,
    normal_dirs: Sequence[FolderSpec] = (),
    abnormal_dirs: Sequence[FolderSpec] = (),
    mask_dirs: Sequence[FolderSpec] = (),
    test_fraction: float = 0.2,
) -> Dataset:
    """The dataset the command line means: explicit folders when any are named (relative to ``data``
    when that is given too), else discovery of ``data``."""
    if normal_dirs or abnormal_dirs or mask_dirs:
        if data is not None and Path(data).is_file():
            raise DatasetError(f"{data}: a manifest cannot be combined with --normal-dir/--abnormal-dir")
        return folder_dataset(normal_dirs, abnormal_dirs, mask_dirs, root=data, test_fraction=test_fraction)
    if data is None:
        raise DatasetError(
            "name the data: a dataset folder or CSV manifest, or explicit folders with "
            "--normal-dir DIR [--abnormal-dir [NAME=]DIR ...] [--mask-dir DIR]"
        )
    return discover_dataset(data, test_fraction=test_fraction)


def _existing_dir(name: str | None, folder: Path, option: str) -> tuple[str | None, Path]:
    if not folder.exists():
        raise DatasetError(f"{option} {folder}: does not exist")
    if not folder.is_dir():
        raise DatasetError(f"{option} {folder}: is not a folder")
    return name, folder


def _refuse_reuse(
    normals: list[tuple[str | None, Path]],
    abnormals: list[tuple[str | None, Path]],
    masks: list[tuple[str | None, Path]],
) -> None:
    """The same folder cannot be normal and anomalous, nor hold masks and images."""
    roles: dict[Path, str] = {}
    for role, entries in (("--normal-dir", normals), ("--abnormal-dir", abnormals), ("--mask-dir", masks)):
        for _, folder in entries:
            if folder in roles and roles[folder] != role:
                raise DatasetError(f"{folder}: given both as {roles[folder]} and as {role}")
            roles[folder] = role
    categories = [name or folder.name for name, folder in abnormals]
    duplicated = sorted({c for c in categories if categories.count(c) > 1})
    if duplicated:
        raise DatasetError(
            f"two --abnormal-dir folders are both called {duplicated[0]!r}; name them apart with "
            "--abnormal-dir NAME=DIR"
        )
    unknown = sorted({name for name, _ in masks if name} - {name or f.name for name, f in abnormals})
    if unknown:
        raise DatasetError(
            f"--mask-dir {unknown[0]}=...: no --abnormal-dir is named {unknown[0]!r} "
            f"(named: {', '.join(sorted(name or f.name for name, f in abnormals)) or 'none'})"
        )


def _attach_masks(
    anomalies: list[Sample],
    abnormals: list[tuple[str | None, Path]],
    masks: list[tuple[str | None, Path]],
    warnings: list[str],
) -> list[Sample]:
    """Give each anomalous image its mask: same relative path and stem in a mask folder (a ``_mask``
    suffix preferred, then PNG), or under a subfolder named like its category (MVTec's ground_truth)."""
    folder_of = {name or folder.name: folder for name, folder in abnormals}
    indexes = [(name, _index_masks(folder)) for name, folder in masks]
    used: set[Path] = set()
    out = []
    for s in anomalies:
        rel = s.path.relative_to(folder_of[s.category]).with_suffix("").as_posix()
        keys = [rel, f"{s.category}/{rel}", s.path.stem, f"{s.category}/{s.path.stem}"]
        mask = None
        for name, index in indexes:
            if name is not None and name != s.category:
                continue
            mask = next((index[k][1] for k in keys if k in index), None)
            if mask is not None:
                break
        if mask is not None:
            used.add(mask)
            s = Sample(s.path, s.label, s.split, s.category, mask)
        out.append(s)
    missing = [s for s in out if s.mask_path is None]
    if missing:
        warnings.append(
            f"{len(missing)} anomalous image(s) have no mask in the --mask-dir folder(s) "
            f"(e.g. {missing[0].path}); pixel metrics skip them"
        )
    orphans = sorted({path for _, index in indexes for _, path in index.values()} - used)
    if orphans:
        warnings.append(f"{len(orphans)} mask(s) match no anomalous image (e.g. {orphans[0]})")
    return out


def _index_masks(folder: Path) -> dict[str, tuple[tuple[int, int], Path]]:
    """relative stem (``_mask`` removed) -> (priority, mask); ``<stem>_mask`` beats ``<stem>``, PNG wins."""
    index: dict[str, tuple[tuple[int, int], Path]] = {}
    for path in collect_images(folder):
        rel = path.relative_to(folder)
        stem = rel.stem
        is_mask_named = stem.endswith(_MASK_SUFFIX)
        if is_mask_named:
            stem = stem[: -len(_MASK_SUFFIX)]
        key = (rel.parent / stem).as_posix()
        priority = (0 if is_mask_named else 1, 0 if path.suffix.lower() == ".png" else 1)
        if key not in index or priority < index[key][0]:
            index[key] = (priority, path)
    return index


def _inside_any(path: Path, folders: Iterable[Path]) -> bool:
    return any(path == f or path.is_relative_to(f) for f in folders)


def _common_root(folders: list[Path]) -> Path:
    return Path(os.path.commonpath([str(f) for f in folders]))
