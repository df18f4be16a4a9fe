"""Pose conditions in the OpenPose convention that pose controls are trained on, and OpenPose JSON.

Body: 18 keypoints in OpenPose COCO order, limbs as filled ellipses in the standard OpenPose colours at
60% brightness, keypoints as full-colour dots, on black. Hands: 21 points, edges coloured around the
hue circle, blue dots. Face: white dots. Sizes are those of a 512-pixel canvas, scaled with the image.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ..errors import ControlNextError
from .arrays import condition_image

BODY_KEYPOINTS = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip; keypoint i and limb i share colour i (limbs at 60% brightness)
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip; wrist to each finger's base, then along the finger (thumb first)
HAND_EDGE_COLORS = tuple(
    tuple(round(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)) for i in range(len(HAND_EDGES))
)
HAND_POINT_COLOR = (0, 0, 255)
FACE_POINT_COLOR = (255, 255, 255)
LIMB_BRIGHTNESS = 0.6
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)  # BODY_25 has MidHip at 8


@dataclass
class PersonKeypoints:
    """One person's keypoints in pixels, rows of (x, y, confidence); confidence 0 marks a missing point."""

    body: np.ndarray  # (18, 3), OpenPose COCO order
    left_hand: np.ndarray | None = None  # (21, 3), the person's left hand
    right_hand: np.ndarray | None = None  # (21, 3)
    face: np.ndarray | None = None  # (n, 3): 68 or 70 points

    def scaled(self, sx: float, sy: float) -> PersonKeypoints:
        def scale(points: np.ndarray | None) -> np.ndarray | None:
            return None if points is None else points * np.array([sx, sy, 1.0])

        return PersonKeypoints(scale(self.body), scale(self.left_hand), scale(self.right_hand), scale(self.face))


def draw_openpose(
    people: list[PersonKeypoints], size: tuple[int, int], *, hands: bool = True, face: bool = True
) -> Image.Image:
    """Draw people in the OpenPose style on a black (width, height) canvas; returns an RGB image."""
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    scale = min(width, height) / 512
    stick, dot = max(1, round(4 * scale)), max(1, round(4 * scale))
    for person in people:
        _draw_limbs(canvas, person.body, stick)
    for person in people:
        for index, (x, y, confidence) in enumerate(person.body):
            if confidence > 0:
                cv2.circle(canvas, (int(x), int(y)), dot, BODY_COLORS[index], thickness=-1)
    for person in people:
        if hands:
            for hand in (person.left_hand, person.right_hand):
                if hand is not None:
                    _draw_hand(canvas, hand, line=max(1, round(2 * scale)), dot=dot)
        if face and person.face is not None:
            for x, y, confidence in person.face:
                if confidence > 0:
                    cv2.circle(canvas, (int(x), int(y)), max(1, round(3 * scale)), FACE_POINT_COLOR, thickness=-1)
    return condition_image(canvas)


def _draw_limbs(canvas: np.ndarray, body: np.ndarray, stick: int) -> None:
    for index, (a, b) in enumerate(BODY_LIMBS):
        if body[a, 2] <= 0 or body[b, 2] <= 0:
            continue
        (xa, ya), (xb, yb) = body[a, :2], body[b, :2]
        length = math.hypot(xb - xa, yb - ya)
        angle = math.degrees(math.atan2(yb - ya, xb - xa))
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), stick), int(angle), 0, 360, 1)
        color = tuple(int(c * LIMB_BRIGHTNESS) for c in BODY_COLORS[index])
        cv2.fillConvexPoly(canvas, polygon, color)


def _draw_hand(canvas: np.ndarray, hand: np.ndarray, line: int, dot: int) -> None:
    for index, (a, b) in enumerate(HAND_EDGES):
        if hand[a, 2] > 0 and hand[b, 2] > 0:
            start, end = hand[a, :2].astype(int), hand[b, :2].astype(int)
            cv2.line(canvas, tuple(start), tuple(end), HAND_EDGE_COLORS[index], thickness=line)
    for x, y, confidence in hand:
        if confidence > 0:
            cv2.circle(canvas, (int(x), int(y)), dot, HAND_POINT_COLOR, thickness=-1)


def read_openpose_json(source: str | Path | dict) -> tuple[list[PersonKeypoints], tuple[int, int] | None, bool]:
    """Read OpenPose JSON (`people[].pose_keypoints_2d`, optional hands/face and canvas_width/height).

    Returns the people, the canvas size if the JSON names one, and whether the coordinates are
    normalised to [0, 1] (some editors write them so) rather than pixels.
    """
    data = _load_json(source) if not isinstance(source, dict) else source
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise ControlNextError(f"{_name(source)}: expected OpenPose JSON with a 'people' list")
    people = [_read_person(person, index, source) for index, person in enumerate(data["people"])]
    canvas = None
    if data.get("canvas_width") and data.get("canvas_height"):
        canvas = (int(data["canvas_width"]), int(data["canvas_height"]))
    coordinates = [p[p[:, 2] > 0, :2] for person in people
                   for p in (person.body, person.left_hand, person.right_hand, person.face) if p is not None]
    present = np.concatenate(coordinates) if coordinates else np.zeros((0, 2))
    normalized = bool(present.size) and float(present.max()) <= 1.0
    return people, canvas, normalized


def openpose_json_data(people: list[PersonKeypoints], size: tuple[int, int]) -> dict:
    """People -> OpenPose JSON data (pixels of a `size` canvas), e.g. to save a detected pose and edit it."""

    def flat(points: np.ndarray | None) -> list[float]:
        return [] if points is None else [round(float(v), 3) for v in points.reshape(-1)]

    return {
        "canvas_width": int(size[0]),
        "canvas_height": int(size[1]),
        "people": [
            {
                "pose_keypoints_2d": flat(person.body),
                "hand_left_keypoints_2d": flat(person.left_hand),
                "hand_right_keypoints_2d": flat(person.right_hand),
                "face_keypoints_2d": flat(person.face),
            }
            for person in people
        ],
    }


def render_openpose_json(
    source: str | Path | dict, size: tuple[int, int] | None = None, *, hands: bool = True, face: bool = True
) -> Image.Image:
    """Draw the people of an OpenPose JSON file at `size` (default: the canvas size the JSON names)."""
    people, canvas, normalized = read_openpose_json(source)
    size = size or canvas
    if size is None:
        raise ControlNextError(f"{_name(source)} names no canvas_width/canvas_height; give the size to draw at")
    origin = (1, 1) if normalized else (canvas or size)
    people = [person.scaled(size[0] / origin[0], size[1] / origin[1]) for person in people]
    return draw_openpose(people, size, hands=hands, face=face)


def openpose_json(image: Image.Image, *, json_path: str = "", hands: bool = True, face: bool = True) -> Image.Image:
    """Pose drawn from OpenPose JSON keypoints (`json_path`), to pose a figure by hand; the image sets the size.

    Keypoints are in pixels of the JSON's canvas_width x canvas_height when it names them, else in
    pixels of this image, or normalised to [0, 1]. BODY_25 bodies are reduced to the 18 COCO points.
    """
    if not json_path:
        raise ControlNextError("openpose_json needs json_path=<file.json> with OpenPose keypoints")
    return render_openpose_json(json_path, image.size, hands=hands, face=face)


def _read_person(person: Any, index: int, source: Any) -> PersonKeypoints:
    if not isinstance(person, dict) or "pose_keypoints_2d" not in person:
        raise ControlNextError(f"{_name(source)}: people[{index}] has no pose_keypoints_2d")
    body = _points(person["pose_keypoints_2d"], f"people[{index}].pose_keypoints_2d", source)
    if len(body) == 25:
        body = body[list(BODY25_TO_COCO18)]
    if len(body) != 18:
        raise ControlNextError(
            f"{_name(source)}: people[{index}] has {len(body)} body keypoints; expected 18 (COCO) or 25 (BODY_25)"
        )
    left_hand = _optional_points(person, "hand_left_keypoints_2d", index, source, 21)
    right_hand = _optional_points(person, "hand_right_keypoints_2d", index, source, 21)
    face = _optional_points(person, "face_keypoints_2d", index, source, None)
    return PersonKeypoints(body, left_hand, right_hand, face)


def _optional_points(person: dict, key: str, index: int, source: Any, count: int | None) -> np.ndarray | None:
    values = person.get(key)
    if not values:
        return None
    points = _points(values, f"people[{index}].{key}", source)
    if count is not None and len(points) != count:
        raise ControlNextError(f"{_name(source)}: people[{index}].{key} has {len(points)} points; expected {count}")
    return points


def _points(values: Any, where: str, source: Any) -> np.ndarray:
    try:
        flat = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ControlNextError(f"{_name(source)}: {where} must be a flat list of numbers x, y, confidence") from None
    if flat.ndim != 1 or flat.size % 3:
        raise ControlNextError(f"{_name(source)}: {where} must hold x, y, confidence triples (length a multiple of 3)")
    points = flat.reshape(-1, 3)  # (n, 3)
    points[(points[:, 0] == 0) & (points[:, 1] == 0), 2] = 0.0  # (0, 0) is OpenPose's "not found"
    return points


def _load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ControlNextError(f"OpenPose JSON file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ControlNextError(f"{path} is not valid JSON ({error})") from None


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else "OpenPose JSON"
