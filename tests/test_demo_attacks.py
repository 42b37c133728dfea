"""The demo attacked through its HTTP API (issue 18): ``demo/launch.py --allowed-root ALLOWED`` in a
subprocess, driven with gradio_client as a browser would. No file outside the allowed root is scored or
served whatever links the root holds; a zip of eight 9999 x 9999 PNGs (2.3 MB) leaves the server under
2.5 GB resident and answering; a non-finite image gives a message, and a batch holding one still scores
the rest."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile_files import float_tiff, huge_png

gradio_client = pytest.importorskip("gradio_client")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "demo" / "examples").glob("*.jpeg"))
RSS_LIMIT_MB = 2.5 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ALLOWED holds one image of its own and links out: a folder link, a file link, a link to /etc,
    a folder link loop. ELSEWHERE holds the secrets."""
    base = tmp_path_factory.mktemp("attack")
    allowed, elsewhere = base / "allowed", base / "elsewhere"
    (allowed / "imgs").mkdir(parents=True)
    (elsewhere / "deeper").mkdir(parents=True)
    shutil.copy(EXAMPLES[0], allowed / "imgs" / "good.jpeg")
    shutil.copy(EXAMPLES[1], elsewhere / "secret.jpeg")
    shutil.copy(EXAMPLES[2], elsewhere / "deeper" / "more.jpeg")
    os.symlink(elsewhere, allowed / "secretlink")
    os.symlink(elsewhere / "secret.jpeg", allowed / "imgs" / "leak.jpeg")
    os.symlink("/etc", allowed / "etclink")
    os.symlink(allowed, allowed / "imgs" / "loop")
    return {"base": base, "allowed": allowed, "elsewhere": elsewhere}


@pytest.fixture(scope="module")
def server(tree) -> Iterator[dict]:
    data_dir = tree["base"] / "data"
    log_path = tree["base"] / "server.log"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGING_AD_TRUST")}
    env |= {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "demo" / "launch.py"),
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
                "--device",
                "cpu",
            ]
            + ["--allowed-root", str(tree["allowed"]), "--threads", "1"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + 180
            while http_status_or_none(url) != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the demo did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            client = gradio_client.Client(url, verbose=False)
            yield {"url": url, "pid": process.pid, "client": client, "data_dir": data_dir, "log": log_path}
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def http_status_or_none(url: str) -> int | None:
    try:
        return http_status(url)
    except OSError:
        return None


def batch(server: dict, files: list[Path], folder: str = "") -> tuple[str, list, str]:
    uploads = [gradio_client.handle_file(str(f)) for f in files]
    return server["client"].predict(uploads, folder, None, api_name="/do_batch")


def test_links_in_an_allowed_root_lead_nowhere(server, tree) -> None:
    summary, gallery, _ = batch(server, [], str(tree["allowed"]))
    assert "**1** of 1 image(s) scored" in summary, summary
    captions = [item["caption"] for item in gallery]
    assert len(captions) == 1 and captions[0].endswith("imgs/good.jpeg")
    media = server["data_dir"] / "media"
    overlays = sorted(p.name for p in media.rglob("*.png"))
    assert overlays == ["good.jpeg_heatmap.png"], overlays
    report = next(media.rglob("report.html")).read_text()
    assert "secret" not in report and "leak" not in report and "passwd" not in report
    # nothing outside is served either, by its own path or through the link
    for path in (
        tree["elsewhere"] / "secret.jpeg",
        tree["allowed"] / "imgs" / "leak.jpeg",
        Path("/etc/passwd"),
    ):
        assert http_status(server["url"] + "gradio_api/file=" + str(path)) == 403, path
    overlay = next(media.rglob("good.jpeg_heatmap.png"))
    assert http_status(server["url"] + "gradio_api/file=" + str(overlay)) == 200  # the check can pass
    # a link typed as the folder itself is refused before anything is read
    with pytest.raises(Exception, match="outside the allowed folders"):
        batch(server, [], str(tree["allowed"] / "secretlink"))


def test_eight_huge_pngs_keep_the_server_small_and_answering(server, tmp_path) -> None:
    png = huge_png(tmp_path / "big.png", 9999, 9999, rgb=True)
    archive = tmp_path / "eight.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for i in range(8):
            zf.write(png, f"big_{i}.png")
    assert archive.stat().st_size < 3_000_000
    pid = server["pid"]
    peak, done = rss_mb(pid), threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary, gallery, _ = batch(server, [archive])
    finally:
        done.set()
        sampler.join()
    assert peak < RSS_LIMIT_MB, f"peak resident memory {peak:.0f} MB"
    assert "**0** of 8 image(s) scored" in summary and "8 unreadable" in summary
    assert "9999x9999 pixels exceeds the limit of 25,000,000" in summary
    assert gallery == []
    # still answering: a page and a real inspection
    assert http_status(server["url"]) == 200
    result = server["client"].predict(
        gradio_client.handle_file(str(EXAMPLES[3])), None, "", 0.5, 0.45, api_name="/do_inspect"
    )
    assert "Verdict" in result[0]


def test_non_finite_image_gives_a_message_and_a_batch_still_runs(server, tmp_path) -> None:
    bad = float_tiff(tmp_path / "float_naninf.tif")
    with pytest.raises(Exception, match="NaN or infinite"):
        server["client"].predict(
            gradio_client.handle_file(str(bad)), None, "", 0.5, 0.45, api_name="/do_inspect"
        )
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(bad, "float_naninf.tif")
        zf.write(EXAMPLES[4], "good.jpeg")
    summary, gallery, _ = batch(server, [archive])
    assert "**1** of 2 image(s) scored" in summary and "1 unreadable" in summary
    assert "NaN or infinite" in summary and len(gallery) == 1


def test_the_page_says_what_the_model_check_means(server) -> None:
    with urllib.request.urlopen(server["url"] + "config", timeout=30) as response:
        config = response.read().decode()
    assert "authenticity NOT checked" in config
