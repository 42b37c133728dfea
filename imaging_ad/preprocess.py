"""One preprocessing pipeline, shared by fitting, predicting and export.

Steps, in order: intensity scaling to [0, 1] (explicit windowing or percentile stretch for data
deeper than 8 bits), optional CLAHE for radiographs, a resize that keeps the whole image (no centre
crop that could cut a defect away), grayscale to the backbone's 3 channels, and the backbone's
normalisation. The geometry is invertible so heatmaps go back to the original resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import albumentations as A
import cv2
import numpy as np
import torch

from imaging_ad.io.record import ImageRecord

ASPECT_MODES = ("stretch", "letterbox")
INTENSITY_MODES = ("auto", "robust", "percentile", "full_range")
# median +- this many robust standard deviations (IQR / 1.349) spans [0, 1] in "robust" mode
_ROBUST_SPAN = 3.0
_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def percentiles(pixels: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(pixels, q)`` (linear interpolation), bit for bit; for 8- and 16-bit pixels read
    off a histogram instead of partially sorting the image: ~10x faster on a 400 x 250 image."""
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.size == 0:
        return np.percentile(pixels, q)
    cumulative = np.cumsum(np.bincount(pixels.ravel()))
    rank = np.asarray(q, dtype=np.float64) / 100 * (pixels.size - 1)
    below = np.floor(rank)
    weight = rank - below
    lower = np.searchsorted(cumulative, below, side="right").astype(np.float64)
    upper = np.searchsorted(cumulative, np.minimum(below + 1, pixels.size - 1), side="right").astype(
        np.float64
    )
    # NumPy's own lerp, from whichever end is nearer, so the result is identical to np.percentile's
    difference = upper - lower
    return np.where(weight >= 0.5, upper - difference * (1 - weight), lower + difference * weight)


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits inside the square model input."""

    original_size: tuple[int, int]  # (height, width)
    content_box: tuple[int, int, int, int]  # (top, left, height, width) inside the model input


@dataclass
class Preprocessor:
    """Image record -> normalised CHW float tensor; picklable-free config saved as JSON with models.

    ``aspect``: ``"stretch"`` resizes to a square (keeps every pixel, distorts shape);
    ``"letterbox"`` keeps the aspect ratio and pads with black.
    ``intensity``: ``"auto"`` divides 8-bit data by 255 and uses the file's display range (DICOM
    window) when known, else a percentile stretch; ``"robust"`` maps median -/+ 3 robust standard
    deviations to [0, 1] per image (evens out exposure between images, insensitive to small
    defects); ``"percentile"`` stretches between the ``percentiles``; ``"full_range"`` divides by
    the dtype's range.
    """

    image_size: int = 256
    aspect: str = "stretch"
    intensity: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    clahe: bool = False
    clahe_clip_limit: float = 2.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    _pipeline: A.Compose | None = field(default=None, init=False, repr=False, compare=False)
    _gray_pipeline: A.Compose | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {self.aspect!r}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(
                f"interpolation must be one of {tuple(_INTERPOLATION)}, got {self.interpolation!r}"
            )
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.percentiles = tuple(self.percentiles)
        self._pipeline = self._build_pipeline()
        self._gray_pipeline = self._build_gray_pipeline()

    @classmethod
    def for_backbone(cls, backbone, **overrides) -> Preprocessor:
        """Normalisation and interpolation from a :class:`FeatureExtractor`; the rest from ``overrides``."""
        norm = backbone.normalization
        defaults = {"mean": norm.mean, "std": norm.std, "interpolation": norm.interpolation}
        return cls(**{**defaults, **overrides})

    # -- the steps ---------------------------------------------------------------------------------

    def scale_intensity(self, record: ImageRecord | np.ndarray) -> np.ndarray:
        """Pixels -> float32 in [0, 1], same shape. The only place bit depth is reduced."""
        pixels, meta = (record.pixels, record.meta) if isinstance(record, ImageRecord) else (record, None)
        low, high = self._intensity_range(pixels, meta)
        scale = float(high - low) if high > low else 1.0
        return np.clip((pixels.astype(np.float32) - float(low)) / scale, 0.0, 1.0)

    def _intensity_range(self, pixels: np.ndarray, meta) -> tuple[float, float]:
        if self.intensity == "percentile":
            return tuple(percentiles(pixels, self.percentiles))
        if self.intensity == "robust":
            # Median and IQR barely move when a defect covers a few percent of the image, unlike
            # extreme percentiles: a dark blob must not re-expose the whole image.
            # quartiles of every 2nd pixel in each direction: same statistics, 4x less sorting
            sample = pixels[::2, ::2] if pixels.size > 65536 else pixels
            q25, median, q75 = percentiles(sample, (25, 50, 75))
            spread = max((q75 - q25) / 1.349, 1e-6)
            return median - _ROBUST_SPAN * spread, median + _ROBUST_SPAN * spread
        if meta is not None and meta.voi_applied and meta.value_range is not None:
            return meta.value_range  # the file's own window: what a radiologist would see
        if self.intensity == "full_range" or pixels.dtype == np.uint8:
            if meta is not None and meta.value_range is not None:
                return meta.value_range
            if np.issubdtype(pixels.dtype, np.integer):
                return float(np.iinfo(pixels.dtype).min), float(np.iinfo(pixels.dtype).max)
        if np.issubdtype(pixels.dtype, np.floating) and pixels.min() >= 0.0 and pixels.max() <= 1.0:
            return 0.0, 1.0
        # Deeper than 8 bits with no window: robust stretch, so a 12-bit image in a 16-bit
        # container is not left nearly black.
        return tuple(percentiles(pixels, self.percentiles))

    def geometry(self, original_size: tuple[int, int]) -> Geometry:
        height, width = original_size
        size = self.image_size
        if self.aspect == "stretch":
            return Geometry((height, width), (0, 0, size, size))
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        # PadIfNeeded(position="center") puts the odd pixel at the bottom/right.
        top, left = (size - new_h) // 2, (size - new_w) // 2
        return Geometry((height, width), (top, left, new_h, new_w))

    def __call__(self, record: ImageRecord | np.ndarray) -> torch.Tensor:
        """One image -> (3, image_size, image_size) float32 tensor ready for the backbone."""
        image = self.scale_intensity(record)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if self.clahe:
            image = self._apply_clahe(image)
        if self._gray_pipeline is not None:
            if image.ndim == 3 and _channels_equal(image):
                # grayscale stored as RGB (common for X-rays): the same tensor up to OpenCV resizing
                # one channel and three in different rounding order (<= 1 float32 ulp)
                image = image[..., 0]
            if image.ndim == 2:
                # the same arithmetic on one channel, copied to three once at the end: 3x less work
                gray = self._gray_pipeline(image=image)["image"]
                return torch.from_numpy(gray).expand(3, *gray.shape).contiguous()
        out = self._pipeline(image=image)["image"]
        if out.ndim == 2:
            out = np.repeat(out[..., None], 3, axis=2)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    def heatmap_to_original(self, heatmap: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Model-input-sized (or any square) heatmap -> float32 heatmap at ``original_size``."""
        geometry = self.geometry(original_size)
        heatmap = np.asarray(heatmap, dtype=np.float32)
        if heatmap.shape != (self.image_size, self.image_size):
            heatmap = cv2.resize(heatmap, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        top, left, height, width = geometry.content_box
        content = heatmap[top : top + height, left : left + width]
        out_h, out_w = original_size
        return cv2.resize(content, (out_w, out_h), interpolation=cv2.INTER_LINEAR)

    # -- persistence -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("_pipeline", None)
        data.pop("_gray_pipeline", None)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessor:
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing settings {sorted(unknown)}")
        return cls(**data)

    # -- internals ---------------------------------------------------------------------------------

    def _geometry_transforms(self) -> list[A.BasicTransform]:
        interpolation = _INTERPOLATION[self.interpolation]
        size = self.image_size
        if self.aspect == "stretch":
            return [A.Resize(size, size, interpolation=interpolation, area_for_downscale="image")]
        return [
            A.LongestMaxSize(max_size=size, interpolation=interpolation, area_for_downscale="image"),
            A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=0),
        ]

    def _build_pipeline(self) -> A.Compose:
        normalise = A.Normalize(mean=self.mean, std=self.std, max_pixel_value=1.0)
        return A.Compose([*self._geometry_transforms(), _ToThreeChannels(), normalise])

    def _build_gray_pipeline(self) -> A.Compose | None:
        """For grayscale input when every channel is normalised alike (mean and std the same for all)."""
        if len(set(self.mean)) != 1 or len(set(self.std)) != 1:
            return None
        normalise = A.Normalize(mean=self.mean[:1], std=self.std[:1], max_pixel_value=1.0)
        return A.Compose([*self._geometry_transforms(), normalise])

    def _apply_clahe(self, image: np.ndarray) -> np.ndarray:
        # OpenCV's CLAHE works on 8-bit data; intensity is already windowed to [0, 1] at this point.
        as_uint8 = np.round(image * 255).astype(np.uint8)
        clahe = A.CLAHE(
            clip_limit=(self.clahe_clip_limit, self.clahe_clip_limit), tile_grid_size=(8, 8), p=1.0
        )
        return clahe(image=as_uint8)["image"].astype(np.float32) / 255.0


def _channels_equal(image: np.ndarray) -> bool:
    first = image[..., 0]
    return all(np.array_equal(first, image[..., c]) for c in range(1, image.shape[2]))


class _ToThreeChannels(A.ImageOnlyTransform):
    """Grayscale -> 3 identical channels, as late as possible (after resizing, so it is done once)."""

    def __init__(self) -> None:
        super().__init__(p=1.0)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        if img.ndim == 2:
            return np.repeat(img[..., None], 3, axis=2)
        if img.shape[2] == 1:
            return np.repeat(img, 3, axis=2)
        return img
