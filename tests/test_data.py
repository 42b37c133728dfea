"""Dataset discovery: every layout, masks, manifests, deterministic splits, and the shared benchmark data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from imaging_ad.data import (
    Dataset,
    DatasetError,
    Sample,
    discover_dataset,
    image_size,
    load_mask,
    split_normals,
)


def png(path: Path, height: int = 8, width: int = 6, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width), value, np.uint8))
    return path


def mask_png(path: Path, height: int = 8, width: int = 6) -> Path:
    """0/255 mask with the top-left 2x3 corner set."""
    pixels = np.zeros((height, width), np.uint8)
    pixels[:2, :3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def names(samples: list[Sample]) -> list[str]:
    return [s.path.name for s in samples]


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    root = tmp_path / "tile"
    for i in range(3):
        png(root / "train" / "good" / f"{i:03d}.png")
    png(root / "test" / "good" / "000.png")
    png(root / "test" / "good" / "001.png")
    for stem in ("000", "001"):
        png(root / "test" / "crack" / f"{stem}.png")
        mask_png(root / "ground_truth" / "crack" / f"{stem}_mask.png")
    png(root / "test" / "hole" / "000.png")
    mask_png(root / "ground_truth" / "hole" / "000.png")  # <stem>.png is accepted too
    (root / "license.txt").write_text("not an image")
    return root


# --- MVTec layout -----------------------------------------------------------------------------------


def test_mvtec_layout_counts_labels_and_masks(mvtec: Path) -> None:
    ds = discover_dataset(mvtec)
    assert ds.layout == "mvtec"
    assert ds.root == mvtec
    assert names(ds.train) == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.split == "train" and s.category == "good" for s in ds.train)
    by_category = {c: [s for s in ds.test if s.category == c] for c in ("good", "crack", "hole")}
    assert [len(v) for v in by_category.values()] == [2, 2, 1]
    assert all(s.label == 0 and s.mask_path is None for s in by_category["good"])
    for s in by_category["crack"] + by_category["hole"]:
        assert s.label == 1
        assert s.mask_path is not None and s.mask_path.parent.parent.name == "ground_truth"
    assert by_category["crack"][0].mask_path.name == "000_mask.png"
    assert by_category["hole"][0].mask_path.name == "000.png"
    assert ds.warnings == []

    summary = ds.summary()
    assert summary["layout"] == "mvtec" and summary["total"] == 8
    assert summary["train"] == {"total": 3, "normal": 3, "anomalous": 0, "categories": {"good": 3}}
    assert summary["test"]["categories"] == {"crack": 2, "good": 2, "hole": 1}
    assert summary["test"]["normal"] == 2 and summary["test"]["anomalous"] == 3
    assert summary["masks"] == 3 and summary["missing_masks"] == 0


def test_mvtec_mask_preferred_name_and_missing_mask_reported(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    png(root / "train" / "good" / "a.png")
    png(root / "test" / "good" / "b.png")
    png(root / "test" / "crack" / "c.png")
    png(root / "test" / "crack" / "d.png")
    mask_png(root / "ground_truth" / "crack" / "c_mask.png")
    mask_png(root / "ground_truth" / "crack" / "c.png")  # both forms: "_mask" wins
    mask_png(root / "ground_truth" / "crack" / "zzz_mask.png")  # matches no image
    ds = discover_dataset(root)
    c, d = (s for s in ds.test if s.category == "crack")
    assert c.mask_path is not None and c.mask_path.name == "c_mask.png"
    assert d.mask_path is None
    summary = ds.summary()
    assert summary["masks"] == 1 and summary["missing_masks"] == 1
    assert any("no mask" in w and "d.png" in w for w in ds.warnings)
    assert any("match no test image" in w for w in ds.warnings)
    with pytest.raises(DatasetError, match="no ground-truth mask"):
        ds.load_mask(d)


def test_load_mask_values_shapes_and_normal_without_mask(mvtec: Path) -> None:
    ds = discover_dataset(mvtec)
    crack = next(s for s in ds.test if s.category == "crack")
    mask = ds.load_mask(crack)
    assert mask.dtype == bool and mask.shape == (8, 6)
    assert mask.sum() == 6 and mask[:2, :3].all()
    np.testing.assert_array_equal(load_mask(crack, shape=(8, 6, 3)), mask)  # known shape, no header read
    normal = ds.test[0] if ds.test[0].label == 0 else next(s for s in ds.test if s.label == 0)
    empty = ds.load_mask(normal)
    assert empty.shape == (8, 6) and empty.dtype == bool and not empty.any()


def test_mask_size_mismatch_at_discovery_names_both_files(mvtec: Path) -> None:
    mask_png(mvtec / "ground_truth" / "crack" / "001_mask.png", height=9, width=6)
    with pytest.raises(DatasetError) as info:
        discover_dataset(mvtec)
    message = str(info.value)
    assert "001_mask.png" in message and str(mvtec / "test" / "crack" / "001.png") in message
    assert "6x9" in message and "6x8" in message


def test_load_mask_mismatch_with_given_shape_names_both_files(mvtec: Path) -> None:
    crack = next(s for s in discover_dataset(mvtec).test if s.category == "crack")
    with pytest.raises(ValueError, match=r"does not match image size") as info:
        load_mask(crack, shape=(16, 12))
    assert str(crack.path) in str(info.value) and str(crack.mask_path) in str(info.value)


def test_mask_reading_handles_01_and_colour_masks(tmp_path: Path) -> None:
    image = png(tmp_path / "img.png")
    ones = np.zeros((8, 6), np.uint8)
    ones[3, 4] = 1
    cv2.imwrite(str(tmp_path / "ones.png"), ones)
    colour = np.zeros((8, 6, 3), np.uint8)
    colour[5, 1] = (0, 0, 200)
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    for name, where in (("ones.png", (3, 4)), ("colour.png", (5, 1))):
        mask = load_mask(Sample(image, 1, "test", "x", tmp_path / name))
        assert mask.sum() == 1 and mask[where]


def test_nested_test_folders_find_nested_masks(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    png(root / "train" / "good" / "a.png")
    png(root / "test" / "crack" / "batch1" / "x.png")
    png(root / "test" / "crack" / "batch2" / "y.png")
    mask_png(root / "ground_truth" / "crack" / "batch1" / "x_mask.png")
    mask_png(root / "ground_truth" / "crack" / "y_mask.png")  # flat ground truth for a nested image
    ds = discover_dataset(root)
    assert [s.mask_path.name for s in ds.test] == ["x_mask.png", "y_mask.png"]


# --- folder layouts ---------------------------------------------------------------------------------


def test_split_folders_like_chest_xray_skip_non_images(tmp_path: Path) -> None:
    root = tmp_path / "xray"
    png(root / "train" / "NORMAL" / "n1.jpeg")
    png(root / "train" / "NORMAL" / "sub" / "n2.png")  # recursive within a class folder
    png(root / "train" / "NORMAL" / ".hidden.png")
    png(root / "train" / "NORMAL" / ".cache" / "n3.png")
    (root / "train" / "NORMAL" / "notes.txt").write_text("x")
    (root / "train" / "NORMAL" / "labels.csv").write_text("x")
    (root / "train" / "NORMAL" / "README").write_text("x")
    (root / "train" / "NORMAL" / "meta.json").write_text("{}")
    png(root / "test" / "Normal" / "t1.png")
    png(root / "test" / "PNEUMONIA" / "p1.png")
    png(root / "test" / "PNEUMONIA" / "p2.png")
    png(root / "test" / "PNEUMONIA" / "masks" / "p1.png")  # a mask folder, not images
    ds = discover_dataset(root)
    assert ds.layout == "split_folders"
    assert names(ds.train) == ["n1.jpeg", "n2.png"]
    assert [(s.category, s.label) for s in ds.test] == [("Normal", 0), ("PNEUMONIA", 1), ("PNEUMONIA", 1)]
    summary = ds.summary()
    assert summary["masks"] == 0 and summary["missing_masks"] == 0  # no masks expected without ground truth
    table = ds.describe()
    assert "split_folders" in table and "PNEUMONIA" in table
    lines = table.splitlines()
    assert lines[1].split() == ["split", "category", "label", "images", "masks"]
    assert lines[-1].split() == ["total", "5", "0"]
    assert len({len(line) for line in lines[1:] if not line.startswith("-")}) <= 2  # aligned columns


@pytest.mark.parametrize("normal_name", ["good", "normal", "ok", "NORMAL", "Good", "OK"])
def test_normal_names_are_case_insensitive(tmp_path: Path, normal_name: str) -> None:
    png(tmp_path / "train" / normal_name / "a.png")
    png(tmp_path / "test" / normal_name / "b.png")
    png(tmp_path / "test" / "defect" / "c.png")
    ds = discover_dataset(tmp_path)
    assert [s.label for s in ds.samples] == [0, 0, 1]


def test_train_folder_without_normal_class_is_an_error(tmp_path: Path) -> None:
    png(tmp_path / "train" / "PNEUMONIA" / "a.png")
    png(tmp_path / "test" / "PNEUMONIA" / "b.png")
    with pytest.raises(DatasetError, match="normal-named"):
        discover_dataset(tmp_path)


def test_anomalous_train_folder_is_listed_but_not_trained_on(tmp_path: Path) -> None:
    png(tmp_path / "train" / "NORMAL" / "a.png")
    png(tmp_path / "train" / "PNEUMONIA" / "b.png")
    png(tmp_path / "test" / "PNEUMONIA" / "c.png")
    ds = discover_dataset(tmp_path)
    assert names(ds.train) == ["a.png"]
    assert ds.summary()["train"]["anomalous"] == 1
    assert any("never trained on" in w for w in ds.warnings)


def test_plain_folder_is_all_normal_training(tmp_path: Path) -> None:
    png(tmp_path / "b.png")
    png(tmp_path / "a.jpg")
    png(tmp_path / "patient7" / "c.bmp")
    (tmp_path / "info.md").write_text("x")
    ds = discover_dataset(tmp_path)
    assert ds.layout == "folder"
    assert names(ds.train) == ["a.jpg", "b.png", "c.bmp"]
    assert ds.test == []
    assert "no normal training images" not in " ".join(ds.warnings)


def test_class_folders_split_every_kth_normal_deterministically(tmp_path: Path) -> None:
    for i in range(10):
        png(tmp_path / "good" / f"{i:02d}.png")
    for i in range(3):
        png(tmp_path / "scratch" / f"s{i}.png")
    ds = discover_dataset(tmp_path, test_fraction=0.2)
    assert ds.layout == "class_folders"
    test_normals = [s for s in ds.test if s.label == 0]
    assert names(test_normals) == ["04.png", "09.png"]  # every 5th by sorted name
    assert len(ds.train) == 8 and {s.path.name for s in ds.train}.isdisjoint(names(test_normals))
    assert names([s for s in ds.test if s.label == 1]) == ["s0.png", "s1.png", "s2.png"]
    assert discover_dataset(tmp_path, test_fraction=0.2).samples == ds.samples
    assert len([s for s in discover_dataset(tmp_path, test_fraction=0.5).test if s.label == 0]) == 5


def test_collection_of_datasets_is_rejected(tmp_path: Path) -> None:
    png(tmp_path / "bottle" / "train" / "good" / "a.png")
    png(tmp_path / "cable" / "train" / "good" / "a.png")
    with pytest.raises(DatasetError, match="several datasets"):
        discover_dataset(tmp_path)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "text_file"])
def test_unusable_paths_say_which_layouts_are_accepted(tmp_path: Path, case: str) -> None:
    target = {"missing": tmp_path / "nope", "empty_dir": tmp_path, "text_file": tmp_path / "x.txt"}[case]
    if case == "text_file":
        target.write_text("x")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="accepted layouts") as info:
        discover_dataset(target)
    assert isinstance(info.value, ValueError)
    assert "manifest" in str(info.value) and "train/good" in str(info.value)


def test_bad_test_fraction(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="test_fraction"):
        discover_dataset(tmp_path, test_fraction=1.0)


# --- split_normals ----------------------------------------------------------------------------------


def _samples(n: int) -> list[Sample]:
    return [Sample(Path(f"/d/{i:03d}.png"), 0, "train", "good") for i in range(n)]


@pytest.mark.parametrize(
    ("n", "fraction", "n_test"), [(10, 0.2, 2), (100, 0.29, 29), (10, 0.0, 0), (3, 0.2, 1)]
)
def test_split_normals_counts(n: int, fraction: float, n_test: int) -> None:
    train, test = split_normals(list(reversed(_samples(n))), fraction)
    assert len(test) == n_test and len(train) == n - n_test
    assert all(s.split == "test" for s in test) and all(s.split == "train" for s in train)
    assert names(train) == sorted(names(train))  # sorted whatever the input order


def test_split_normals_keeps_one_training_sample() -> None:
    train, test = split_normals(_samples(1), 0.5)
    assert len(train) == 1 and test == []


# --- manifests --------------------------------------------------------------------------------------


def write_manifest(folder: Path, text: str, name: str = "list.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_manifest_with_split_and_masks(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png")
    png(tmp_path / "img" / "c.png")
    mask_png(tmp_path / "gt" / "c.png")
    csv = write_manifest(
        tmp_path,
        "Path,Label,Mask,Split\nimg/a.png,normal,,train\nimg/b.png,GOOD,,test\nimg/c.png,Anomalous,gt/c.png,test\n",
    )
    ds = discover_dataset(csv)
    assert isinstance(ds, Dataset) and ds.layout == "manifest" and ds.root == csv
    assert [(s.path.name, s.label, s.split) for s in ds.samples] == [
        ("a.png", 0, "train"),
        ("b.png", 0, "test"),
        ("c.png", 1, "test"),
    ]
    assert ds.samples[2].mask_path == tmp_path / "gt" / "c.png"
    assert ds.load_mask(ds.samples[2]).sum() == 6
    assert ds.summary()["masks"] == 1


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("0", 0),
        ("normal", 0),
        ("Good", 0),
        ("1", 1),
        ("anomaly", 1),
        ("ANOMALOUS", 1),
        ("abnormal", 1),
        ("bad", 1),
    ],
)
def test_manifest_label_spellings(tmp_path: Path, text: str, label: int) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    ds = discover_dataset(write_manifest(tmp_path, f"path,label\na.png,{text}\nb.png,0\n"))
    assert ds.samples[0].label == label


def test_manifest_without_split_uses_the_deterministic_rule(tmp_path: Path) -> None:
    rows = ["path,label"]
    for i in range(10):
        png(tmp_path / "n" / f"{i}.png")
        rows.append(f"n/{i}.png,0")
    png(tmp_path / "x.png")
    rows.append(f"{tmp_path / 'x.png'},1")  # absolute paths work too
    ds = discover_dataset(write_manifest(tmp_path, "\n".join(rows) + "\n"))
    assert names([s for s in ds.test if s.label == 0]) == ["4.png", "9.png"]
    assert [s.split for s in ds.samples if s.label == 1] == ["test"]
    assert names(ds.samples) == [f"{i}.png" for i in range(10)] + ["x.png"]  # manifest order kept


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("a.png,0\nb.png,maybe\n", r"row 2 \(line 3\).*bad label 'maybe'"),
        ("a.png,0\nmissing.png,1\n", r"row 2 \(line 3\).*'missing.png' not found"),
        ("a.png,0\n,1\n", r"row 2 .*empty image path"),
        ("a.png,0\na.png,1\n", r"row 2 .*already listed at row 1"),
    ],
)
def test_manifest_row_errors(tmp_path: Path, body: str, match: str) -> None:
    png(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=match):
        discover_dataset(write_manifest(tmp_path, "path,label\n" + body))


def test_manifest_structural_errors(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="lacks column"):
        discover_dataset(write_manifest(tmp_path, "file,label\na.png,0\n"))
    with pytest.raises(DatasetError, match="no rows"):
        discover_dataset(write_manifest(tmp_path, "path,label\n"))
    with pytest.raises(DatasetError, match=r"row 1 .*bad split 'val'"):
        discover_dataset(write_manifest(tmp_path, "path,label,split\na.png,0,val\n"))
    with pytest.raises(DatasetError, match=r"row 1 .*mask file 'nomask.png' not found"):
        discover_dataset(write_manifest(tmp_path, "path,label,mask\na.png,1,nomask.png\n"))


def test_manifest_mask_size_mismatch(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    mask_png(tmp_path / "m.png", height=4)
    with pytest.raises(DatasetError, match="m.png.*a.png"):
        discover_dataset(write_manifest(tmp_path, "path,label,mask\na.png,1,m.png\n"))


# --- headers ----------------------------------------------------------------------------------------


def test_image_size_reads_headers_with_exif_rotation_and_dicom(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: read_image returns it transposed
    Image.new("L", (10, 4)).save(tmp_path / "rot.jpg", exif=exif)
    assert image_size(tmp_path / "rot.jpg") == (10, 4)
    png(tmp_path / "plain.png", height=5, width=7)
    assert image_size(tmp_path / "plain.png") == (5, 7)

    pydicom_data = pytest.importorskip("pydicom.data")
    dicom = Path(pydicom_data.get_testdata_file("CT_small.dcm"))
    assert image_size(dicom) == (128, 128)
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "IM0001").write_bytes(dicom.read_bytes())  # DICOM without a suffix
    (tmp_path / "series" / "1.2.840.113619.2").write_bytes(dicom.read_bytes())  # named by UID
    assert names(discover_dataset(tmp_path / "series").train) == ["1.2.840.113619.2", "IM0001"]


def test_import_does_not_pull_in_torch() -> None:
    code = "import sys, imaging_ad.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- shared benchmark data --------------------------------------------------------------------------


@pytest.mark.shared_data
def test_shared_magnetic_tile(shared_data: Path) -> None:
    ds = discover_dataset(shared_data / "magnetic_tile")
    assert ds.layout == "mvtec"
    test_good = [s for s in ds.test if s.label == 0]
    defective = [s for s in ds.test if s.label == 1]
    assert len(ds.train) == 762
    assert len(test_good) == 190
    assert len(defective) == 392
    assert sum(s.mask_path is not None for s in ds.samples) == 392
    assert all(s.mask_path is not None for s in defective)
    summary = ds.summary()
    assert summary["test"]["categories"] == {
        "blowhole": 115,
        "break": 85,
        "crack": 57,
        "fray": 32,
        "good": 190,
        "uneven": 103,
    }
    assert summary["masks"] == 392 and summary["missing_masks"] == 0 and ds.warnings == []
    mask = ds.load_mask(defective[0])
    assert mask.dtype == bool and mask.any() and mask.shape == image_size(defective[0].path)


@pytest.mark.shared_data
def test_shared_chest_xray(shared_data: Path) -> None:
    ds = discover_dataset(shared_data / "chest_xray")
    assert ds.layout == "split_folders"
    assert len(ds.train) == 1341
    assert len([s for s in ds.test if s.label == 0 and s.category == "NORMAL"]) == 234
    assert len([s for s in ds.test if s.label == 1 and s.category == "PNEUMONIA"]) == 390
    assert len(ds.samples) == 1341 + 234 + 390
    assert ds.summary()["masks"] == 0


# --- class folders of unknown meaning, and explicit folders ---------------------------------------


def yes_no(root: Path, n_no: int = 5, n_yes: int = 7) -> Path:
    """The brain MRI layout: a tumour class ``yes/`` and a healthy class ``no/``, no split, no hint."""
    for i in range(n_no):
        png(root / "no" / f"n{i}.png")
    for i in range(n_yes):
        png(root / "yes" / f"y{i}.png")
    return root


def test_yes_no_class_folders_are_unknown_never_normal(tmp_path: Path) -> None:
    ds = discover_dataset(yes_no(tmp_path / "brain"))
    assert ds.samples == []  # nothing was taken as normal
    assert {name: len(paths) for name, paths in ds.unknown_classes.items()} == {"no": 5, "yes": 7}
    assert ds.summary()["unknown_classes"] == {"no": 5, "yes": 7}
    with pytest.raises(DatasetError) as info:
        ds.train  # noqa: B018  (the property refuses)
    message = str(info.value)
    assert "no/ (5 images)" in message and "yes/ (7 images)" in message
    assert "--normal-dir no --abnormal-dir yes" in message  # "no" reads as the negative finding
    with pytest.raises(DatasetError, match="whether they are normal"):
        ds.test  # noqa: B018
    table = ds.describe()
    assert "unknown" in table and "error:" in table


@pytest.mark.parametrize(
    "layout",
    [
        ["patient1/a.png", "patient2/b.png"],  # two folders side by side: classes or not, nobody knows
        ["positive/a.png"],  # one folder, but its name is a label
        ["good/a.png", "good/b.png", "1/c.png"],  # "1" beside "good" may be normal too
        ["train/good/a.png", "test/good/b.png", "test/no/c.png"],  # label-like class in a split layout
    ],
)
def test_label_like_or_side_by_side_folders_are_unknown(tmp_path: Path, layout: list[str]) -> None:
    for rel in layout:
        png(tmp_path / rel)
    ds = discover_dataset(tmp_path)
    assert ds.unknown_classes
    with pytest.raises(DatasetError, match="--normal-dir"):
        ds.train  # noqa: B018


def test_one_plainly_named_subfolder_is_still_a_plain_folder(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "scans" / "b.png")
    ds = discover_dataset(tmp_path)
    assert ds.unknown_classes == {} and names(ds.train) == ["a.png", "b.png"]


def test_explicit_folders_give_the_right_counts(tmp_path: Path) -> None:
    from imaging_ad.data import folder_dataset

    root = yes_no(tmp_path / "brain", n_no=10, n_yes=7)
    for i in range(3):
        mask_png(root / "masks" / f"y{i}_mask.png")
    ds = folder_dataset(["no"], ["tumour=yes"], ["masks"], root=root, test_fraction=0.2)
    assert ds.layout == "explicit" and ds.root == root
    summary = ds.summary()
    assert (summary["train"]["normal"], summary["test"]["normal"], summary["test"]["anomalous"]) == (8, 2, 7)
    assert summary["test"]["categories"] == {"no": 2, "tumour": 7}
    assert summary["masks"] == 3 and any("have no mask" in w for w in ds.warnings)
    assert {s.path.name for s in ds.train} <= {f"n{i}.png" for i in range(10)}


def test_explicit_normal_folder_around_the_anomalous_one(tmp_path: Path) -> None:
    """``--normal-dir . --abnormal-dir defects``: the defects inside the normal folder stay anomalous."""
    from imaging_ad.data import open_dataset

    for i in range(4):
        png(tmp_path / f"ok{i}.png")
    png(tmp_path / "defects" / "d0.png")
    ds = open_dataset(tmp_path, normal_dirs=["."], abnormal_dirs=["defects"], test_fraction=0.25)
    assert sorted(names([s for s in ds.samples if s.label == 0])) == [f"ok{i}.png" for i in range(4)]
    assert names([s for s in ds.samples if s.label == 1]) == ["d0.png"]


def test_explicit_folder_errors_name_the_folder(tmp_path: Path) -> None:
    from imaging_ad.data import folder_dataset

    yes_no(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        folder_dataset(["missing"], root=tmp_path)
    with pytest.raises(DatasetError, match="both as --normal-dir and as --abnormal-dir"):
        folder_dataset(["no"], ["no"], root=tmp_path)
    with pytest.raises(DatasetError, match="at least one folder of normal images"):
        folder_dataset([], ["yes"], root=tmp_path)
    png(tmp_path / "a" / "yes" / "z.png")
    with pytest.raises(DatasetError, match="name them apart"):
        folder_dataset(["no"], ["yes", "a/yes"], root=tmp_path)
