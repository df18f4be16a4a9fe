"""Body, hand and face keypoints of every person, from mediapipe's bundled models, in the OpenPose convention.

mediapipe (extra `pose`) carries its models inside its wheel, so this works offline. People are found by
mediapipe's multi-person pose landmarker on the whole image and, for people too small for its 224-pixel
detector, on overlapping windows; hands and faces are then looked for in a window around each person's
wrists and head, so that small hands and faces are found too.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..errors import ControlNextError
from .arrays import rgb_array
from .mediapipe_models import (
    as_mediapipe_image,
    hand_landmarker,
    import_mediapipe,
    pose_landmarker,
    quiet_native_logs,
)
from .openpose_format import PersonKeypoints, draw_openpose

# OpenPose COCO point -> mediapipe pose landmark; the neck (None) is the midpoint of the shoulders.
MEDIAPIPE_TO_OPENPOSE = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
SHOULDERS = (11, 12)
HAND_POINTS = {"left": (15, 17, 19, 21), "right": (16, 18, 20, 22)}  # wrist, pinky, index, thumb (pose landmarks)
HEAD_POINTS = tuple(range(11))  # nose, eyes, ears, mouth
# Face mesh (468 points) -> the 68 dlib/OpenPose face points: jaw, brows, nose, eyes, outer and inner lips.
MEDIAPIPE_FACE_TO_68 = (
    234, 93, 132, 58, 172, 136, 150, 176, 152, 400, 379, 365, 397, 288, 361, 323, 454,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,
    78, 81, 13, 311, 308, 402, 14, 178,
)  # fmt: skip
DETECTABLE_HEIGHT = 0.3  # smallest person (fraction of the searched window's short side) the detector finds well
MIN_WINDOW = 96  # pixels: smaller search windows hold too little of a person
MIN_BODY_POINTS = 5  # visible landmarks a detection needs to count as a person
MIN_EXTENT = 0.05  # a person's size at least, as a fraction of the image's short side
WINDOW_PRESENCE = 0.7  # mean landmark presence a detection in a search window needs
BODY_TO_TORSO = 1.8  # a skeleton's extent (all 33 landmarks, seen or not) at least, in torso lengths
PRESENT = 0.5  # landmark presence above which a point is taken as predicted (on or off the image)


def detect_people(
    image: Image.Image,
    *,
    hands: bool = False,
    face: bool = False,
    min_visibility: float = 0.5,
    max_people: int = 8,
    min_person: float = 0.15,
) -> list[PersonKeypoints]:
    """Keypoints of each person in `image` in pixels (OpenPose COCO order), left to right; [] when none.

    `min_person` is the smallest person height searched for, as a fraction of the image's short side
    (smaller values search finer windows and take longer).
    """
    if not 0 <= min_visibility <= 1:
        raise ControlNextError(f"min_visibility must be within 0..1, got {min_visibility}")
    if not 1 <= max_people <= 32:
        raise ControlNextError(f"max_people must be within 1..32, got {max_people}")
    if not 0.02 <= min_person <= 1:
        raise ControlNextError(f"min_person must be within 0.02..1 (a fraction of the short side), got {min_person}")
    rgb = rgb_array(image)  # (h, w, 3)
    with quiet_native_logs():
        bodies = find_bodies(rgb, max_people, min_person, min_visibility)
        people = [PersonKeypoints(openpose_body(body, rgb.shape, min_visibility)) for body in bodies]
        if hands:
            with hand_landmarker() as model:
                for person, body in zip(people, bodies):
                    person.left_hand = find_hand(model, rgb, body, "left")
                    person.right_hand = find_hand(model, rgb, body, "right")
        if face:
            with import_mediapipe().solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1) as model:
                for person, body in zip(people, bodies):
                    person.face = find_face(model, rgb, body)
    return people


def find_bodies(rgb: np.ndarray, max_people: int, min_person: float, min_visibility: float) -> list[np.ndarray]:
    """33 mediapipe landmarks of each person, (33, 4) of x, y in pixels, visibility, presence; left to right."""
    height, width = rgb.shape[:2]
    found: list[np.ndarray] = []
    with pose_landmarker(max_people) as model:
        for left, top, side_x, side_y in search_windows(width, height, min_person):
            window = rgb[top : top + side_y, left : left + side_x]
            for landmarks in model.detect(as_mediapipe_image(window)).pose_landmarks:
                points = np.array([(p.x, p.y, p.visibility, p.presence) for p in landmarks], dtype=np.float64)
                whole = (side_x, side_y) == (width, height)
                if _plausible(points, whole, min(side_x, side_y)):
                    points[:, 0] = left + points[:, 0] * side_x
                    points[:, 1] = top + points[:, 1] * side_y
                    if _visible(points, (height, width), min_visibility).sum() >= MIN_BODY_POINTS:
                        found.append(points)
    people = _distinct(found, (height, width), min_visibility)[:max_people]
    return sorted(people, key=lambda body: float(np.median(body[:, 0])))


def search_windows(width: int, height: int, min_person: float) -> list[tuple[int, int, int, int]]:
    """(left, top, width, height) of the whole image, then of square windows halving in size, overlapping by
    half, until a person `min_person` times the short side tall fills enough of a window to be detected."""
    windows = [(0, 0, width, height)]
    short = min(width, height)
    side = short // 2
    while side >= MIN_WINDOW and DETECTABLE_HEIGHT * side * 2 > min_person * short:
        stride = side // 2
        lefts = range(0, max(width - side, 0) + 1, stride)
        tops = range(0, max(height - side, 0) + 1, stride)
        windows += [(left, top, side, side) for top in _reaching(tops, height - side) for left in _reaching(lefts, width - side)]
        side //= 2
    return windows


def _reaching(starts: range, last: int) -> list[int]:
    """Window starts that also cover the far edge."""
    values = list(starts)
    return values if values[-1] == last else [*values, last]


def _plausible(points: np.ndarray, whole: bool, window_side: int) -> bool:
    """Whether a detection (coordinates in [0, 1] of its window) is a person rather than a pattern.

    In a search window a detection must be confident (mean landmark presence), lie inside the window
    (parts of a larger person, cut by the window, give poor detections), and not be far smaller than
    the detector finds reliably there (the finer windows look for those).
    """
    present = points[points[:, 3] >= PRESENT]
    if len(present) < MIN_BODY_POINTS:
        return False
    torso = float(np.hypot(*((points[11, :2] + points[12, :2]) / 2 - (points[23, :2] + points[24, :2]) / 2)))
    if float(np.ptp(points[:, :2], axis=0).max()) < BODY_TO_TORSO * torso:
        return False  # limbs folded onto the trunk: a pattern the landmark model forced into a skeleton
    extent = float((present[:, :2].max(axis=0) - present[:, :2].min(axis=0)).max()) * window_side
    if whole:
        return extent >= MIN_EXTENT * window_side
    inside = ((present[:, :2] >= 0) & (present[:, :2] <= 1)).all(axis=1).mean()
    return points[:, 3].mean() >= WINDOW_PRESENCE and inside >= 0.9 and extent >= 0.8 * DETECTABLE_HEIGHT * window_side


def _visible(points: np.ndarray, shape: tuple[int, int], min_visibility: float) -> np.ndarray:
    inside = (points[:, 0] >= 0) & (points[:, 0] < shape[1]) & (points[:, 1] >= 0) & (points[:, 1] < shape[0])
    return inside & (points[:, 2] >= min_visibility)


def _distinct(found: list[np.ndarray], shape: tuple[int, int], min_visibility: float) -> list[np.ndarray]:
    """Drop detections of a person already found, and smaller "people" found inside a larger one's body
    (a window showing only someone's hands or belly); larger and more visible detections win."""
    ranked = sorted(found, key=lambda p: (-_box_side(p), -_visible(p, shape, min_visibility).sum()))
    kept: list[np.ndarray] = []
    for candidate in ranked:
        if not any(
            _same_person(candidate, other, shape, min_visibility) or _part_of(candidate, other) for other in kept
        ):
            kept.append(candidate)
    return kept


def _box(points: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) around the landmarks predicted to be present."""
    present = points[points[:, 3] >= PRESENT, :2]
    present = present if len(present) else points[:, :2]
    return np.concatenate([present.min(axis=0), present.max(axis=0)])


def _box_side(points: np.ndarray) -> float:
    box = _box(points)
    return float(max(box[2] - box[0], box[3] - box[1]))


def _part_of(small: np.ndarray, large: np.ndarray) -> bool:
    inner, outer = _box(small), _box(large)
    if _box_side(small) * 1.5 > _box_side(large):
        return False
    overlap = np.clip(np.minimum(inner[2:], outer[2:]) - np.maximum(inner[:2], outer[:2]), 0, None).prod()
    return overlap >= 0.8 * max(float((inner[2:] - inner[:2]).prod()), 1e-6)


def _same_person(a: np.ndarray, b: np.ndarray, shape: tuple[int, int], min_visibility: float) -> bool:
    shared = _visible(a, shape, min_visibility) & _visible(b, shape, min_visibility)
    if shared.sum() < 3:
        return False
    points = np.concatenate([a[shared, :2], b[shared, :2]])
    size = float(np.hypot(*(points.max(axis=0) - points.min(axis=0))))  # diagonal of both skeletons' box
    distance = float(np.median(np.hypot(*(a[shared, :2] - b[shared, :2]).T)))
    return distance < 0.1 * max(size, 1.0)


def openpose_body(landmarks: np.ndarray, shape: tuple[int, ...], min_visibility: float) -> np.ndarray:
    """33 mediapipe landmarks (33, 4) -> 18 OpenPose points (18, 3); hidden or off-image points get confidence 0.

    The neck is the midpoint of the shoulders, kept when it lies in the image even if a shoulder does not
    (a headshot whose shoulder leaves the frame keeps its neck).
    """
    visible = _visible(landmarks, shape[:2], min_visibility)
    body = np.zeros((18, 3))
    for index, source in enumerate(MEDIAPIPE_TO_OPENPOSE):
        if source is not None and visible[source]:
            body[index] = landmarks[source, :3]
    left, right = landmarks[SHOULDERS[0]], landmarks[SHOULDERS[1]]
    predicted = min(left[3], right[3]) >= PRESENT and min(left[2], right[2]) >= min_visibility
    neck = np.array([(left[0] + right[0]) / 2, (left[1] + right[1]) / 2, min(left[2], right[2])])
    if predicted and 0 <= neck[0] < shape[1] and 0 <= neck[1] < shape[0]:
        body[1] = neck
    return body


def _crop(rgb: np.ndarray, centre: np.ndarray, side: float) -> tuple[np.ndarray, int, int] | None:
    """The square window of `side` pixels around `centre`, clipped to the image, with its (left, top)."""
    half = side / 2
    left, top = max(0, int(centre[0] - half)), max(0, int(centre[1] - half))
    right, bottom = min(rgb.shape[1], int(math.ceil(centre[0] + half))), min(rgb.shape[0], int(math.ceil(centre[1] + half)))
    if right - left < 8 or bottom - top < 8:
        return None
    return rgb[top:bottom, left:right], left, top


def find_hand(model, rgb: np.ndarray, body: np.ndarray, side_name: str) -> np.ndarray | None:
    """21 hand points (21, 3) in pixels near this person's `side_name` wrist, or None when no hand is found there."""
    points = body[list(HAND_POINTS[side_name])]  # (4, 4): wrist, pinky, index, thumb
    wrist = points[0]
    if wrist[3] < PRESENT or not (0 <= wrist[0] < rgb.shape[1] and 0 <= wrist[1] < rgb.shape[0]):
        return None
    reach = float(np.hypot(*(points[1:, :2] - wrist[:2]).T).max())  # wrist to the farthest hand landmark
    window = _crop(rgb, points[:, :2].mean(axis=0), max(5.0 * reach, 32.0))
    if window is None:
        return None
    pixels, left, top = window
    found = model.detect(as_mediapipe_image(pixels)).hand_landmarks
    hands = [np.array([(left + p.x * pixels.shape[1], top + p.y * pixels.shape[0], 1.0) for p in hand]) for hand in found]
    if not hands:
        return None
    nearest = min(hands, key=lambda hand: float(np.hypot(*(hand[0, :2] - wrist[:2]))))
    if float(np.hypot(*(nearest[0, :2] - wrist[:2]))) > max(2.5 * reach, 16.0):
        return None  # another person's hand in the window
    return _inside(nearest, rgb.shape)


def find_face(model, rgb: np.ndarray, body: np.ndarray) -> np.ndarray | None:
    """68 face points (68, 3) in pixels in a window around this person's head, or None."""
    head = body[list(HEAD_POINTS)]
    present = head[head[:, 3] >= PRESENT]
    if len(present) < 3:
        return None
    extent = float(np.hypot(*(present[:, :2].max(axis=0) - present[:, :2].min(axis=0))))
    window = _crop(rgb, present[:, :2].mean(axis=0), max(2.5 * extent, 48.0))
    if window is None:
        return None
    pixels, left, top = window
    found = model.process(np.ascontiguousarray(pixels)).multi_face_landmarks
    if not found:
        return None
    mesh = np.array([(left + p.x * pixels.shape[1], top + p.y * pixels.shape[0], 1.0) for p in found[0].landmark])
    return _inside(mesh[list(MEDIAPIPE_FACE_TO_68)], rgb.shape)


def _inside(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    outside = (points[:, 0] < 0) | (points[:, 0] >= shape[1]) | (points[:, 1] < 0) | (points[:, 1] >= shape[0])
    points[outside, 2] = 0.0
    return points


def openpose(
    image: Image.Image,
    *,
    hands: bool = False,
    face: bool = False,
    min_visibility: float = 0.5,
    max_people: int = 8,
    min_person: float = 0.15,
) -> Image.Image:
    """Human pose of every person as OpenPose skeletons on black (18 body points; hands and face on request).

    Needs the `pose` extra (mediapipe, offline). People down to `min_person` times the image's short side
    are searched for; an image without a person gives a black condition.
    """
    people = detect_people(
        image, hands=hands, face=face, min_visibility=min_visibility, max_people=max_people, min_person=min_person
    )
    return draw_openpose(people, image.size, hands=hands, face=face)
