"""Straight line segments (an MLSD-like condition) from classical detectors, no weights."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from PIL import Image

from ..errors import ControlNextError
from .arrays import MAX_THICKNESS, condition_image, grey_array


def straight_lines(
    image: Image.Image,
    *,
    method: Literal["lsd", "hough"] = "lsd",
    min_length: float = 0.05,
    thickness: int = 1,
) -> Image.Image:
    """Straight line segments drawn white on black, as M-LSD maps (mlsd controls) look.

    How it differs from MLSD (Gu et al., 2022): MLSD is a network trained on wireframes of man-made
    scenes, so it returns long structural lines and ignores texture. Here "lsd" is OpenCV's gradient
    based Line Segment Detector (von Gioi et al., 2010) and "hough" the probabilistic Hough transform
    on Canny edges: both also find straight texture (tiles, fabric, text) and may split a long line
    into pieces. Segments shorter than `min_length` (a fraction of the short side) are dropped, which
    removes most texture; raise it to keep only the main structure.
    """
    if not 0 <= min_length <= 1 or not 1 <= thickness <= MAX_THICKNESS:
        raise ControlNextError(
            f"lines needs 0 <= min_length <= 1 and 1 <= thickness <= {MAX_THICKNESS}, got {min_length}, {thickness}"
        )
    grey = grey_array(image)  # (h, w)
    shortest = min_length * min(grey.shape)
    segments = detect_segments(grey, method, shortest)  # (n, 4) x1, y1, x2, y2
    canvas = np.zeros_like(grey)
    for x1, y1, x2, y2 in np.round(segments).astype(int):
        cv2.line(canvas, (x1, y1), (x2, y2), 255, thickness)
    return condition_image(canvas)


def detect_segments(grey: np.ndarray, method: str, min_length: float) -> np.ndarray:
    """Line segments of a greyscale uint8 image as an (n, 4) float array of x1, y1, x2, y2."""
    if method == "lsd":
        detector = cv2.createLineSegmentDetector(cv2.LSD_REFINE_STD)
        found = detector.detect(cv2.GaussianBlur(grey, (0, 0), 1.0))[0]
    else:
        edges = cv2.Canny(cv2.GaussianBlur(grey, (0, 0), 1.0), 50, 150)
        found = cv2.HoughLinesP(
            edges, 1, np.pi / 180, threshold=40, minLineLength=max(1, int(min_length)), maxLineGap=3
        )
    if found is None:
        return np.zeros((0, 4), dtype=np.float32)
    segments = found.reshape(-1, 4).astype(np.float32)  # (n, 4)
    lengths = np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])  # (n,)
    return segments[lengths >= min_length]
