"""Where the demo keeps its data, what it may read, and its limits.

The data folder (``--data-dir``, else ``$IMAGING_AD_DATA``, else the platform's user data folder) is the
only place the demo writes to. Its layout::

    review.sqlite3      review verdicts (see review_store)
    models/             models built in the Learn tab and feedback versions
    media/              everything the browser may be sent: uploads, overlays, batch inputs and results
    cache/              Gradio's own upload cache (GRADIO_TEMP_DIR)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from imaging_ad.app.safety import ZipLimits

DATA_ENV = "IMAGING_AD_DATA"
APP_NAME = "imaging_ad"
REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_DIR = REPO_ROOT / "weights"
EXAMPLES_DIR = REPO_ROOT / "demo" / "examples"


def default_data_dir() -> Path:
    """``$IMAGING_AD_DATA``, else the per-user data folder of the platform (as platformdirs would say)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / APP_NAME


@dataclass
class DemoConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    weights_dir: Path = WEIGHTS_DIR
    examples_dir: Path = EXAMPLES_DIR
    #: server folders the Batch and Learn tabs may read (none: uploads only)
    allowed_roots: list[Path] = field(default_factory=list)
    max_upload_mb: int = 200
    zip_limits: ZipLimits = field(default_factory=ZipLimits)
    device: str = "auto"
    #: what runs the models: "auto" (the faster of the two on this CPU, measured), "torch", "onnxruntime"
    runtime: str = "auto"
    #: most files one batch or fit takes (uploads, zip contents or a folder)
    max_batch_files: int = 5000
    #: most pixels one image may have, checked in its header before decoding. This bounds the memory a
    #: request takes: a small PNG can declare 9999 x 9999 pixels (300 MB decoded, several GB once scored
    #: and rendered). 25 megapixels holds any radiograph (a 43 x 43 cm detector at 100 um is 18.5 MP).
    max_pixels: int = 25_000_000

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.weights_dir = Path(self.weights_dir).expanduser().resolve()
        self.examples_dir = Path(self.examples_dir).expanduser().resolve()
        self.allowed_roots = [Path(r).expanduser().resolve() for r in self.allowed_roots]
        for root in self.allowed_roots:
            if not root.is_dir():
                raise ValueError(f"allowed root {root} is not a folder")

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def db_path(self) -> Path:
        return self.data_dir / "review.sqlite3"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def make_dirs(self) -> None:
        for folder in (self.data_dir, self.models_dir, self.media_dir, self.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)
