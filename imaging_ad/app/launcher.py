"""Start the demo: ``imaging-ad demo`` (or ``python demo/launch.py``) ends up in :func:`launch`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from imaging_ad.app.config import DATA_ENV, DemoConfig, default_data_dir

log = logging.getLogger("imaging_ad.demo")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``imaging-ad demo`` and ``demo/launch.py``)."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument(
        "--port", type=int, default=7860, help="port (default 7860; 0: the first free one from 7860)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"where verdicts, models and results go (default ${DATA_ENV} or {default_data_dir()})",
    )
    parser.add_argument(
        "--allowed-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a server folder the Batch and Learn tabs may read (repeatable; default: none, uploads only)",
    )
    parser.add_argument(
        "--max-upload-mb", type=int, default=200, help="largest accepted upload (default 200)"
    )
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=25.0,
        help="largest image accepted, in megapixels, checked before decoding (default 25; bounds memory)",
    )
    parser.add_argument("--device", default="auto", help="torch device for the models (default auto)")
    parser.add_argument(
        "--runtime",
        choices=("auto", "torch", "onnxruntime"),
        default="auto",
        help="what runs the models (default auto: whichever of onnxruntime and torch scored the model faster "
        "on this CPU, timed once at first use; its graph cached next to the model file)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"CPU threads for the models (default: half the cores, here {default_threads()})",
    )
    parser.add_argument(
        "--weights-dir", default=None, help="shipped models folder (default: the repository's weights/)"
    )
    parser.add_argument("--open", action="store_true", help="open a browser tab")


def default_threads() -> int:
    """Half the cores, at least one. torch's OpenMP threads wait for each other at every operator: with
    one more thread than there are free cores, one descheduled thread stalls the rest. On this
    project's shared 2-core machine, with one core busy elsewhere, 2 threads took ~950 ms for one
    224 px image and 1 thread 51 ms. An interactive demo wants the steady figure."""
    return max(1, (os.cpu_count() or 2) // 2)


def prepare_environment(config: DemoConfig) -> None:
    """Point Gradio's upload cache into the data folder (before gradio is imported) and keep it offline."""
    config.make_dirs()
    os.environ["GRADIO_TEMP_DIR"] = str(config.cache_dir)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "gradio" in sys.modules:
        log.warning(
            "gradio was imported before the demo set GRADIO_TEMP_DIR; uploads may be cached elsewhere"
        )


def launch(
    config: DemoConfig,
    host: str = "127.0.0.1",
    port: int = 7860,
    open_browser: bool = False,
    block: bool = True,
    threads: int | None = None,
):
    """Build and serve the app. Returns the Gradio app when ``block`` is False (tests)."""
    import torch

    torch.set_num_threads(threads or default_threads())
    if host not in LOCAL_HOSTS:
        print(
            f"warning: binding {host}: anyone who can reach this machine can upload images, read the review "
            "queue and record verdicts; there is no login. Use 127.0.0.1 unless you mean it.",
            file=sys.stderr,
        )
    prepare_environment(config)
    from imaging_ad.app.service import DemoService
    from imaging_ad.app.ui import KEYS_HEAD, build_app

    service = DemoService(config)
    try:  # load and warm up the default model now, so the first click is fast
        service.detector(service.resolve_model())
    except ValueError as exc:
        print(f"warning: {exc}", file=sys.stderr)
    app = build_app(service)
    # one model call at a time per event: the CPU is the bottleneck, interleaving only slows both
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port or None,
        inbrowser=open_browser,
        max_file_size=f"{config.max_upload_mb}mb",
        # what the browser may fetch by path: the media folder (overlays, uploads) and the examples only;
        # the database and model files never
        allowed_paths=[str(config.media_dir), str(config.examples_dir)],
        blocked_paths=[str(config.db_path), str(config.models_dir)],
        head=KEYS_HEAD,
        ssr_mode=False,
        # Gradio's run history would keep inputs and outputs (patient images) in the browser and offer
        # uploading them to a Hugging Face bucket: off
        run_history=False,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=False,
    )
    return app


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    kwargs = {
        "allowed_roots": [Path(r) for r in args.allowed_root],
        "max_upload_mb": args.max_upload_mb,
        "max_pixels": int(getattr(args, "max_megapixels", 25.0) * 1_000_000),
        "device": args.device,
        "runtime": getattr(args, "runtime", "auto"),
    }
    if args.data_dir:
        kwargs["data_dir"] = Path(args.data_dir)
    if args.weights_dir:
        kwargs["weights_dir"] = Path(args.weights_dir)
    return DemoConfig(**kwargs)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print(f"imaging_ad demo: data folder {config.data_dir}", file=sys.stderr)
    launch(config, host=args.host, port=args.port, open_browser=args.open, threads=args.threads)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo/launch.py", description="The imaging_ad Gradio demo.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
