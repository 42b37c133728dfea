"""Folder scanning end to end: bad files, resume, torn writes, SIGKILL, model changes, the HTML report."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

import imaging_ad  # noqa: F401  (imaging_ad.scan, the lazy export)
from imaging_ad.cli import main
from imaging_ad.detectors import create_detector, load_detector
from imaging_ad.scan import FIELDS, ResultStore, ScanError, ScanProgress, ScanSettings, read_rows, scan
from tests.synthetic import paste_defect, texture

FAST = {"image_size": 128, "batch_size": 8, "progress": False, "holdout_fraction": 0.2}
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
N_KILL = 120  # files in the kill test: enough batches of 2 that the kill lands mid-scan
# a file name that must stay text in HTML and be URL-quoted in links
NASTY = 'we<b>rd & "q" #1.png'
BAD = {
    "bad/empty.png": "empty",
    "bad/truncated.jpg": "truncated",
    "bad/notes.png": "not_an_image",
    "bad/broken_dicom": "truncated",
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small batches are many tiny ops: with 2 OpenMP threads on a busy 2-core machine each op can wait
    ~10 ms at its barrier. One thread keeps these behaviour tests fast whatever else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("scan_model") / "textures.safetensors"
    create_detector("patchcore", **FAST).fit([texture(rng) for _ in range(30)]).save(path)
    return path


@pytest.fixture(scope="module")
def detector(model_path):
    """Loaded once and passed to scan(detector=...), as a long-running app would: saves a load per scan."""
    return load_detector(model_path, device="cpu")


def make_folder(root: Path, n_good: int = 6, n_defect: int = 4, seed: int = 1) -> Path:
    """Good textures, textures with pasted defects (one with a hostile name), a DICOM without suffix,
    four bad files, plus files discovery must ignore (README, hidden)."""
    rng = np.random.default_rng(seed)
    for sub in ("good", "defects", "nested/deeper", "bad"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        write_png(root / "good" / f"{i:03d}.png", texture(rng))
    for i in range(n_defect):
        name = NASTY if i == 0 else f"{i:03d}.png"
        write_png(root / "defects" / name, paste_defect(texture(rng), rng)[0])
    dicom = Path(get_testdata_file("CT_small.dcm"))
    shutil.copy(dicom, root / "nested" / "deeper" / "ct_no_suffix")
    (root / "bad" / "empty.png").write_bytes(b"")
    ok, jpeg = cv2.imencode(".jpg", texture(rng))
    (root / "bad" / "truncated.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    (root / "bad" / "notes.png").write_text("this is a text file, not a PNG\n")
    data = dicom.read_bytes()
    (root / "bad" / "broken_dicom").write_bytes(data[: len(data) // 2])
    (root / "README").write_text("not an image")
    (root / "good" / ".hidden.png").write_bytes(b"x")
    return root


def write_png(path: Path, image: np.ndarray) -> None:
    path.write_bytes(cv2.imencode(".png", image)[1].tobytes())  # cv2.imwrite rejects some names


def expected_paths(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if not p.is_dir() and p.name != "README" and not p.name.startswith(".")
    }


def rows_of(out: Path) -> list[dict]:
    return list(read_rows(out))


def csv_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_one_row_per_file(out: Path, root: Path) -> list[dict]:
    rows = rows_of(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "duplicate rows"
    assert set(paths) == expected_paths(root)
    # the CSV is rebuilt from the JSONL: same rows, same order
    assert [r["path"] for r in csv_rows(out)] == paths
    # every overlay a row names exists and decodes at the image's original height, with its colour bar
    # to the right of the image
    for row in rows:
        if row["heatmap"]:
            image = cv2.imread(str(out / row["heatmap"]))
            assert image is not None and image.shape[0] == row["height"], row
            assert image.shape[1] > row["width"] and image.shape[2] == 3, row
    return rows


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "input")


def test_cli_bad_files_get_rows_and_exit_zero(model_path, folder, tmp_path, capsys):
    os.mkfifo(folder / "bad" / "pipe.png")  # reading it would block forever
    out = tmp_path / "out"
    code = main(["scan", str(folder), "--model", str(model_path), "--out", str(out), "--no-progress"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "5 could not be read" in summary and "report.html" in summary

    rows = {r["path"]: r for r in assert_one_row_per_file(out, folder)}
    assert list(next(iter(rows.values()))) == list(FIELDS)
    for path, code_ in {**BAD, "bad/pipe.png": "unreadable"}.items():
        assert rows[path]["error_code"] == code_, rows[path]
        assert rows[path]["error"] and rows[path]["score"] is None
    assert rows["bad/pipe.png"]["error"] == "not a regular file"
    scored = [r for r in rows.values() if not r["error"]]
    assert len(scored) == 6 + 4 + 1
    ct = rows["nested/deeper/ct_no_suffix"]  # DICOM without a suffix, found and decoded
    assert (ct["width"], ct["height"]) == (128, 128) and ct["error"] is None
    for i in range(6):
        row = rows[f"good/{i:03d}.png"]
        assert (row["width"], row["height"]) == (112, 96)
    defects = [r for p, r in rows.items() if p.startswith("defects/")]
    good = [r for p, r in rows.items() if p.startswith("good/")]
    assert all(r["is_anomaly"] for r in defects), "pasted defects must be flagged"
    assert min(r["score"] for r in defects) > max(r["score"] for r in good)
    for r in scored:
        assert r["is_anomaly"] == (r["score"] > r["threshold"])
        # --heatmaps flagged (the default): flagged images, and those outside the domain for review
        assert (r["heatmap"] is not None) == (r["is_anomaly"] or bool(r["out_of_domain"]))
    assert rows[f"defects/{NASTY}"]["heatmap"] == f"heatmaps/defects/{NASTY[: -len('.png')]}_heatmap.png"

    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<b>" not in page and "we&lt;b&gt;rd &amp; &quot;q&quot; #1.png" in page
    assert 'src="heatmaps/defects/we%3Cb%3Erd%20%26%20%22q%22%20%231_heatmap.png"' in page  # quoted link
    assert "<svg" in page and 'class="threshold"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in page and "<link" not in page


def test_rerun_skips_done_files_and_follows_changes(model_path, detector, folder, tmp_path):
    out = tmp_path / "out"
    first = scan(folder, model_path, out, detector=detector)
    assert (first.n_files, first.n_scanned, first.n_skipped, first.n_errors) == (15, 15, 0, 4)
    before = rows_of(out)

    again = scan(folder, model_path, out, detector=detector)
    assert (again.n_scanned, again.n_skipped) == (0, 15)
    assert rows_of(out) == before  # nothing rewritten, nothing duplicated

    # a good image replaced by a defective one (new size and mtime): rescanned, flagged, overlay written
    rng = np.random.default_rng(7)
    target = folder / "good" / "000.png"
    assert not next(r for r in before if r["path"] == "good/000.png")["is_anomaly"]
    write_png(target, paste_defect(texture(rng), rng)[0])
    changed = scan(folder, model_path, out, detector=detector)
    assert (changed.n_scanned, changed.n_skipped) == (1, 14)
    rows = {r["path"]: r for r in assert_one_row_per_file(out, folder)}
    assert rows["good/000.png"]["is_anomaly"] and (out / rows["good/000.png"]["heatmap"]).is_file()

    # back to normal: its overlay of the old verdict goes; a deleted file loses its row
    write_png(target, texture(rng))
    (folder / "good" / "001.png").unlink()
    back = scan(folder, model_path, out, detector=detector)
    assert (back.n_scanned, back.n_removed) == (1, 1)
    rows = {r["path"]: r for r in assert_one_row_per_file(out, folder)}
    assert not rows["good/000.png"]["is_anomaly"]
    assert not (out / "heatmaps" / "good" / "000_heatmap.png").exists()


def test_torn_last_line_and_stale_csv_are_repaired(model_path, detector, folder, tmp_path):
    """What a kill in the middle of a batch write leaves: half a JSONL line, a CSV behind the JSONL."""
    out = tmp_path / "out"
    scan(folder, model_path, out, detector=detector)
    jsonl = out / "results.jsonl"
    lines = jsonl.read_bytes().splitlines(keepends=True)
    torn_path = json.loads(lines[-1])["path"]
    jsonl.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    csv_lines = (out / "results.csv").read_bytes().splitlines(keepends=True)
    (out / "results.csv").write_bytes(b"".join(csv_lines[:-3]) + csv_lines[-3][:10])

    summary = scan(folder, model_path, out, detector=detector)
    assert summary.n_scanned == 1 and summary.n_skipped == 14
    rows = assert_one_row_per_file(out, folder)
    assert torn_path in {r["path"] for r in rows}


def test_model_change_invalidates_earlier_rows(model_path, detector, folder, tmp_path, caplog):
    out = tmp_path / "out"
    scan(folder, model_path, out, detector=detector)
    changed = load_detector(model_path, device="cpu")
    changed.calibration_ = replace(
        changed.calibration_, image_threshold=changed.calibration_.image_threshold * 1.5
    )
    other = changed.save(tmp_path / "other.safetensors")
    with pytest.raises(ScanError, match="not loaded from"):  # a fingerprint must describe the model used
        scan(folder, model_path, out, detector=changed)

    with caplog.at_level("WARNING", logger="imaging_ad.scan"):
        summary = scan(folder, other, out, detector=changed)
    assert "the model changed" in caplog.text and "15 earlier result row(s)" in caplog.text
    assert summary.invalidated_rows == 15 and summary.warnings
    assert (summary.n_scanned, summary.n_skipped) == (15, 0)
    rows = assert_one_row_per_file(out, folder)
    assert {r["threshold"] for r in rows} == {changed.calibration_.image_threshold}
    moved = list((out / "invalidated").glob("*/results.jsonl"))
    assert len(moved) == 1 and len(moved[0].read_text().splitlines()) == 15

    # a different heatmap mode is a different scan too
    summary = scan(folder, other, out, heatmaps="none", detector=changed)
    assert summary.invalidated_rows == 15 and summary.n_overlays == 0
    assert not (out / "heatmaps").exists()


def test_sigkill_mid_scan_then_rerun(model_path, detector, tmp_path):
    """Kill -9 as soon as the first rows are durable; the re-run ends with exactly one row per file."""
    source = make_folder(tmp_path / "source", n_good=3, n_defect=3)
    root = tmp_path / "many"
    images = sorted(p for p in (source / "good").iterdir() if not p.name.startswith("."))
    images += sorted((source / "defects").iterdir())
    for i in range(N_KILL):  # hard links: many files, no copying
        dst = root / f"d{i // 50}" / f"{i:04d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(images[i % len(images)], dst)
    (root / "d0" / "zero.png").write_bytes(b"")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "imaging_ad.cli", "scan", str(root), "--model", str(model_path)]
    command += ["--out", str(out), "--batch-size", "2", "--heatmaps", "all", "--no-progress"]
    # one torch thread, as in this module (see one_torch_thread)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jsonl = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if jsonl.exists() and jsonl.stat().st_size > 0:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, stderr
    rows_at_kill = jsonl.read_bytes().count(b"\n")
    assert 0 < rows_at_kill < N_KILL + 1, "the kill must land mid-scan"

    summary = scan(root, model_path, out, batch_size=2, heatmaps="all", detector=detector)
    assert summary.n_skipped == rows_at_kill and summary.n_scanned + summary.n_skipped == N_KILL + 1
    rows = assert_one_row_per_file(out, root)
    assert len(rows) == N_KILL + 1
    assert sum(1 for r in rows if r["error"]) == 1
    assert all(r["heatmap"] for r in rows if not r["error"])  # --heatmaps all


def test_library_api_progress_and_clear_failures(model_path, detector, folder, tmp_path, capsys):
    import imaging_ad.scan.store  # noqa: F401  (binds the package to imaging_ad.scan)

    assert callable(imaging_ad.scan)
    seen: list[ScanProgress] = []
    summary = imaging_ad.scan(folder, model_path, tmp_path / "out", heatmaps="none", progress=seen.append)
    assert seen[0].done == 0 and seen[-1].done == seen[-1].total == 15
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].errors == 4 and seen[-1].flagged == summary.n_flagged
    assert summary.n_overlays == 0 and not (tmp_path / "out" / "heatmaps").exists()
    text = str(summary)
    assert "Scanned 15" in text and "4 could not be read" in text and str(summary.report) in text

    with pytest.raises(ScanError, match="does not exist"):
        scan(tmp_path / "nope", model_path, tmp_path / "o2")
    with pytest.raises(ScanError, match="must not contain"):
        scan(folder / "good", model_path, folder)
    settings = ScanSettings("fingerprint", str(folder), 1.0, "none")
    with ResultStore(tmp_path / "busy", settings).open(), pytest.raises(RuntimeError, match="another scan"):
        scan(folder, model_path, tmp_path / "busy", detector=detector)
    missing_model = tmp_path / "missing.safetensors"
    assert main(["scan", str(folder), "--model", str(missing_model), "--out", str(tmp_path / "o3")]) == 1
    assert "model file does not exist" in capsys.readouterr().err
    missing_input = tmp_path / "nope"
    assert main(["scan", str(missing_input), "--model", str(model_path), "--out", str(tmp_path / "o4")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.browser
def test_report_renders_in_headless_chromium(model_path, detector, folder, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "out"
    summary = scan(folder, model_path, out, detector=detector)
    rows = rows_of(out)
    flagged = [r for r in rows if r["is_anomaly"] and not r["out_of_domain"]]
    outside = [r for r in rows if r["out_of_domain"]]
    assert summary.n_flagged == len(flagged) and summary.n_out_of_domain == len(outside)
    assert flagged or outside

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((out / "report.html").as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            ".gallery img", "els => els.map(e => [e.getAttribute('alt'), e.complete, e.naturalWidth])"
        )
        captions = page.eval_on_selector_all(".gallery .path", "els => els.map(e => e.textContent)")
        injected = page.eval_on_selector_all("b", "els => els.length")
        svg_bars = page.eval_on_selector_all("svg.hist rect", "els => els.length")
        browser.close()
    assert len(images) == len(flagged) + len(outside)
    assert all(complete and width > 0 for _, complete, width in images), images
    # flagged by highest score first, then the images outside the domain farthest first; names as text
    assert captions == [r["path"] for r in sorted(flagged, key=lambda r: -r["score"])] + [
        r["path"] for r in sorted(outside, key=lambda r: -r["domain_score"])
    ]
    assert f"defects/{NASTY}" in captions and injected == 0
    assert svg_bars > 0


def test_overlay_names_have_one_suffix_and_never_collide():
    from imaging_ad.scan.overlay_names import overlay_names

    paths = ["good/000.png", "a.png", "a.jpg", "ct/1.2.840.5", "x", "x.png", "y.PNG", "y.png", "deep/z.tif"]
    names = overlay_names(paths)
    assert names["good/000.png"] == "good/000_heatmap.png" and names["a.png"] == "a_heatmap.png"
    assert names["a.jpg"] == "a.jpg_heatmap.png" and names["ct/1.2.840.5"] == "ct/1.2.840.5_heatmap.png"
    assert names["deep/z.tif"] == "deep/z.tif_heatmap.png"
    # "x" and "x.png" (or "y.PNG" and "y.png") would both be "x_heatmap.png": they get their full names
    assert names["x"] == "x_overlay.png" and names["x.png"] == "x.png_overlay.png"
    assert len(set(names.values())) == len(paths)
    assert all(not n.endswith(".png.png") for n in names.values())
