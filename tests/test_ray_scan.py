"""The Ray engine of the scan: same rows as a local scan, resume, and exactly one row per file when the
driver or a worker is killed mid-scan. One local Ray (2 CPUs, no dashboard) for the whole module."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

ray = pytest.importorskip("ray")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from imaging_ad.detectors import create_detector, load_detector  # noqa: E402
from imaging_ad.scan import scan  # noqa: E402
from tests.synthetic import texture  # noqa: E402
from tests.test_scan import BAD, FAST, ROOT, csv_rows, expected_paths, make_folder, rows_of  # noqa: E402

N_FILES = 120  # files of the kill tests: many blocks of 8 (batch size 2), so a kill lands mid-scan


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As in tests/test_scan.py: the local scan with one torch thread, like each 1-CPU Ray worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("ray_model") / "textures.safetensors"
    create_detector("patchcore", **FAST).fit([texture(rng) for _ in range(30)]).save(path)
    return path


@pytest.fixture(scope="module")
def detector(model_path):
    return load_detector(model_path, device="cpu")


def many_files(tmp_path: Path) -> Path:
    """N_FILES hard links to a few images, and one empty file (an error row)."""
    source = make_folder(tmp_path / "source", n_good=3, n_defect=3)
    images = sorted(p for p in (source / "good").iterdir() if not p.name.startswith("."))
    images += sorted((source / "defects").iterdir())
    root = tmp_path / "many"
    for i in range(N_FILES):
        dst = root / f"d{i // 50}" / f"{i:04d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(images[i % len(images)], dst)
    (root / "d0" / "zero.png").write_bytes(b"")
    return root


def assert_one_row_per_file(out: Path, root: Path) -> list[dict]:
    """Exactly one row per file, the CSV the JSONL's copy, and every named overlay on disk: the
    picture at the image's height, its colour bar to the right."""
    rows = rows_of(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "duplicate rows"
    assert set(paths) == expected_paths(root)
    assert [r["path"] for r in csv_rows(out)] == paths
    for row in rows:
        if row["heatmap"]:
            image = cv2.imread(str(out / row["heatmap"]))
            assert image is not None and image.shape[0] == row["height"] and image.shape[1] > row["width"]
    return rows


def worker_pids() -> list[int]:
    """Processes of this machine's scan actors (Ray titles them ``ray::ScanWorker...``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::ScanWorker"):
                pids.append(int(entry.name))
    return pids


def test_ray_scan_gives_the_local_rows_and_overlays(model_path, detector, tmp_path):
    folder = make_folder(tmp_path / "input")
    os.mkfifo(folder / "bad" / "pipe.png")  # never read: an error row made by the driver
    local = scan(folder, model_path, tmp_path / "local", heatmaps="all", detector=detector, batch_size=4)
    remote = scan(folder, model_path, tmp_path / "ray", heatmaps="all", engine="ray", workers=2, batch_size=4)
    assert remote.n_rows == local.n_rows == len(local_rows := rows_of(tmp_path / "local"))
    assert (remote.n_errors, remote.n_flagged, remote.n_overlays) == (
        local.n_errors,
        local.n_flagged,
        local.n_overlays,
    )
    ray_rows = {r["path"]: r for r in assert_one_row_per_file(tmp_path / "ray", folder)}
    assert [r["path"] for r in rows_of(tmp_path / "ray")] == [r["path"] for r in local_rows]  # sorted
    for row in local_rows:
        other = ray_rows[row["path"]]
        for key, value in row.items():
            if key in ("score", "normalized_score", "domain_score") and value is not None:
                assert math.isclose(other[key], value, rel_tol=1e-5), (key, row, other)
            else:
                assert other[key] == value, (key, row, other)
        if row["heatmap"]:  # drawn by a worker, written by the driver: the same picture
            assert (tmp_path / "ray" / row["heatmap"]).read_bytes() == (
                tmp_path / "local" / row["heatmap"]
            ).read_bytes()
    for path, code in {**BAD, "bad/pipe.png": "unreadable"}.items():
        assert ray_rows[path]["error_code"] == code and ray_rows[path]["error"]
    assert (tmp_path / "ray" / "report.html").read_text(encoding="utf-8").count("<tr") == (
        (tmp_path / "local" / "report.html").read_text(encoding="utf-8").count("<tr")
    )


def test_ray_rerun_skips_done_files(model_path, tmp_path):
    folder = make_folder(tmp_path / "input", n_good=3, n_defect=2)
    out = tmp_path / "out"
    first = scan(folder, model_path, out, engine="ray", workers=2, batch_size=2)
    assert first.n_skipped == 0 and first.n_scanned == first.n_files
    again = scan(folder, model_path, out, engine="ray", workers=2, batch_size=2)
    assert again.n_skipped == first.n_files and again.n_scanned == 0
    (folder / "good" / "000.png").touch()  # changed: scored again
    (folder / "good" / "new.png").write_bytes((folder / "good" / "001.png").read_bytes())
    third = scan(folder, model_path, out, engine="ray", workers=2, batch_size=2)
    assert (third.n_scanned, third.n_skipped) == (2, first.n_files - 1)
    assert len(assert_one_row_per_file(out, folder)) == first.n_files + 1


def test_killed_worker_still_gives_one_row_per_file(model_path, tmp_path):
    root = many_files(tmp_path)
    killed: list[int] = []

    def kill_one_worker(progress) -> None:
        if progress.done > 0 and not killed:
            pids = worker_pids()
            assert len(pids) == 2, pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(progress.done)

    out = tmp_path / "out"
    summary = scan(root, model_path, out, engine="ray", workers=2, batch_size=2, progress=kill_one_worker)
    assert killed and killed[0] < N_FILES + 1, "the kill must land mid-scan"
    assert summary.n_scanned == N_FILES + 1 and summary.n_rows == N_FILES + 1
    rows = assert_one_row_per_file(out, root)
    assert sum(1 for r in rows if r["error"]) == 1
    lines = (out / "results.jsonl").read_bytes().count(b"\n")
    assert lines == N_FILES + 1


@pytest.mark.slow  # a CLI process of its own (imports torch, joins the cluster)
def test_killed_driver_then_rerun(model_path, tmp_path, ray_cluster):
    """kill -9 of a CLI scan on this cluster (its actors die with it); the re-run finishes the rest."""
    root = many_files(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "imaging_ad.cli", "scan", str(root), "--model", str(model_path)]
    command += ["--out", str(out), "--batch-size", "2", "--no-progress", "--engine", "ray"]
    command += ["--address", ray_cluster, "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jsonl = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if jsonl.exists() and jsonl.stat().st_size > 0:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, stderr
    rows_at_kill = jsonl.read_bytes().count(b"\n")
    assert 0 < rows_at_kill < N_FILES + 1, "the kill must land mid-scan"

    summary = scan(root, model_path, out, engine="ray", workers=2, batch_size=2)
    assert summary.n_skipped == rows_at_kill and summary.n_scanned + summary.n_skipped == N_FILES + 1
    assert len(assert_one_row_per_file(out, root)) == N_FILES + 1


def test_local_scan_does_not_import_ray(model_path, tmp_path):
    folder = make_folder(tmp_path / "input", n_good=2, n_defect=1)
    code = (
        "import sys; from imaging_ad.scan import scan; "
        f"scan({str(folder)!r}, {str(model_path)!r}, {str(tmp_path / 'out')!r}, batch_size=2); "
        "assert 'ray' not in sys.modules, 'the local scan imported ray'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def test_cli_engine_ray_and_clear_refusals(model_path, tmp_path, capsys):
    from imaging_ad.cli import main
    from imaging_ad.scan import ScanError

    folder = make_folder(tmp_path / "input", n_good=2, n_defect=1)
    out = tmp_path / "out"
    code = main(
        ["scan", str(folder), "--model", str(model_path), "--out", str(out), "--no-progress"]
        + ["--engine", "ray", "--workers", "1"]
    )
    assert code == 0 and "report.html" in capsys.readouterr().out
    assert len(assert_one_row_per_file(out, folder)) == len(expected_paths(folder))
    with pytest.raises(ScanError, match="engine='ray'"):
        scan(folder, model_path, tmp_path / "o2", address="auto")
    with pytest.raises(ScanError, match="local engine only"):
        scan(folder, model_path, tmp_path / "o3", engine="ray", dicom_out=tmp_path / "dicom")
    with pytest.raises(ScanError, match="engine must be one of"):
        scan(folder, model_path, tmp_path / "o4", engine="spark")
    with pytest.raises(ScanError, match="workers must be at least 1"):
        scan(folder, model_path, tmp_path / "o5", engine="ray", workers=0)


def test_more_workers_than_cpus_is_refused_not_a_hang(model_path, tmp_path):
    from imaging_ad.scan import ScanError

    folder = make_folder(tmp_path / "input", n_good=2, n_defect=1)
    with pytest.raises(ScanError, match="the cluster has 2"):
        scan(folder, model_path, tmp_path / "out", engine="ray", workers=3)
    with pytest.raises(ScanError, match="GPU"):
        scan(folder, model_path, tmp_path / "out", engine="ray", workers=1, gpus_per_worker=1)
