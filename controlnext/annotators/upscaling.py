"""Conditions for upscaling and detail control: a low-resolution tile and a blurred image."""

from __future__ import annotations

import cv2
from PIL import Image

from ..errors import ControlNextError
from .arrays import MAX_SIGMA, condition_image, rgb_array


def tile(image: Image.Image, *, downscale: float = 4.0) -> Image.Image:
    """The image shrunk by `downscale` (area filter) and grown back (cubic): the soft input tile controls refine."""
    if downscale < 1:
        raise ControlNextError(f"tile downscale must be >= 1, got {downscale}")
    rgb = rgb_array(image)  # (h, w, 3)
    height, width = rgb.shape[:2]
    small_size = (max(1, round(width / downscale)), max(1, round(height / downscale)))
    small = cv2.resize(rgb, small_size, interpolation=cv2.INTER_AREA)
    return condition_image(cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC))


def blur(image: Image.Image, *, sigma: float = 4.0) -> Image.Image:
    """The image under a Gaussian blur of `sigma` pixels (at the detection resolution)."""
    if not 0 <= sigma <= MAX_SIGMA:
        raise ControlNextError(f"blur sigma must be within 0..{MAX_SIGMA:g} pixels, got {sigma}")
    rgb = rgb_array(image)  # (h, w, 3)
    return condition_image(rgb if sigma == 0 else cv2.GaussianBlur(rgb, (0, 0), sigma))
