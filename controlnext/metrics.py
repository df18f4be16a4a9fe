"""Control fidelity and shapes-world quality of generated images; every score is a float in [0, 1].

Fidelity compares a condition with what a detector finds in the generated image: `edge_f1` (canny edges,
with a pixel tolerance) and `mask_iou` (pixels far from the background colour). For the shapes world,
`shape_scores` checks background colour, shape colours and shape kinds against the scene's spec.
`interior_noise` measures speckle inside the drawn shapes (lower is better).
Images may be PIL images or arrays ((H, W) or (H, W, 3); uint8, or floats in [0, 1]).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .data.shapes import PALETTE, ShapesSpec
from .errors import ControlNextError

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[name] for name in _PALETTE_NAMES], np.float32)  # (k, 3)
FOREGROUND_DISTANCE = 24.0  # least RGB distance from the background colour that can count as foreground


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image or array -> uint8 array (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ControlNextError(f"expected an image of shape (H, W) or (H, W, 3), got {array.shape}")
    if array.dtype != np.uint8:
        array = np.round(np.clip(array.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


def binary_map(image: Image.Image | np.ndarray) -> np.ndarray:
    """White-on-black condition (edges, mask) -> bool (H, W): pixels brighter than half."""
    return as_rgb_array(image).max(axis=2) >= 128


def canny_edges(image: Image.Image | np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of an RGB image, bool (H, W); the gradient is taken per colour channel, so hue edges count."""
    return cv2.Canny(as_rgb_array(image), low, high) > 0


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def binary_f1(predicted: np.ndarray, target: np.ndarray, tolerance: int = 1) -> float:
    """F1 of two thin maps, a pixel counting as matched when the other map has one within `tolerance` pixels."""
    predicted, target = np.asarray(predicted, bool), np.asarray(target, bool)
    if predicted.shape != target.shape:
        raise ControlNextError(f"maps differ in size: {predicted.shape} vs {target.shape}; resize one first")
    if not predicted.any() and not target.any():
        return 1.0
    if not predicted.any() or not target.any():
        return 0.0
    precision = (predicted & _dilate(target, tolerance)).sum() / predicted.sum()
    recall = (target & _dilate(predicted, tolerance)).sum() / target.sum()
    return float(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))


def binary_iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two bool maps (1 when both are empty)."""
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    if first.shape != second.shape:
        raise ControlNextError(f"maps differ in size: {first.shape} vs {second.shape}; resize one first")
    union = (first | second).sum()
    return 1.0 if union == 0 else float((first & second).sum() / union)


def edge_f1(condition: Image.Image | np.ndarray, image: Image.Image | np.ndarray, tolerance: int = 1,
            low: int = 100, high: int = 200) -> float:
    """Edge F1 between a canny condition (white edges on black) and canny edges of the generated image."""
    return binary_f1(canny_edges(image, low, high), binary_map(condition), tolerance)


def background_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """The dominant colour of the image border (per-channel median), float (3,)."""
    array = as_rgb_array(image).astype(np.float32)
    border = np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])  # (n, 3)
    return np.median(border, axis=0)


def foreground_mask(image: Image.Image | np.ndarray, distance: float = FOREGROUND_DISTANCE) -> np.ndarray:
    """Pixels away from the border's dominant colour, bool (H, W).

    A pixel is foreground when its RGB distance from the background exceeds `distance` and is at least
    half the largest distance within 2 pixels: a blended rim pixel counts when it is mostly shape.
    """
    array = as_rgb_array(image).astype(np.float32)
    offset = np.linalg.norm(array - background_rgb(image), axis=2)  # (H, W)
    nearby_peak = cv2.dilate(offset, np.ones((5, 5), np.uint8))
    return (offset > distance) & (offset >= 0.5 * nearby_peak)


def mask_iou(condition: Image.Image | np.ndarray, image: Image.Image | np.ndarray,
             distance: float = FOREGROUND_DISTANCE) -> float:
    """IoU between a mask condition (white on black) and the generated image's foreground."""
    return binary_iou(binary_map(condition), foreground_mask(image, distance))


def interior_noise(image: Image.Image | np.ndarray, kernel: int = 7, inset: int = 2) -> float:
    """Speckle inside the drawn shapes: mean RGB distance (over 255) between each pixel at least `inset` pixels
    inside the foreground and the median of its `kernel` x `kernel` neighbourhood; 0 when every shape is flat.

    Shapes-world scenes are flat colours, so a flat drawing scores 0 and dark spots or mottling raise it,
    whatever the colour. Lower is better; an image without foreground scores 0.
    """
    array = as_rgb_array(image)
    contours, _ = cv2.findContours(foreground_mask(array).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # holes filled: spots as dark as the background are outside the foreground, yet inside a shape
    filled = cv2.drawContours(np.zeros(array.shape[:2], np.uint8), contours, -1, 1, cv2.FILLED)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * inset + 1, 2 * inset + 1))
    inside = cv2.erode(filled, disc) > 0
    if not inside.any():
        return 0.0
    offset = np.linalg.norm(array.astype(np.float32) - cv2.medianBlur(array, kernel).astype(np.float32), axis=2)
    return float(offset[inside].mean() / 255)


def nearest_colour(rgb: Sequence[float] | np.ndarray) -> str:
    """Name of the palette colour nearest to `rgb` (0-255)."""
    distances = np.linalg.norm(_PALETTE_RGB - np.asarray(rgb, np.float32), axis=1)
    return _PALETTE_NAMES[int(distances.argmin())]


def classify_shape(mask: np.ndarray) -> str:
    """Kind of one shape from its bool mask: the kind whose smallest enclosing outline its convex hull fills best.

    A triangle fills its smallest enclosing triangle, a square its smallest rotated rectangle and a disc its
    smallest enclosing circle; each fills the other two outlines at most about 0.8 even when blurred.
    """
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull = cv2.convexHull(max(contours, key=cv2.contourArea))
    area = cv2.contourArea(hull)
    triangle_area, _ = cv2.minEnclosingTriangle(hull.astype(np.float32))
    (_, _), (width, height), _ = cv2.minAreaRect(hull)
    (_, _), radius = cv2.minEnclosingCircle(hull)
    fills = {"triangle": area / max(triangle_area, 1e-6), "square": area / max(width * height, 1e-6),
             "circle": area / max(np.pi * radius**2, 1e-6)}
    return max(fills, key=fills.get)


@dataclass(frozen=True)
class DetectedShape:
    """A shape found in an image: kind, colour name, centre (x, y) in pixels, area in pixels."""

    kind: str
    colour: str
    centre: tuple[float, float]
    area: int


def detect_shapes(image: Image.Image | np.ndarray, min_area: float = 0.004) -> list[DetectedShape]:
    """Find flat-coloured shapes on a flat background, left to right.

    Each foreground pixel takes its nearest palette colour; each colour's pixels are opened (dropping the
    blended rims of other shapes) and split into connected parts larger than `min_area` of the image. A
    part's kind is judged on all foreground pixels next to it, so opening does not blunt its corners.
    """
    foreground = foreground_mask(image)
    array = as_rgb_array(image).astype(np.float32)
    labels = np.linalg.norm(array[:, :, None, :] - _PALETTE_RGB, axis=3).argmin(axis=2)  # (H, W)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    found = []
    for index, name in enumerate(_PALETTE_NAMES):
        pixels = cv2.morphologyEx((foreground & (labels == index)).astype(np.uint8), cv2.MORPH_OPEN, cross)
        count, parts, stats, centres = cv2.connectedComponentsWithStats(pixels, connectivity=4)
        for part in range(1, count):
            area = int(stats[part, cv2.CC_STAT_AREA])
            if area >= min_area * pixels.size:
                whole = foreground & (cv2.dilate((parts == part).astype(np.uint8), cross) > 0)
                kind = classify_shape(whole)
                found.append(DetectedShape(kind, name, (float(centres[part][0]), float(centres[part][1])), area))
    return sorted(found, key=lambda shape: shape.centre[0])


def _multiset_recall(expected: list, found: list) -> float:
    return sum((Counter(expected) & Counter(found)).values()) / max(len(expected), 1)


# scores that need the scene's positions, which a caption does not give (only the order from left to right):
# they measure a control, not a text-to-image model
IN_PLACE_SCORES = ("kind_in_place", "colour_in_place")


def shapes_in_place(found: Sequence[DetectedShape], spec: ShapesSpec, width: int, height: int,
                    reach: float = 0.5) -> list[DetectedShape | None]:
    """For each shape of the scene, the shape found at its place (None: nothing there).

    A found shape is at the place of a scene shape when its centre lies within `reach` circumradii of the scene
    shape's centre; the nearest such shape is taken."""
    placed = []
    for shape in spec.shapes:
        x, y = shape.centre[0] * width, shape.centre[1] * height
        near = [(np.hypot(item.centre[0] - x, item.centre[1] - y), index) for index, item in enumerate(found)]
        near = [(distance, index) for distance, index in near if distance <= reach * shape.size * width]
        placed.append(found[min(near)[1]] if near else None)
    return placed


def shape_scores(image: Image.Image | np.ndarray, spec: ShapesSpec) -> dict[str, float]:
    """How well an image draws a shapes-world scene.

    background: 1 if the border's colour is the spec's; colour / kind: share of the spec's shape colours
    / kinds found anywhere (as multisets); shape: (colour, kind) pairs found, over the larger of the two
    counts, so extra shapes cost; count: 1 if as many shapes are found as the spec has. In place: share of
    the spec's shapes with a shape of their kind (kind_in_place) or colour (colour_in_place) drawn at their
    place (`shapes_in_place`): a disc, or a blob of the right colour elsewhere, does not count.
    """
    found = detect_shapes(image)
    height, width = as_rgb_array(image).shape[:2]
    placed = shapes_in_place(found, spec, width, height)
    expected_pairs = [(shape.colour, shape.kind) for shape in spec.shapes]
    found_pairs = [(shape.colour, shape.kind) for shape in found]
    matched_pairs = sum((Counter(expected_pairs) & Counter(found_pairs)).values())
    return {
        "background": float(nearest_colour(background_rgb(image)) == spec.background),
        "colour": _multiset_recall([c for c, _ in expected_pairs], [c for c, _ in found_pairs]),
        "kind": _multiset_recall([k for _, k in expected_pairs], [k for _, k in found_pairs]),
        "shape": matched_pairs / max(len(expected_pairs), len(found_pairs), 1),
        "count": float(len(found) == len(spec.shapes)),
        "kind_in_place": _share(item is not None and item.kind == shape.kind
                                for item, shape in zip(placed, spec.shapes)),
        "colour_in_place": _share(item is not None and item.colour == shape.colour
                                  for item, shape in zip(placed, spec.shapes)),
    }


def _share(hits) -> float:
    hits = list(hits)
    return sum(hits) / max(len(hits), 1)


def mean_shape_scores(images: Sequence[Image.Image | np.ndarray], specs: Sequence[ShapesSpec]) -> dict[str, float]:
    """`shape_scores` averaged over images (accuracies over a set)."""
    if len(images) != len(specs) or not images:
        raise ControlNextError(f"need as many specs as images, and at least one: got {len(images)} and {len(specs)}")
    scores = [shape_scores(image, spec) for image, spec in zip(images, specs)]
    return {key: float(np.mean([score[key] for score in scores])) for key in scores[0]}
