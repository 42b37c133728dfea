"""Augmentations of normal images for detectors that train a network (albumentations).

They run on the preprocessed ``(3, S, S)`` tensor, after resizing, so they cost little and never
change the preprocessing that prediction uses. Which geometry is safe depends on the domain: a chest
X-ray must not be flipped (the heart is on the left), a texture or a symmetric part may be.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from imaging_ad.inference import Transform


def _light() -> list[A.BasicTransform]:
    # small shifts, zooms, tilts and exposure changes: what repeated acquisitions of a normal look like
    return [
        A.Affine(
            translate_percent=(-0.03, 0.03),
            scale=(0.95, 1.05),
            rotate=(-5, 5),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.7,
        ),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ]


def _flips() -> list[A.BasicTransform]:
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]


#: name -> transforms; "light" is safe for radiographs, "flip"/"rotate" suit textures and symmetric parts
AUGMENTATIONS = {
    "none": list,
    "light": _light,
    "flip": lambda: [*_flips(), *_light()],
    "rotate": lambda: [*_flips(), A.RandomRotate90(p=0.5), *_light()],
}


def check_augmentation(name: str) -> None:
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")


class TensorAugmentation:
    """An albumentations pipeline applied to one preprocessed CHW float array, seeded."""

    def __init__(self, name: str, seed: int) -> None:
        check_augmentation(name)
        self.name = name
        self.pipeline = A.Compose(AUGMENTATIONS[name](), seed=seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
        out = self.pipeline(image=hwc)["image"]
        return np.ascontiguousarray(out.transpose(2, 0, 1))


def build_augmentation(name: str, seed: int) -> Transform | None:
    """The augmentation called ``name`` (see :data:`AUGMENTATIONS`), or None for ``"none"``."""
    check_augmentation(name)
    if name == "none":
        return None
    return TensorAugmentation(name, seed)
