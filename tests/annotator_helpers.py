"""Shared helpers for the annotator tests: the real test images and small array checks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnext.images import load_image

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"


def shared_image(name: str) -> Image.Image:
    """A real test image from ../shared/images, or skip the test when that folder is absent."""
    path = IMAGES / name
    if not path.is_file():
        pytest.skip(f"shared test image {path} not available")
    return load_image(path)


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def long_straight_lines(edges: np.ndarray, min_fraction: float = 0.2) -> np.ndarray:
    """Hough segments at least `min_fraction` of the short side long in a white-on-black map: (n, 4)."""
    grey = edges if edges.ndim == 2 else edges.max(axis=2)
    length = int(min_fraction * min(grey.shape))
    found = cv2.HoughLinesP((grey > 127).astype(np.uint8) * 255, 1, np.pi / 180, 80, minLineLength=length, maxLineGap=2)
    return np.zeros((0, 4)) if found is None else found.reshape(-1, 4)


def shapes_image(width: int = 37, height: int = 53, mode: str = "RGB") -> Image.Image:
    """A small synthetic picture (dark rectangle and bright disc on grey) converted to `mode`."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 8, width // 2, height // 2), fill=(20, 30, 200))
    draw.ellipse((width // 3, height // 2, width - 2, height - 2), fill=(250, 240, 30))
    if mode == "RGBA":
        image = image.convert("RGBA")
        alpha = Image.new("L", image.size, 0)
        ImageDraw.Draw(alpha).rectangle((0, 0, width // 2, height - 1), fill=255)
        image.putalpha(alpha)
        return image
    if mode == "I;16":
        return Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257))
    if mode == "P":
        return image.convert("P", palette=Image.ADAPTIVE, colors=8)
    return image.convert(mode)
