"""Run a fitted detector's graph in ONNX Runtime behind the detector's own API (``--runtime``).

PyTorch eager leaves most of a CPU unused on this workload (batch norm and tf-style padding as separate
passes, no layout blocking); ONNX Runtime's optimiser folds and fuses them. The graph is the export
path's (:func:`~imaging_ad.export.build_graph`: backbone + the detector's head + heatmap smoothing +
domain guard), written once by :func:`~imaging_ad.export.export_model` (which checks it against the
detector) and cached next to the model file as ``MODEL.safetensors.ort/<fingerprint>.onnx`` (or in the
user cache when that folder is read-only). The fingerprint is the model file's SHA-256 with the versions
that shape the graph, so a changed model file or library builds a new graph and never reuses a stale one.

The result, a :class:`CompiledDetector`, is the detector with ``score_batch`` run by ONNX Runtime: the
same inference stream, preprocessing, thresholds, domain guard and heatmaps at input resolution, the
same :class:`~imaging_ad.result.AnomalyResult` objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imaging_ad.detectors import Detector, load_detector
from imaging_ad.export.errors import ExportError
from imaging_ad.export.onnx import DEFAULT_OPSET
from imaging_ad.io.checksum import file_sha256
from imaging_ad.result import AnomalyResult
from imaging_ad.trust import TrustPolicy

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
PRECISIONS = ("fp32", "int8")
#: bump when the way the cached graph is built changes (static padding: 1; exact distances from the
#: difference to the nearest row: 2)
GRAPH_RECIPE = 2
CACHE_ENV = "IMAGING_AD_CACHE"
CACHE_SUFFIX = ".ort"


@dataclass(frozen=True)
class RuntimeChoice:
    """Which runtime scores, and why (one line for logs and the CLI header)."""

    runtime: str  # "torch" or "onnxruntime"
    note: str

    def __str__(self) -> str:
        return f"runtime: {self.runtime} ({self.note})"


def onnxruntime_available() -> bool:
    """onnxruntime and onnx (the export needs it) are installed; found without importing them (a cold
    start with a cached graph never needs onnx)."""
    from importlib.util import find_spec

    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (macOS, Windows)
        return os.cpu_count() or 1


class CompiledDetector:
    """A fitted detector whose graph runs in ONNX Runtime; everything else is the detector's own.

    ``score_batch`` runs the cached ONNX graph; ``predict`` is :meth:`Detector.predict` (the one
    inference stream) over it; any other attribute (``calibration_``, ``preprocessor_``, ``name``,
    ``batch_size``, ...) is the wrapped detector's. Re-fitting or re-calibrating should go through the
    detector itself (``.detector``) and a new :func:`with_runtime`.
    """

    runtime = "onnxruntime"

    def __init__(
        self,
        detector: Detector,
        exported: Any,
        onnx_path: Path,
        choice: RuntimeChoice,
        features_only: bool = False,
    ) -> None:
        self.detector = detector
        # an ExportedModel (sidecar-checked file + OnnxBackend), or, with ``features_only``, the backbone's
        # OnnxBackend whose feature maps the detector's own head scores
        self.exported = exported
        self.features_only = features_only
        self.onnx_path = onnx_path
        self.runtime_choice = choice

    def score_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Preprocessed ``(B, 3, S, S)`` -> (scores, smoothed heatmaps at model-input size, domain distances
        or None): :meth:`Detector.score_batch`'s contract."""
        if not isinstance(batch, np.ndarray):  # a torch tensor from a caller of the detector's API
            batch = batch.detach().cpu().numpy()
        if self.features_only:
            import torch

            device = self.detector.device_
            features = [torch.from_numpy(f).to(device) for f in self.exported(np.asarray(batch, np.float32))]
            return self.detector.score_features(features)
        scores, heatmaps, distances = self.exported.score_batch(batch)
        if self.detector.domain_guard_ is None:
            distances = None
        return scores, heatmaps, distances

    def predict(self, images: Sequence[Any] | Any) -> list[AnomalyResult]:
        return Detector.predict(self, images)  # type: ignore[arg-type]  (the stream needs only the duck)

    def __getattr__(self, name: str) -> Any:
        if name == "detector":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.detector, name)

    def __repr__(self) -> str:
        return f"CompiledDetector({self.detector!r}, {self.onnx_path})"


def fingerprint(model_sha256: str) -> str:
    """Cache key of the graph built from a model file: its SHA-256 and what shapes the graph."""
    from importlib.metadata import version  # no imports of onnx and onnxruntime just for their versions

    import imaging_ad

    parts = {
        "model_sha256": model_sha256,
        "imaging_ad": imaging_ad.__version__,
        "torch": version("torch"),
        "timm": version("timm"),
        "onnx": version("onnx"),
        "onnxruntime": version("onnxruntime"),
        "opset": DEFAULT_OPSET,
        "recipe": GRAPH_RECIPE,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def user_cache_dir() -> Path:
    """``$IMAGING_AD_CACHE``, else ``$XDG_CACHE_HOME/imaging_ad``, else ``~/.cache/imaging_ad``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "imaging_ad"


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
        return True
    except OSError:
        return False


def cache_dir_for(model_path: Path | None) -> tuple[Path, bool]:
    """Where the graph of ``model_path`` is cached, and whether that folder is the model's own (then
    graphs of earlier versions of the model are removed from it)."""
    if model_path is not None:
        own = model_path.with_name(model_path.name + CACHE_SUFFIX)
        if _writable_dir(own):  # created if need be; a read-only model folder cannot hold it
            return own, True
    return user_cache_dir() / "onnxruntime", False


def _state_sha256(detector: Detector) -> str:
    """A fitted detector's content hash, for one not loaded from a file (its description and tensors)."""
    from imaging_ad.detectors.persistence import fitted_model_description

    digest = hashlib.sha256(
        json.dumps(fitted_model_description(detector), sort_keys=True, default=str).encode()
    )
    for name, tensor in sorted(detector.learned_state().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for name, tensor in sorted(detector.feature_module().state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def uses_graph_search(detector: Detector) -> bool:
    """Eager scoring searches a large memory bank with a graph (PatchCore's HNSW above 4096 rows), which no
    ONNX graph holds: its export searches exactly, a matrix product that costs as much as the backbone per
    4,000 bank rows. Such a detector runs its backbone in ONNX Runtime and its own head in torch."""
    return getattr(detector.head_, "graph", None) is not None


def cached_graph(
    detector: Detector, model_path: Path | None = None, features_only: bool = False
) -> tuple[Path, bool, float]:
    """The ONNX graph of ``detector`` (loaded from ``model_path``, if given): from the cache, or exported
    (and checked against the detector) into it. Returns (path, built now, seconds spent building).
    ``features_only``: the backbone alone (see :func:`uses_graph_search`)."""
    from imaging_ad.export.exporter import export_model

    sha = file_sha256(model_path) if model_path is not None else _state_sha256(detector)
    key = fingerprint(sha)
    folder, own = cache_dir_for(model_path)
    path = folder / (f"{key}.features.onnx" if features_only else f"{key}.onnx")
    sidecar = path.with_name(path.name + ".json")
    if path.is_file() and sidecar.is_file():
        return path, False, 0.0
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".building-") as tmp:
        if features_only:
            from imaging_ad.export.features import export_features

            model, check = export_features(detector, Path(tmp) / path.name)
            (Path(tmp) / "side.json").write_text(json.dumps(check))
            files_sidecar, files_model = Path(tmp) / "side.json", model
        else:
            files = export_model(detector, Path(tmp) / path.name, "onnx")  # verified against the detector
            files_sidecar, files_model = files.sidecar, files.model
        # sidecar first: a concurrent reader sees the graph only once both are in place
        os.replace(files_sidecar, sidecar)
        os.replace(files_model, path)
    if own:  # graphs of earlier versions of this model file (or of this library)
        for stale in folder.glob("*.onnx"):
            if not stale.name.startswith(key):
                stale.unlink(missing_ok=True)
                stale.with_name(stale.name + ".json").unlink(missing_ok=True)
        for stale in folder.glob("*.speed-*.json"):  # their runtime measurements (see measured_rates)
            if not stale.name.startswith(key):
                stale.unlink(missing_ok=True)
    return path, True, time.perf_counter() - start


def int8_graph(detector: Detector, fp32: Path, normals: Sequence[Any]) -> tuple[Path, dict]:
    """The int8 graph next to ``fp32``: backbone convolutions quantised with ranges from every other normal
    image and checked against ``fp32`` on the rest; cached under a name keyed on the normals too. Raises
    :class:`~imaging_ad.export.quantize.QuantizationRefused` (with the gap) beyond the tolerance."""
    from imaging_ad.export.quantize import QuantizationRefused, compare, quantize_backbone
    from imaging_ad.export.runtime import OnnxBackend
    from imaging_ad.inference import read_ahead

    images = []
    for outcome in read_ahead(list(normals), detector.preprocessor_):
        if not outcome.ok:
            raise outcome.exception or ValueError(outcome.error)
        images.append(outcome.image)
    if len(images) < 4:
        raise ValueError(
            f"int8 needs normal images to calibrate and check on: got {len(images)}, give at least 4"
        )
    stack = np.stack(images)
    calibration, held_out = stack[0::2], stack[1::2]
    key = hashlib.sha256(stack.tobytes()).hexdigest()[:12]
    path = fp32.with_name(f"{fp32.stem}.int8-{key}.onnx")
    sidecar = path.with_name(path.name + ".json")
    if path.is_file() and sidecar.is_file():
        return path, json.loads(sidecar.read_text()).get("quantization", {})
    with tempfile.TemporaryDirectory(dir=fp32.parent, prefix=".building-") as tmp:
        candidate = Path(tmp) / path.name
        quantize_backbone(fp32, candidate, calibration)
        threshold = detector.calibration_.image_threshold

        def scores(graph: Path) -> np.ndarray:
            backend = OnnxBackend(graph, device="cpu", threads=cpu_cores())
            step = max(1, detector.batch_size)
            return np.concatenate([backend(held_out[i : i + step])[0] for i in range(0, len(held_out), step)])

        check = compare(scores(fp32), scores(candidate), threshold, len(calibration))
        if not check.accepted:
            raise QuantizationRefused(
                f"int8 refused: on {check.held_out_images} held-out normals it moves image scores by up to "
                f"{check.max_relative_score_difference:.2%} of the score or the threshold, whichever is larger "
                f"(median {check.median_relative_score_difference:.2%}, tolerance {check.tolerance:.0%}) and changes {check.verdict_changes} verdict(s); use fp32"
            )
        description = json.loads(fp32.with_name(fp32.name + ".json").read_text())
        description.update(
            model_file=path.name, model_sha256=file_sha256(candidate), quantization=check.to_dict()
        )
        (Path(tmp) / "side.json").write_text(json.dumps(description, indent=2))
        os.replace(Path(tmp) / "side.json", sidecar)
        os.replace(candidate, path)
    return path, check.to_dict()


#: images per timed batch when ``auto`` measures the two runtimes (small: it runs once per model and CPU)
AUTO_PROBE_IMAGES = 8


@dataclass(frozen=True)
class MeasuredRates:
    """Images per second of the same fitted model's ``score_batch`` in torch and in ONNX Runtime, timed
    on this CPU with a preprocessed batch (reading and preprocessing are the same for both)."""

    torch: float
    onnxruntime: float
    cpu: str
    threads: int

    @property
    def faster(self) -> str:
        return "onnxruntime" if self.onnxruntime >= self.torch else "torch"

    def __str__(self) -> str:
        return (
            f"measured on this CPU: onnxruntime {self.onnxruntime:.1f} img/s, torch {self.torch:.1f} img/s "
            f"({self.threads} threads)"
        )


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else the platform's processor string)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def images_per_second(score_batch: Any, batch: np.ndarray, repeats: int = 2) -> float:
    """The best of ``repeats`` timed calls of ``score_batch(batch)`` after one untimed warm-up."""
    score_batch(batch)
    best = min(_seconds(score_batch, batch) for _ in range(repeats))
    return len(batch) / max(best, 1e-9)


def _seconds(score_batch: Any, batch: np.ndarray) -> float:
    start = time.perf_counter()
    score_batch(batch)
    return time.perf_counter() - start


def measured_rates(
    detector: Detector, compiled: CompiledDetector, graph: Path, threads: int
) -> MeasuredRates:
    """Both runtimes' rates for this model on this CPU and thread count: read from the file cached beside
    the graph, or timed now (a few seconds, once) and written there."""
    cpu = cpu_model()
    key = hashlib.sha256(f"{cpu}|{threads}".encode()).hexdigest()[:12]
    record = graph.with_name(f"{graph.name}.speed-{key}.json")
    try:
        return MeasuredRates(**json.loads(record.read_text()))
    except (OSError, ValueError, TypeError):
        pass  # not measured yet on this CPU (or an unreadable record): measure
    size = detector.preprocessor_.image_size
    batch = np.random.default_rng(0).uniform(-1, 1, (AUTO_PROBE_IMAGES, 3, size, size)).astype(np.float32)
    rates = MeasuredRates(
        torch=images_per_second(detector.score_batch, batch),
        onnxruntime=images_per_second(compiled.score_batch, batch),
        cpu=cpu,
        threads=threads,
    )
    try:
        with tempfile.NamedTemporaryFile("w", dir=graph.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(rates.__dict__, tmp)
        os.replace(tmp.name, record)
    except OSError as exc:  # a read-only cache still gives this process its answer
        log.warning("could not record the runtime measurement in %s: %s", record, exc)
    return rates


def with_runtime(
    detector: Detector,
    runtime: str = "auto",
    model_path: str | os.PathLike | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    normals: Sequence[Any] | None = None,
) -> Detector | CompiledDetector:
    """``detector`` scored by ``runtime``: ``"torch"`` (the detector itself), ``"onnxruntime"`` (a
    :class:`CompiledDetector`), or ``"auto"``: of the two, the one that scored this model faster on this
    CPU, timed at first use (:func:`measured_rates`, recorded beside the cached graph) — onnxruntime only
    when it is installed, the detector is exportable and runs on the CPU. A detector that cannot be
    exported stays on torch with a note.
    Either way the returned object has a ``runtime_choice`` attribute (:class:`RuntimeChoice`) saying which ran and
    why. ``model_path``: the file ``detector`` was loaded from (the cache key and place); without it the
    graph is keyed on the detector's tensors and cached in the user cache. ``threads``: ONNX Runtime's
    intra-op threads (default: the cores this process may use). ``precision="int8"`` (onnxruntime only,
    opt-in): the backbone's convolutions quantised, calibrated on half of ``normals`` (normal images) and
    checked on the other half; refused with the measured gap when scores move beyond tolerance
    (:mod:`imaging_ad.export.quantize`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and (runtime == "torch" or not normals):
        raise ValueError(
            "precision int8 runs in onnxruntime and needs normal images (normals=...) to calibrate"
        )
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")

    def on_torch(note: str) -> Detector:
        detector.runtime_choice = RuntimeChoice("torch", note)
        log.info("%s", detector.runtime_choice)
        return detector

    if runtime == "torch":
        return on_torch("asked for")
    if not onnxruntime_available():
        if runtime == "onnxruntime":
            raise RuntimeError(
                "--runtime onnxruntime needs the onnxruntime and onnx packages: pip install onnxruntime onnx "
                "(or imaging-ad[export]); --runtime auto falls back to torch"
            )
        return on_torch("onnxruntime is not installed")
    if not detector.exportable:
        return on_torch(f"{detector.name} cannot run in onnxruntime: {detector.not_exportable_reason()}")
    if runtime == "auto" and detector.device_.type != "cpu":
        return on_torch(f"the detector runs on {detector.device_.type}; onnxruntime is used on the CPU")
    from imaging_ad.export.runtime import load_exported

    path = None if model_path is None else Path(model_path)
    split = uses_graph_search(detector)
    if split and precision == "int8":
        raise ValueError(
            "int8 needs the whole graph in onnxruntime; this PatchCore searches its bank with HNSW"
        )
    try:
        graph, built, seconds = cached_graph(detector, path, features_only=split)
    except ExportError as exc:  # a head the exporter refuses, or a graph that did not reproduce it
        if runtime == "onnxruntime":
            raise
        return on_torch(f"the graph could not be exported: {exc}")
    threads = int(threads or cpu_cores())
    device = "cpu" if detector.device_.type == "cpu" else "auto"
    from imaging_ad.export.quantize import QuantizationRefused

    final = graph
    while True:
        try:
            final, quantization = (
                int8_graph(detector, graph, normals) if precision == "int8" else (graph, None)
            )
            # the cached file was written and checked by this process or an earlier one from this very
            # model (its name is the model's fingerprint); the sidecar's checksum guards against damage
            if split:
                from imaging_ad.export.features import load_features

                exported = load_features(final, device=device, threads=threads)
            else:
                exported = load_exported(final, device=device, threads=threads, trust=TrustPolicy())
            break
        except QuantizationRefused:
            raise
        except Exception as exc:  # noqa: BLE001  (a damaged or truncated cached file: build it again, once)
            if built:
                raise
            log.warning("cached graph %s is not usable (%s): building it again", graph, exc)
            for stale in {graph, final}:
                stale.unlink(missing_ok=True)
                stale.with_name(stale.name + ".json").unlink(missing_ok=True)
            graph, built, seconds = cached_graph(detector, path, features_only=split)
    how = f"graph built and checked in {seconds:.1f} s" if built else "cached graph"
    if split:
        how = f"backbone in onnxruntime, the head's HNSW search in torch; {how}"
    if quantization:
        how = (
            f"int8, scores within {quantization['max_relative_score_difference']:.2%} of fp32 on "
            f"{quantization['held_out_images']} held-out normals; {how}"
        )
    compiled = CompiledDetector(
        detector, exported, final, RuntimeChoice("onnxruntime", ""), features_only=split
    )
    if runtime == "auto" and precision == "fp32":
        try:
            rates = measured_rates(detector, compiled, final, threads)
        except Exception as exc:  # noqa: BLE001  (timing must never stop scoring: keep the faster-as-a-rule)
            log.warning("auto could not time the runtimes (%s): onnxruntime, untimed", exc)
            how = f"auto, untimed ({type(exc).__name__}); {how}"
        else:
            if rates.faster == "torch":
                return on_torch(f"auto: {rates}")
            how = f"auto: {rates}; {how}"
    compiled.runtime_choice = RuntimeChoice("onnxruntime", f"{how}: {final}, {threads} threads")
    log.info("%s", compiled.runtime_choice)
    return compiled


def load_model(
    path: str | os.PathLike,
    runtime: str = "auto",
    device: str = "auto",
    trust: TrustPolicy | None = None,
    threads: int | None = None,
) -> Detector | CompiledDetector:
    """:func:`~imaging_ad.detectors.load_detector` scored by ``runtime`` (see :func:`with_runtime`)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and device == "auto":
        device = "cpu"  # the graph is exported from a CPU copy anyway
    detector = load_detector(Path(path), device=device, trust=trust)
    return with_runtime(detector, runtime, model_path=path, threads=threads)


def clear_cache(model_path: str | os.PathLike) -> None:
    """Remove the graphs cached next to ``model_path``."""
    folder = Path(model_path).with_name(Path(model_path).name + CACHE_SUFFIX)
    shutil.rmtree(folder, ignore_errors=True)
