"""Binary masks from an image's alpha channel or its luminance (white = the masked region)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from ..errors import ControlNextError
from .arrays import condition_image, grey_array


def mask(
    image: Image.Image,
    *,
    source: Literal["auto", "alpha", "luminance"] = "auto",
    threshold: int = 128,
    invert: bool = False,
) -> Image.Image:
    """Binary mask: white where alpha (or luminance) >= `threshold`, black elsewhere; `invert` swaps them.

    "auto" reads the alpha channel when the image has a transparent pixel and luminance otherwise.
    """
    if not 0 <= threshold <= 255:
        raise ControlNextError(f"mask threshold must be within 0..255, got {threshold}")
    has_alpha = image.mode == "RGBA"
    alpha = np.asarray(image.getchannel("A"), dtype=np.uint8) if has_alpha else None
    if source == "alpha" and alpha is None:
        raise ControlNextError(f"this {image.mode} image has no alpha channel; use source=luminance")
    if source == "alpha" or (source == "auto" and alpha is not None and alpha.min() < 255):
        values = alpha
    else:
        values = grey_array(image)  # (h, w)
    inside = values >= threshold
    if invert:
        inside = ~inside
    return condition_image(np.where(inside, 255, 0).astype(np.uint8))
