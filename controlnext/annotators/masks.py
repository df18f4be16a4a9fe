"""Binary masks (white = the masked region): from alpha, luminance, the people in a photo or its main subject."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from PIL import Image

from ..errors import ControlNextError
from .arrays import condition_image, grey_array, rgb_array

SUBJECT_WORKING_SIDE = 320  # pixels of the long side GrabCut works at: its cost grows with the pixel count
SUBJECT_MARGIN = 0.04  # of each side: the frame taken as background to start GrabCut from
MIN_PEOPLE_AREA = 0.005  # fraction of the image the people mask must cover for "auto" to use it


def mask(
    image: Image.Image,
    *,
    source: Literal["auto", "alpha", "luminance", "person", "subject"] = "auto",
    threshold: int = 128,
    invert: bool = False,
) -> Image.Image:
    """Binary mask, white on black: the people, the main subject, the opaque part or the bright part.

    "person": the people found by mediapipe's bundled segmentation model (extra `pose`, offline).
    "subject": the main subject, separated from the background by GrabCut (Rother et al., 2004; no
    weights) started from the image's border as background. "alpha": alpha >= `threshold`. "luminance":
    luminance >= `threshold`. "auto": the alpha channel of an image with transparent pixels; otherwise
    the people when mediapipe is installed and finds some, else the subject. `invert` swaps white and black.
    """
    if not 0 <= threshold <= 255:
        raise ControlNextError(f"mask threshold must be within 0..255, got {threshold}")
    has_alpha = image.mode == "RGBA"
    alpha = np.asarray(image.getchannel("A"), dtype=np.uint8) if has_alpha else None
    if source == "alpha" and alpha is None:
        raise ControlNextError(f"this {image.mode} image has no alpha channel; use source=luminance, person or subject")
    if source == "alpha" or (source == "auto" and alpha is not None and alpha.min() < 255):
        inside = alpha >= threshold
    elif source == "luminance":
        inside = grey_array(image) >= threshold  # (h, w)
    elif source == "person":
        inside = people_mask(image)
    elif source == "subject":
        inside = subject_mask(image)
    else:
        inside = _people_or_subject(image)
    if invert:
        inside = ~inside
    return condition_image(np.where(inside, 255, 0).astype(np.uint8))


def people_mask(image: Image.Image) -> np.ndarray:
    """Where the people are, from mediapipe's bundled selfie segmentation model: (h, w) bool."""
    from .mediapipe_models import people_probability, quiet_native_logs

    with quiet_native_logs():
        return people_probability(rgb_array(image)) >= 0.5


def _people_or_subject(image: Image.Image) -> np.ndarray:
    try:
        people = people_mask(image)
    except ControlNextError:  # mediapipe is not installed: no people model to ask
        return subject_mask(image)
    return people if people.mean() >= MIN_PEOPLE_AREA else subject_mask(image)


def subject_mask(image: Image.Image) -> np.ndarray:
    """The main subject by GrabCut, started with the image's border as background: (h, w) bool.

    GrabCut works on a copy whose long side is at most SUBJECT_WORKING_SIDE pixels; its mask is brought
    back to the image's size with a smooth edge.
    """
    rgb = rgb_array(image)  # (h, w, 3)
    height, width = rgb.shape[:2]
    if min(height, width) < 16:
        raise ControlNextError(f"a subject mask needs an image of at least 16x16 pixels, got {width}x{height}")
    scale = min(1.0, SUBJECT_WORKING_SIDE / max(height, width))
    small = cv2.resize(rgb, (max(16, round(width * scale)), max(16, round(height * scale))), interpolation=cv2.INTER_AREA)
    labels = np.zeros(small.shape[:2], np.uint8)
    margin_x, margin_y = max(1, round(small.shape[1] * SUBJECT_MARGIN)), max(1, round(small.shape[0] * SUBJECT_MARGIN))
    rect = (margin_x, margin_y, small.shape[1] - 2 * margin_x, small.shape[0] - 2 * margin_y)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's GMM starts from k-means: seeded, the same image gives the same mask
    try:
        cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), labels, rect, background, foreground, 5,
                    cv2.GC_INIT_WITH_RECT)  # fmt: skip
    except cv2.error:  # too few distinct colours to model a subject and a background
        return np.zeros((height, width), dtype=bool)
    subject = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)  # (h', w')
    return cv2.resize(subject, (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5
