"""The demo in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright against
``demo/launch.py`` in a subprocess. Upload an example X-ray and get a score and a heatmap; record a verdict
with the keyboard and find it in SQLite; restart the app and find it again. Screenshots of every tab go
to ``test-artifacts/demo/``. Skips when Chromium or Playwright is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.browser, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "demo"
EXAMPLES = REPO / "demo" / "examples"
PNEUMONIA = EXAMPLES / "pneumonia_person11_virus_38.jpeg"
WARM_UP = EXAMPLES / "normal_IM-0011-0001.jpeg"

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed (the test extra has it)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_demo(data_dir: Path, log_path: Path, port: int) -> Iterator[str]:
    """``demo/launch.py`` on ``port``; yields its URL once it answers, stops it afterwards."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
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
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the demo exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                    )
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the demo did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _verdicts(data_dir: Path) -> list[tuple]:
    with sqlite3.connect(data_dir / "review.sqlite3") as db:
        return db.execute(
            "SELECT i.display_name, v.verdict, v.reviewer, v.note FROM verdicts v JOIN items i ON i.id = v.item_id"
        ).fetchall()


def _open_tab(page, name: str, ready: str) -> None:
    page.click(f"#tab-{name}-button")
    page.wait_for_selector(ready, state="visible", timeout=30_000)


def test_demo_in_a_browser(tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    data_dir = tmp_path / "data"
    log_path = ARTIFACTS / "server.log"
    log_path.write_bytes(b"")
    port = _free_port()  # the same after the restart: the browser keeps per-origin state (reviewer name)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            with running_demo(data_dir, log_path, port) as url:
                # the server sends no file outside the media folder and the examples, whatever is asked
                for path in (data_dir / "review.sqlite3", REPO / "README.md", Path("/etc/passwd")):
                    assert _http_status(f"{url}gradio_api/file={path}") in (403, 404), path
                assert _http_status(f"{url}gradio_api/file={EXAMPLES / PNEUMONIA.name}") == 200

                page.goto(url)
                page.wait_for_selector("#inspect-upload input[type=file]", state="attached", timeout=30_000)

                # Inspect: upload -> score and heatmap. A first upload warms the page and the server
                # (first event, connection); the second is the one timed.
                timings = []
                for example in (WARM_UP, PNEUMONIA):
                    clear = page.locator("#inspect-upload button[aria-label='Clear']")
                    if clear.count():
                        clear.first.click()
                        page.wait_for_function("!document.querySelector('#inspect-score')", timeout=10_000)
                    start = time.perf_counter()
                    page.set_input_files("#inspect-upload input[type=file]", str(example))
                    page.wait_for_function(
                        f"document.querySelector('#inspect-result').innerText.includes('{example.name}')",
                        timeout=30_000,
                    )
                    page.wait_for_function(
                        "(() => { const i = document.querySelector('#inspect-heatmap img');"
                        " return i && i.complete && i.naturalWidth > 0; })()",
                        timeout=30_000,
                    )
                    served = re.search(r"\((\d+) ms to read and score\)", page.inner_text("#inspect-result"))
                    timings.append((time.perf_counter() - start, int(served.group(1))))
                print(
                    "inspect upload-to-result in the browser: "
                    + ", ".join(f"{b * 1000:.0f} ms (server read + score {s} ms)" for b, s in timings)
                    + " (first, then warm)"
                )
                score = float(page.inner_text("#inspect-score"))
                assert score > 0
                assert "Verdict: ANOMALOUS" in page.inner_text("#inspect-result")
                for selector in ("#inspect-heatmap img", "#inspect-overlay img"):
                    size = page.eval_on_selector(selector, "img => [img.naturalWidth, img.naturalHeight]")
                    # the picture at the image's size, the colour bar beside it
                    assert size[1] == 224 and size[0] > 224, (selector, size)
                # the threshold slider changes the verdict without running the model again
                slider_box = page.locator("#inspect-threshold input[type=number]")
                slider_box.fill("0.99")
                slider_box.press("Enter")
                page.wait_for_function(
                    "document.querySelector('#inspect-result').innerText.includes('Verdict: NORMAL')",
                    timeout=10_000,
                )
                assert float(page.inner_text("#inspect-score")) == score
                page.screenshot(path=str(ARTIFACTS / "inspect.png"), full_page=True)

                # Review: name, then the 'a' key records "anomalous"
                _open_tab(page, "review", "#review-anomalous")
                page.wait_for_selector("#review-item-id", timeout=30_000)
                assert "0 of 2 reviewed" in page.inner_text("#review-progress")
                # the highest score opens first: the pneumonia example
                assert PNEUMONIA.name in page.inner_text("#review-item")
                page.locator("#review-reviewer textarea, #review-reviewer input").first.fill("e2e reviewer")
                page.locator("#review-note textarea, #review-note input").first.fill("right lower zone")
                page.click("#review-progress")  # leave the text field: shortcuts are off while typing
                page.keyboard.press("a")
                page.wait_for_function(
                    "document.querySelector('#review-progress').innerText.includes('1 of 2 reviewed')",
                    timeout=20_000,
                )
                assert _verdicts(data_dir) == [
                    (PNEUMONIA.name, "anomalous", "e2e reviewer", "right lower zone")
                ]
                page.screenshot(path=str(ARTIFACTS / "review.png"), full_page=True)

                # Batch: two uploads -> gallery sorted by score, CSV
                _open_tab(page, "batch", "#batch-run")
                page.set_input_files(
                    "#batch-upload input[type=file]",
                    [
                        str(EXAMPLES / "normal_IM-0081-0001.jpeg"),
                        str(EXAMPLES / "pneumonia_person111_bacteria_534.jpeg"),
                    ],
                )
                page.click("#batch-run")
                page.wait_for_function(
                    "document.querySelectorAll('#batch-gallery img').length >= 2", timeout=60_000
                )
                assert re.search(r"2\s+of 2 image\(s\) scored", page.inner_text("#batch-summary"))
                page.screenshot(path=str(ARTIFACTS / "batch.png"), full_page=True)

                _open_tab(page, "learn", "#tab-learn")
                page.screenshot(path=str(ARTIFACTS / "learn.png"), full_page=True)
                _open_tab(page, "improve", "#improve-summary")
                page.wait_for_function(
                    "document.querySelector('#improve-summary').innerText.includes('reviewed normal')",
                    timeout=30_000,
                )
                assert "0 image(s) reviewed normal and 1 anomalous" in page.inner_text("#improve-summary")
                page.screenshot(path=str(ARTIFACTS / "improve.png"), full_page=True)

            # restart: the verdict is still in the database and in the Review tab
            assert _verdicts(data_dir) == [(PNEUMONIA.name, "anomalous", "e2e reviewer", "right lower zone")]
            with running_demo(data_dir, log_path, port) as url:
                page.goto(url)
                _open_tab(page, "review", "#review-anomalous")
                page.wait_for_selector("#review-item-id", timeout=30_000)
                assert "1 of 4 reviewed" in page.inner_text("#review-progress")
                page.locator("#review-queue").get_by_text(PNEUMONIA.name).first.click()  # its queue row
                page.wait_for_function(
                    "document.querySelector('#review-item').innerText.includes('latest verdict anomalous by e2e reviewer')",
                    timeout=20_000,
                )
                # the reviewer's name was kept in the browser
                assert page.locator(
                    "#review-reviewer textarea, #review-reviewer input"
                ).first.input_value() == ("e2e reviewer")
                page.screenshot(path=str(ARTIFACTS / "review-after-restart.png"), full_page=True)
        finally:
            browser.close()
