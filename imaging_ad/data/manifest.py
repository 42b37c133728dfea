"""CSV manifests: an explicit list of images with labels, for data that no folder layout describes.

Header ``path,label[,mask][,split][,category]`` (any order, any case; other columns are ignored).
Paths are relative to the CSV's folder unless absolute. Every error names the file and the row.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from imaging_ad.data.dataset import (
    ANOMALOUS,
    NORMAL,
    SPLITS,
    Dataset,
    DatasetError,
    Sample,
    _check_fraction,
    check_mask_sizes,
    split_normals,
)

LABEL_VALUES = {
    **dict.fromkeys(("0", "normal", "good", "ok"), NORMAL),
    **dict.fromkeys(("1", "anomaly", "anomalous", "abnormal", "bad", "defect", "defective"), ANOMALOUS),
}
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("mask", "split", "category")


def read_manifest(csv_path: str | os.PathLike, *, test_fraction: float = 0.2) -> Dataset:
    """Read a CSV manifest into a :class:`Dataset` (layout ``"manifest"``, ``root`` = the CSV file).

    ``label`` accepts 0/1, normal/good/ok and anomaly/anomalous/abnormal/bad/defect(ive), any case.
    Rows without a ``split`` (no column, or an empty cell) are split like folders: anomalies go to
    test, ``test_fraction`` of the normals (every k-th by sorted path) too, the rest to train. Rows keep
    the manifest's order.
    """
    _check_fraction(test_fraction)
    csv_path = Path(os.path.abspath(os.fspath(csv_path)))
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            reader = csv.reader(f)
            # Keep each record's last physical line: quoted cells may span lines.
            records = [(reader.line_num, record) for record in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: cannot read manifest ({exc})") from exc
    if not records:
        raise DatasetError(f"{csv_path}: empty manifest; expected a header path,label[,mask][,split]")

    header = records[0][1]
    columns = [c.strip().lower() for c in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DatasetError(
            f"{csv_path}: header {','.join(header)!r} lacks column(s) {', '.join(missing)}; "
            "expected path,label[,mask][,split]"
        )
    duplicated = sorted({c for c in columns if c and columns.count(c) > 1})
    if duplicated:
        raise DatasetError(
            f"{csv_path}: column(s) {', '.join(duplicated)} appear more than once in the header"
        )
    col = {name: columns.index(name) for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if name in columns}

    rows: list[tuple[Sample, bool]] = []  # (sample, split given in the manifest)
    first_row: dict[Path, int] = {}
    for row_no, (line_no, record) in enumerate(records[1:], start=1):
        if not any(cell.strip() for cell in record):
            continue  # blank line
        where = f"{csv_path}, row {row_no} (line {line_no})"

        def cell(name: str, record: list[str] = record) -> str:
            i = col.get(name)
            return record[i].strip() if i is not None and i < len(record) else ""

        label_text = cell("label")
        if label_text.lower() not in LABEL_VALUES:
            raise DatasetError(
                f"{where}: bad label {label_text!r}; "
                "use 0/1, normal/good/ok or anomaly/anomalous/abnormal/bad"
            )
        label = LABEL_VALUES[label_text.lower()]
        path = _existing_file(base, cell("path"), "image", where)
        if path in first_row:
            raise DatasetError(f"{where}: {path} is already listed at row {first_row[path]}")
        first_row[path] = row_no
        mask = _existing_file(base, cell("mask"), "mask", where) if cell("mask") else None
        split = cell("split").lower()
        if split and split not in SPLITS:
            raise DatasetError(f"{where}: bad split {cell('split')!r}; use train or test (or leave it empty)")
        category = cell("category") or ("anomalous" if label == ANOMALOUS else "normal")
        rows.append((Sample(path, label, split or "test", category, mask), bool(split)))
    if not rows:
        raise DatasetError(f"{csv_path}: manifest has a header but no rows")

    warnings: list[str] = []
    unsplit_normals = [s for s, given in rows if not given and s.label == NORMAL]
    train, test = split_normals(unsplit_normals, test_fraction)
    assigned = {s.path: s for s in train + test}
    samples = [assigned.get(s.path, s) if not given else s for s, given in rows]

    trained_anomalies = [s for s in samples if s.split == "train" and s.label == ANOMALOUS]
    if trained_anomalies:
        warnings.append(
            f"{len(trained_anomalies)} anomalous row(s) have split=train and are never trained on "
            f"(e.g. {trained_anomalies[0].path})"
        )
    if "mask" in col:
        unmasked = [s for s in samples if s.split == "test" and s.label == ANOMALOUS and s.mask_path is None]
        if unmasked:
            warnings.append(
                f"{len(unmasked)} anomalous test image(s) have no mask (e.g. {unmasked[0].path}); "
                "pixel metrics skip them"
            )
    check_mask_sizes(samples)
    return Dataset(root=csv_path, layout="manifest", samples=samples, warnings=warnings)


def _existing_file(base: Path, text: str, what: str, where: str) -> Path:
    if not text:
        raise DatasetError(f"{where}: empty {what} path")
    path = Path(text).expanduser()
    path = Path(os.path.normpath(path if path.is_absolute() else base / path))
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "not found"
        raise DatasetError(f"{where}: {what} file {text!r} {state} (looked for {path})")
    return path
