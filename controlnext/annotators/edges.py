"""Edge-like conditions without weights: canny, line art, scribbles and soft edges (white on black)."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from PIL import Image

from ..errors import ControlNextError
from .arrays import MAX_SIGMA, MAX_THICKNESS, condition_image, normalize_unit, rgb_array, unit_grey


def canny(image: Image.Image, *, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edges (Canny, 1986) of the RGB image: one-pixel white edges on black, as canny controls use."""
    if not 0 <= low_threshold <= high_threshold:
        raise ControlNextError(
            f"canny needs 0 <= low_threshold <= high_threshold, got {low_threshold} and {high_threshold}"
        )
    edges = cv2.Canny(rgb_array(image), low_threshold, high_threshold)  # (h, w) in {0, 255}
    return condition_image(edges)


def darker_than_surroundings(grey: np.ndarray, sigma: float, k: float) -> np.ndarray:
    """Difference of Gaussians G(k sigma) - G(sigma), kept where positive: how much a pixel is a dark stroke."""
    fine = cv2.GaussianBlur(grey, (0, 0), sigma)  # (h, w)
    coarse = cv2.GaussianBlur(grey, (0, 0), sigma * k)  # (h, w)
    return np.maximum(coarse - fine, 0.0)


def lineart(
    image: Image.Image, *, sigma: float = 0.8, k: float = 3.0, floor: float = 0.15, gamma: float = 0.8
) -> Image.Image:
    """Line art from a difference of Gaussians: dark strokes become white lines on black, with soft strength.

    `floor` (fraction of the strongest lines) removes faint texture; `gamma` < 1 thickens mid-strength lines.
    """
    if not (0 < sigma <= MAX_SIGMA and 1 < k <= 20 and 0 <= floor < 1 and 0 < gamma <= 10):
        raise ControlNextError(
            f"lineart needs 0 < sigma <= {MAX_SIGMA}, 1 < k <= 20, 0 <= floor < 1 and 0 < gamma <= 10, "
            f"got sigma={sigma}, k={k}, floor={floor}, gamma={gamma}"
        )
    strength = normalize_unit(darker_than_surroundings(unit_grey(image), sigma, k), 99.5)
    strength = np.clip((strength - floor) / max(1.0 - floor, 1e-6), 0.0, 1.0) ** gamma
    return condition_image(strength)


def scribble(
    image: Image.Image,
    *,
    method: Literal["xdog", "edges"] = "xdog",
    threshold: int = 32,
    thickness: int = 3,
) -> Image.Image:
    """Scribble strokes: white lines of `thickness` pixels on black, like a hand sketch of the outlines.

    "xdog": thresholded difference of Gaussians (XDoG, Winnemoeller et al., 2012, with a hard step), on
    the most contrasted colour channel; "edges": Canny edges. Either is then thickened into strokes.
    """
    if not 0 <= threshold <= 255 or not 1 <= thickness <= MAX_THICKNESS:
        raise ControlNextError(
            f"scribble needs 0 <= threshold <= 255 and 1 <= thickness <= {MAX_THICKNESS}, got {threshold}, {thickness}"
        )
    rgb = rgb_array(image).astype(np.float32)  # (h, w, 3)
    if method == "xdog":
        fine = cv2.GaussianBlur(rgb, (0, 0), 0.5)  # (h, w, 3)
        coarse = cv2.GaussianBlur(rgb, (0, 0), 5.0)  # (h, w, 3)
        response = (coarse - fine).max(axis=2)  # (h, w): how much darker than its surroundings
        strokes = (2.0 * response > threshold).astype(np.uint8) * 255
    else:
        blurred = cv2.GaussianBlur(rgb.astype(np.uint8), (0, 0), 1.5)
        strokes = cv2.Canny(blurred, max(threshold, 1), max(threshold, 1) * 3)
    strokes = _remove_specks(strokes, min_area=max(4, strokes.size // 40000))
    if thickness > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (thickness, thickness))
        strokes = cv2.dilate(strokes, kernel)
    return condition_image(strokes)


def _remove_specks(binary: np.ndarray, min_area: int) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # background
    return np.where(keep[labels], 255, 0).astype(np.uint8)


def softedge(image: Image.Image, *, sigma: float = 1.5, model_path: str | None = None) -> Image.Image:
    """Soft edges: grey-level edge strength on black, like HED/PiDiNet maps.

    Without `model_path`: the Sobel gradient magnitude of the blurred image, normalised and blurred
    again (no weights). With `model_path` (a SoftEdgeNet folder or .safetensors file): the learned network.
    """
    if model_path:
        from .softedge_net import learned_soft_edges

        return learned_soft_edges(image, model_path)
    if not 0 < sigma <= MAX_SIGMA:
        raise ControlNextError(f"softedge needs 0 < sigma <= {MAX_SIGMA}, got {sigma}")
    grey = cv2.GaussianBlur(unit_grey(image), (0, 0), sigma)  # (h, w)
    dx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)  # (h, w)
    dy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)  # (h, w)
    strength = normalize_unit(np.hypot(dx, dy), 99.0)
    strength = cv2.GaussianBlur(strength, (0, 0), sigma) ** 0.75
    return condition_image(normalize_unit(strength))
