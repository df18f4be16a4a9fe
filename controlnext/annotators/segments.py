"""Segmentation by colour quantisation: k-means over pixel colours, seeded, no weights."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..errors import ControlNextError
from .arrays import condition_image, rgb_array

_SAMPLE_PIXELS = 20000


def color_segments(image: Image.Image, *, colors: int = 8, seed: int = 0, smooth: int = 7) -> Image.Image:
    """Flat colour regions: each pixel painted with its k-means cluster's mean colour (k = `colors`).

    The image is first median-filtered (`smooth` pixels, odd; 0 or 1 to skip) so regions are not
    speckled; k-means runs in CIE Lab on a seeded sample of pixels with k-means++ starts.
    """
    if not 2 <= colors <= 64 or seed < 0:
        raise ControlNextError(f"color_segments needs 2 <= colors <= 64 and seed >= 0, got {colors}, {seed}")
    if smooth < 0 or (smooth > 1 and smooth % 2 == 0):
        raise ControlNextError(f"color_segments smooth must be 0, 1 or an odd number of pixels, got {smooth}")
    rgb = rgb_array(image)  # (h, w, 3)
    if smooth > 1:
        rgb = cv2.medianBlur(rgb, smooth)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)  # (h*w, 3)
    rng = np.random.default_rng(seed)
    sample = lab[rng.choice(len(lab), size=min(len(lab), _SAMPLE_PIXELS), replace=False)]  # (n, 3)
    colors = min(colors, len(np.unique(sample, axis=0)))
    if colors == 1:  # one colour (a flat or one-pixel image): its mean is the only segment
        return condition_image(np.broadcast_to(rgb.reshape(-1, 3).mean(axis=0).round().astype(np.uint8), rgb.shape))
    centres = _kmeans_plus_plus(sample, colors, rng)  # (k, 3)
    labels = _nearest(sample, centres).astype(np.int32)[:, None]  # (n, 1)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.5)
    _, _, centres = cv2.kmeans(sample, colors, labels, criteria, 1, cv2.KMEANS_USE_INITIAL_LABELS)
    pixel_labels = _nearest(lab, centres)  # (h*w,)
    flat_rgb = rgb.reshape(-1, 3).astype(np.float64)  # (h*w, 3)
    counts = np.maximum(np.bincount(pixel_labels, minlength=colors), 1)[:, None]  # (k, 1)
    sums = np.stack([np.bincount(pixel_labels, flat_rgb[:, c], minlength=colors) for c in range(3)], axis=1)
    mean_rgb = (sums / counts).round().astype(np.uint8)  # (k, 3)
    painted = mean_rgb[pixel_labels].reshape(rgb.shape)  # (h, w, 3)
    return condition_image(painted)


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): spread starting centres by squared distance."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        distance = ((points[:, None, :] - np.stack(centres)[None]) ** 2).sum(axis=2).min(axis=1)  # (n,)
        total = float(distance.sum())
        index = rng.choice(len(points), p=distance / total) if total > 0 else rng.integers(len(points))
        centres.append(points[index])
    return np.stack(centres).astype(np.float32)


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    distance = (points**2).sum(1)[:, None] - 2.0 * points @ centres.T + (centres**2).sum(1)[None]  # (n, k)
    return distance.argmin(axis=1)
