"""Conversions between the PIL images annotators receive and the numpy arrays OpenCV works on."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..images import to_rgb

MAX_SIGMA = 256.0  # pixels: the widest blur an annotator option may ask for
MAX_THICKNESS = 256  # pixels: the widest stroke


def rgb_array(image: Image.Image) -> np.ndarray:
    """Any image -> (h, w, 3) uint8 RGB; transparent pixels become black."""
    return np.asarray(to_rgb(image), dtype=np.uint8)


def grey_array(image: Image.Image) -> np.ndarray:
    """Any image -> (h, w) uint8 luminance; transparent pixels become black."""
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8)
    return np.asarray(to_rgb(image).convert("L"), dtype=np.uint8)


def unit_grey(image: Image.Image) -> np.ndarray:
    """Any image -> (h, w) float32 luminance in [0, 1]."""
    return grey_array(image).astype(np.float32) / 255.0


def condition_image(array: np.ndarray) -> Image.Image:
    """(h, w) or (h, w, 3) array, uint8 or float in [0, 1] -> RGB PIL image."""
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)  # (h, w, 3)
    return Image.fromarray(np.ascontiguousarray(array))


def normalize_unit(array: np.ndarray, percentile: float = 100.0) -> np.ndarray:
    """Scale a non-negative map to [0, 1] by its `percentile` value (robust to a few hot pixels)."""
    top = float(np.percentile(array, percentile)) if array.size else 0.0
    if top <= 1e-12:
        return np.zeros_like(array, dtype=np.float32)
    return np.clip(array / top, 0.0, 1.0).astype(np.float32)
