"""The attacks of issue 18, each reproduced: non-finite pixels and scores, special files, links out of
an allowed folder, declared-huge images, a full disk, formula cells in CSV, newlines in file names."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from imaging_ad.cli import main
from imaging_ad.detectors import load_detector
from imaging_ad.export import load_exported
from imaging_ad.io import (
    ImageNotFoundError,
    ImageReadError,
    ImageTooLargeError,
    NonFiniteImageError,
    NotAnImageError,
    SpecialFileError,
    read_image,
)
from imaging_ad.io.safe_text import csv_cell, printable
from imaging_ad.result import NON_FINITE_CODE, AnomalyResult, non_finite_errors, without_non_finite
from imaging_ad.scan import read_rows, scan
from imaging_ad.scan import store as scan_store
from imaging_ad.scan.store import OutputWriteError
from tests.hostile_files import dicom_with_slope, float_tiff, huge_png, special_files, time_limit
from tests.synthetic import paste_defect, texture
from tests.tiny_models import one_torch_thread, tiny_model, tiny_textures, tiny_torchscript_export


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_model("patchcore")


@pytest.fixture(scope="module")
def detector(model: Path):
    return load_detector(model, device="cpu")


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def good_images(folder: Path, n: int = 3) -> list[Path]:
    rng = np.random.default_rng(5)
    return [write_png(folder / f"good_{i}.png", texture(rng, 64, 64)) for i in range(n)]


@pytest.fixture
def non_finite(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "non_finite"
    folder.mkdir()
    return {
        "float_naninf.tif": float_tiff(folder / "float_naninf.tif"),
        "slope_nan.dcm": dicom_with_slope(folder / "slope_nan.dcm", "nan"),
        "slope_1e308.dcm": dicom_with_slope(folder / "slope_1e308.dcm", "1e308"),
    }


# -- 1. non-finite input never yields a verdict ------------------------------------------------------


def test_reader_refuses_non_finite_pixels_naming_the_file(non_finite) -> None:
    for path in non_finite.values():
        with pytest.raises(NonFiniteImageError, match="NaN or infinite") as refused:
            read_image(path)
        assert refused.value.path == str(path) and str(path) in str(refused.value)
        assert refused.value.reason_code == "non_finite"


def test_cli_predict_gives_error_rows_and_strict_json(model, non_finite, tmp_path, capsys) -> None:
    good = good_images(tmp_path / "good", 1)
    out = tmp_path / "results.json"
    inputs = [str(p) for p in [*non_finite.values(), *good]]
    assert (
        main(["predict", str(model), *inputs, "--json", str(out), "--device", "cpu"]) == 1
    )  # errors: exit 1
    captured = capsys.readouterr()
    # strict parsers reject NaN: parse_constant is only called for NaN / Infinity
    rows = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))
    by_path = {row["path"]: row for row in rows}
    for path in non_finite.values():
        row = by_path[str(path)]
        assert "score" not in row and "is_anomaly" not in row
        assert str(path) in row["error"] and "NaN or infinite" in row["error"]
        assert str(path) in captured.err
    assert by_path[str(good[0])]["score"] == pytest.approx(by_path[str(good[0])]["score"])  # finite
    # the header and one verdict line only
    assert "nan" not in captured.out.lower() and captured.out.count("\n") == 2


def test_non_finite_scores_or_maps_become_errors() -> None:
    maps = [np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)]
    maps[2][1, 1] = np.inf
    errors = non_finite_errors(np.array([0.5, np.nan, 0.2]), maps)
    assert errors[0] is None and "nan" in errors[1] and "anomaly map" in errors[2]
    results = [
        AnomalyResult(0.5, 0.4, False, maps[0], "a.png"),
        AnomalyResult(float("nan"), float("nan"), False, maps[1], "b.png"),
        AnomalyResult(0.2, 0.1, True, maps[2], "c.png"),
    ]
    checked = without_non_finite(results)
    assert checked[0] is results[0]
    for failed in checked[1:]:
        assert not failed.ok and failed.is_anomaly is None and failed.heatmap is None
        assert failed.path in ("b.png", "c.png")


def test_python_api_gives_no_verdict_on_non_finite_arrays(detector) -> None:
    bad = np.full((64, 64), np.nan, np.float32)
    good = tiny_textures()[0]
    results = detector.predict([good, bad])
    assert results[0].ok and isinstance(results[0].is_anomaly, bool)
    assert not results[1].ok and results[1].is_anomaly is None and "score" in results[1].error


def test_exported_runtime_gives_no_verdict_on_non_finite_arrays() -> None:
    exported = load_exported(tiny_torchscript_export(), device="cpu")
    results = exported.predict([tiny_textures()[0], np.full((64, 64), np.inf, np.float32)])
    assert results[0].ok and not results[1].ok and results[1].is_anomaly is None


def test_scan_counts_non_finite_files_as_unreadable(model, detector, non_finite, tmp_path) -> None:
    folder = tmp_path / "in"
    good_images(folder, 2)
    for name, path in non_finite.items():
        shutil.copy(path, folder / name)
    summary = scan(folder, model, tmp_path / "out", detector=detector, heatmaps="all")
    rows = {row["path"]: row for row in read_rows(tmp_path / "out")}
    for name in non_finite:
        assert rows[name]["error_code"] == "non_finite" and rows[name]["score"] is None
        assert rows[name]["heatmap"] is None
    assert summary.n_errors == 3 and summary.n_rows == 5
    assert "3 could not be read" in str(summary)


def test_scan_turns_a_nan_score_into_an_error_row(model, detector, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "in"
    good_images(folder, 3)
    original = detector.score_batch

    def nan_for_the_second(batch):
        scores, maps, distances = original(batch)
        scores[1] = np.nan
        maps[2][0, 0] = np.inf
        return scores, maps, distances

    monkeypatch.setattr(detector, "score_batch", nan_for_the_second)
    summary = scan(folder, model, tmp_path / "out", detector=detector, heatmaps="all")
    rows = sorted(read_rows(tmp_path / "out"), key=lambda r: r["path"])
    assert [r["error_code"] for r in rows] == [None, NON_FINITE_CODE, NON_FINITE_CODE]
    assert rows[0]["score"] is not None and rows[1]["is_anomaly"] is None and rows[2]["heatmap"] is None
    assert summary.n_errors == 2
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in results.jsonl"))


# -- 4. special files are refused by the reader, before any read ---------------------------------------


def test_reader_refuses_special_files_at_once(tmp_path) -> None:
    made = special_files(tmp_path / "special")
    expected = {
        "fifo": (SpecialFileError, "FIFO"),
        "dev_zero": (SpecialFileError, "character device"),
        "loop": (SpecialFileError, "symbolic link loop"),
        "dangling": (ImageNotFoundError, "broken symbolic link"),
        "directory": (NotAnImageError, "directory"),
    }
    for kind, path in made.items():
        error, words = expected[kind]
        with time_limit(5), pytest.raises(error, match=words) as refused:
            read_image(path)
        assert str(path) in str(refused.value), kind
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nothing.png")


def test_read_is_bounded(tmp_path) -> None:
    path = write_png(tmp_path / "a.png", tiny_textures()[0])
    with pytest.raises(ImageTooLargeError, match="over the limit of 100 bytes"):
        read_image(path, max_file_bytes=100)


def test_cli_predict_on_a_folder_with_special_files(model, tmp_path, capsys) -> None:
    folder = tmp_path / "in"
    made = special_files(folder)
    good_images(folder, 1)
    with time_limit(120):
        assert main(["predict", str(model), str(folder), "--device", "cpu", "--allow-errors"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 2  # the header and the one good image
    for kind in ("fifo", "dev_zero", "loop"):
        assert str(made[kind]) in captured.err


def test_cli_predict_escapes_newlines_in_file_names(model, tmp_path, capsys) -> None:
    path = write_png(tmp_path / "two\nlines.png", tiny_textures()[0])
    bad = tmp_path / "bad\rname.png"
    bad.write_bytes(b"not an image")
    assert (
        main(["predict", str(model), str(path), str(bad), "--device", "cpu"]) == 1
    )  # one unreadable: exit 1
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 2 and "two\\nlines.png" in captured.out  # the header, one verdict
    assert "bad\\rname.png" in captured.err and "\r" not in captured.err
    assert printable("C:\\data\\x.png") == "C:\\data\\x.png"  # nothing to escape: unchanged
    assert printable("a\x1b[31mb\udcff") == "a\\x1b[31mb\\udcff"


# -- 2. links inside an allowed folder must not lead out of it ------------------------------------------


def linked_folder(tmp_path: Path) -> tuple[Path, Path]:
    """ALLOWED with two good images, a link to an outside folder and a link to an outside image."""
    allowed, outside = tmp_path / "allowed", tmp_path / "elsewhere"
    good_images(allowed / "imgs", 2)
    secret = write_png(outside / "secret.png", tiny_textures()[1])
    write_png(outside / "deeper" / "more.png", tiny_textures()[2])
    os.symlink(outside, allowed / "secretlink")
    os.symlink(secret, allowed / "imgs" / "leak.png")
    return allowed, outside


def test_scan_confined_to_allowed_roots_reads_nothing_outside(model, detector, tmp_path) -> None:
    allowed, outside = linked_folder(tmp_path)
    scan(allowed, model, tmp_path / "open", detector=detector, heatmaps="all")
    assert len(list(read_rows(tmp_path / "open"))) == 5  # the CLI default follows links (as before)
    summary = scan(
        allowed, model, tmp_path / "confined", detector=detector, heatmaps="all", allowed_roots=[allowed]
    )
    rows = list(read_rows(tmp_path / "confined"))
    assert sorted(r["path"] for r in rows) == ["imgs/good_0.png", "imgs/good_1.png"]
    assert summary.n_files == 2
    overlays = [p.name for p in (tmp_path / "confined" / "heatmaps").rglob("*.png")]
    assert sorted(overlays) == ["good_0_heatmap.png", "good_1_heatmap.png"]


# -- 6. bounded memory: the header's size is checked before decoding -------------------------------------


def test_declared_size_is_refused_before_decoding(model, detector, tmp_path) -> None:
    folder = tmp_path / "in"
    big = huge_png(folder / "big.png", 9999, 9999)
    assert big.stat().st_size < 1_000_000
    good_images(folder, 1)
    with pytest.raises(ImageTooLargeError, match="9999x9999 pixels exceeds the limit of 25,000,000"):
        read_image(big, max_pixels=25_000_000)
    scan(folder, model, tmp_path / "out", detector=detector, max_pixels=25_000_000)
    rows = {r["path"]: r for r in read_rows(tmp_path / "out")}
    assert rows["big.png"]["error_code"] == "too_large" and "25,000,000" in rows["big.png"]["error"]
    assert rows["good_0.png"]["score"] is not None


# -- 7. a full disk names the file, leaves no partial files, and a rerun completes -----------------------


def _leftovers(out: Path) -> list[str]:
    partial = [p.name for p in out.rglob("*.partial")]
    empty = [p.name for p in out.rglob("*.png") if p.stat().st_size == 0]
    return partial + empty


def _disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_while_writing_an_overlay(model, tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "in"
    good_images(folder, 3)
    out = tmp_path / "out"
    real_write_bytes = Path.write_bytes
    calls = {"n": 0}

    def fills_the_disk(path, data):
        if not str(path).endswith("_heatmap.png"):
            return real_write_bytes(path, data)
        calls["n"] += 1
        if calls["n"] == 2:  # as a real full disk does: the file is created, nothing fits in it
            real_write_bytes(path, b"")
            raise _disk_full(path)
        return real_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", fills_the_disk)
    command = [
        "scan",
        str(folder),
        "--model",
        str(model),
        "--out",
        str(out),
        "--heatmaps",
        "all",
        "--batch-size",
        "1",
    ]
    assert main([*command, "--no-progress", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert (
        "good_1_heatmap.png: cannot be written (No space left on device)" in err
        and "run the same command" in err
    )
    assert _leftovers(out) == []
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    assert main([*command, "--no-progress", "--device", "cpu"]) == 0
    rows = list(read_rows(out))
    assert len(rows) == 3 and all(r["heatmap"] for r in rows)
    assert _leftovers(out) == []


def test_full_disk_while_appending_rows(model, detector, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "in"
    good_images(folder, 4)
    out = tmp_path / "out"
    real_write_all = scan_store._write_all
    calls = {"n": 0}

    def half_then_full(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            os.write(fd, data[: len(data) // 2])  # a short write, then the disk is full
            raise _disk_full("results.jsonl")
        real_write_all(fd, data)

    monkeypatch.setattr(scan_store, "_write_all", half_then_full)
    with pytest.raises(OutputWriteError) as full:
        scan(folder, model, out, detector=detector, batch_size=1)
    assert full.value.filename == str(out / "results.jsonl") and full.value.errno == errno.ENOSPC
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    # cut back to the last whole row: every line whole, the failed batch's row absent (batches already
    # queued behind it may have been written)
    assert all(line.endswith(b"\n") for line in lines)
    assert "good_1.png" not in {json.loads(line)["path"] for line in lines}
    assert _leftovers(out) == []
    monkeypatch.setattr(scan_store, "_write_all", real_write_all)
    summary = scan(folder, model, out, detector=detector, batch_size=1)
    assert summary.n_rows == 4 and summary.n_skipped == len(lines)


def test_full_disk_while_rewriting_results(model, detector, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "in"
    good_images(folder, 2)
    out = tmp_path / "out"
    scan(folder, model, out, detector=detector)
    real_fsync = os.fsync

    def fsync_fails(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            raise _disk_full("?")
        real_fsync(fd)

    monkeypatch.setattr(scan_store.os, "fsync", fsync_fails)
    with pytest.raises(OutputWriteError, match=r"\.partial: cannot be written"):
        scan(folder, model, out, detector=detector)
    monkeypatch.setattr(scan_store.os, "fsync", real_fsync)
    assert _leftovers(out) == []
    assert scan(folder, model, out, detector=detector).n_rows == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_for_real_on_a_small_tmpfs(model, detector, tmp_path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        folder = tmp_path / "in"
        rng = np.random.default_rng(9)
        for i in range(6):  # noisy images: their overlays do not compress, so the disk fills
            write_png(folder / f"{i}.png", rng.integers(0, 255, (160, 160), dtype=np.uint8))
        out = mount / "out"
        with pytest.raises(OutputWriteError) as full:
            scan(folder, model, out, detector=detector, heatmaps="all", batch_size=1)
        assert full.value.errno == errno.ENOSPC and full.value.filename.startswith(str(out))
        assert _leftovers(out) == []
        shutil.rmtree(out / "heatmaps")  # free space, then resume without overlays taking it again
        summary = scan(folder, model, out, detector=detector, heatmaps="none", batch_size=1)
        assert summary.n_rows == 6
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# -- 8. CSV cells that a spreadsheet would run ---------------------------------------------------------


def test_csv_cell_escaping_follows_owasp() -> None:
    for text in ('=HYPERLINK("http://x")', "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(text) == "'" + text
    assert csv_cell("normal.png") == "normal.png"
    assert csv_cell(-0.5) == -0.5 and csv_cell(3) == 3


def test_scan_csv_escapes_formula_file_names(model, detector, tmp_path) -> None:
    folder = tmp_path / "in"
    write_png(folder / "=cmd.png", tiny_textures()[0])
    write_png(folder / "-plain.png", paste_defect(tiny_textures()[1], np.random.default_rng(0), 12)[0])
    scan(folder, model, tmp_path / "out", detector=detector)
    with open(tmp_path / "out" / "results.csv", newline="", encoding="utf-8") as handle:
        paths = sorted(row["path"] for row in csv.DictReader(handle))
    assert paths == ["'-plain.png", "'=cmd.png"]
    assert {r["path"] for r in read_rows(tmp_path / "out")} == {"=cmd.png", "-plain.png"}  # JSONL: as is


def test_review_export_escapes_formula_cells(tmp_path) -> None:
    from imaging_ad.app.review_store import NewItem, ReviewStore

    store = ReviewStore(tmp_path / "review.sqlite3")
    item = store.add_item(
        NewItem("/x/=evil.png", '=HYPERLINK("http://evil","click")', "inspect", "m", "sha", -0.25, 0.1, 0.5)
    )
    store.record_verdict(item, "normal", "@reviewer", "+note")
    for history in (False, True):
        out = store.export_csv(tmp_path / f"verdicts-{history}.csv", history=history)
        with open(out, newline="", encoding="utf-8") as handle:
            row = next(csv.DictReader(handle))
        assert row["display_name"].startswith("'=HYPERLINK")
        assert row["image_path"] == "/x/=evil.png"
        assert row["reviewer"] == "'@reviewer" and row["note"] == "'+note"
        assert row["score"] == "-0.25"  # a number stays a number


def test_read_size_reads_only_the_header(tmp_path) -> None:
    from pydicom.data import get_testdata_file

    from imaging_ad.io import read_size

    assert read_size(huge_png(tmp_path / "big.png", 9999, 7000, rgb=False)) == (7000, 9999)
    assert read_size(get_testdata_file("CT_small.dcm")) == (128, 128)
    made = special_files(tmp_path / "special")
    with time_limit(5), pytest.raises(SpecialFileError):
        read_size(made["fifo"])


def test_demo_learn_refuses_oversized_images_before_decoding(tmp_path) -> None:
    from imaging_ad.app.config import DemoConfig
    from imaging_ad.app.service import DemoService

    service = DemoService(DemoConfig(data_dir=tmp_path / "data", device="cpu"))
    uploads = good_images(tmp_path / "up", 5) + [huge_png(tmp_path / "up" / "big.png", 9999, 9999)]
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 25,000,000") as refused:
        service.learn(uploads, None, "patchcore", "too-big")
    assert "big.png" in str(refused.value)
    assert not list((tmp_path / "data" / "models").glob("*.safetensors"))
