"""Small synthetic anomaly-detection data the tests make themselves: textures with pasted defects."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def texture(rng: np.random.Generator, height: int = 96, width: int = 112) -> np.ndarray:
    """A woven-looking 8-bit grayscale texture with random phase and mild noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase_x, phase_y = rng.uniform(0, 2 * np.pi, size=2)
    base = 0.5 + 0.2 * np.sin(x / 3.0 + phase_x) * np.sin(y / 3.0 + phase_y)
    noise = cv2.GaussianBlur(rng.normal(0, 0.05, (height, width)).astype(np.float32), (0, 0), 1.0)
    return np.clip((base + noise) * 255, 0, 255).astype(np.uint8)


def paste_defect(
    image: np.ndarray, rng: np.random.Generator, size: int = 18
) -> tuple[np.ndarray, np.ndarray]:
    """A dark scratch-like blob at a random place; returns (image, boolean mask)."""
    height, width = image.shape[:2]
    top = int(rng.integers(8, height - size - 8))
    left = int(rng.integers(8, width - size - 8))
    out = image.copy()
    angle = float(rng.uniform(0, 180))
    cv2.ellipse(out, (left + size // 2, top + size // 2), (size // 2, size // 4), angle, 0, 360, 20, -1)
    mask = out != image
    return out, mask


def make_texture_dataset(
    root: Path, n_train: int = 24, n_good: int = 6, n_bad: int = 6, seed: int = 0
) -> Path:
    """An MVTec-layout folder: train/good, test/good, test/defect, ground_truth/defect/<stem>_mask.png."""
    rng = np.random.default_rng(seed)
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), texture(rng))
    for i in range(n_good):
        cv2.imwrite(str(root / "test/good" / f"{i:03d}.png"), texture(rng))
    for i in range(n_bad):
        image, mask = paste_defect(texture(rng), rng)
        cv2.imwrite(str(root / "test/defect" / f"{i:03d}.png"), image)
        cv2.imwrite(str(root / "ground_truth/defect" / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root
