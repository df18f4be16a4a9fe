"""Body (and hand, face) keypoints from mediapipe's bundled models, drawn in the OpenPose convention.

mediapipe (extra `pose`) carries its pose, hand and face models inside its wheel, so this works
offline. It finds one person per image (the most prominent).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import ControlNextError, MissingDependencyError
from .arrays import rgb_array
from .openpose_format import PersonKeypoints, draw_openpose

# OpenPose COCO point -> mediapipe pose landmark; the neck (None) is the midpoint of the shoulders.
MEDIAPIPE_TO_OPENPOSE = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
SHOULDERS = (11, 12)
# Face mesh (468 points) -> the 68 dlib/OpenPose face points: jaw, brows, nose, eyes, outer and inner lips.
MEDIAPIPE_FACE_TO_68 = (
    234, 93, 132, 58, 172, 136, 150, 176, 152, 400, 379, 365, 397, 288, 361, 323, 454,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,
    78, 81, 13, 311, 308, 402, 14, 178,
)  # fmt: skip


def _mediapipe():
    try:
        import mediapipe
    except ImportError:
        raise MissingDependencyError("mediapipe", "pose") from None
    return mediapipe


def detect_people(
    image: Image.Image, *, hands: bool = False, face: bool = False, min_visibility: float = 0.5
) -> list[PersonKeypoints]:
    """Keypoints of the person in `image` in pixels (OpenPose COCO order), or [] when none is found."""
    if not 0 <= min_visibility <= 1:
        raise ControlNextError(f"min_visibility must be within 0..1, got {min_visibility}")
    solutions = _mediapipe().solutions
    rgb = rgb_array(image)  # (h, w, 3)
    size = (rgb.shape[1], rgb.shape[0])
    if hands or face:
        with solutions.holistic.Holistic(static_image_mode=True, model_complexity=1) as model:
            found = model.process(rgb)
    else:
        with solutions.pose.Pose(static_image_mode=True, model_complexity=1) as model:
            found = model.process(rgb)
    if found.pose_landmarks is None:
        return []
    body = _body_keypoints(_landmarks(found.pose_landmarks, size), min_visibility)
    person = PersonKeypoints(body)
    if hands:
        person.left_hand = _optional(found.left_hand_landmarks, size)
        person.right_hand = _optional(found.right_hand_landmarks, size)
    if face and found.face_landmarks is not None:
        person.face = _landmarks(found.face_landmarks, size, with_visibility=False)[list(MEDIAPIPE_FACE_TO_68)]
    return [person]


def _landmarks(landmarks, size: tuple[int, int], with_visibility: bool = True) -> np.ndarray:
    """mediapipe landmark list -> (n, 3) of x, y in pixels and visibility; points off the image get 0."""
    rows = [(m.x * size[0], m.y * size[1], m.visibility if with_visibility else 1.0) for m in landmarks.landmark]
    points = np.array(rows, dtype=np.float64)  # (n, 3)
    outside = (points[:, 0] < 0) | (points[:, 0] >= size[0]) | (points[:, 1] < 0) | (points[:, 1] >= size[1])
    points[outside, 2] = 0.0
    return points


def _optional(landmarks, size: tuple[int, int]) -> np.ndarray | None:
    return None if landmarks is None else _landmarks(landmarks, size, with_visibility=False)


def _body_keypoints(landmarks: np.ndarray, min_visibility: float) -> np.ndarray:
    """33 mediapipe pose landmarks (n, 3) -> 18 OpenPose points (18, 3); weak points get confidence 0."""
    visible = landmarks.copy()
    visible[visible[:, 2] < min_visibility, 2] = 0.0
    body = np.zeros((18, 3))
    for index, source in enumerate(MEDIAPIPE_TO_OPENPOSE):
        if source is not None:
            body[index] = visible[source]
    left, right = visible[SHOULDERS[0]], visible[SHOULDERS[1]]
    if left[2] > 0 and right[2] > 0:
        body[1] = ((left[0] + right[0]) / 2, (left[1] + right[1]) / 2, min(left[2], right[2]))
    return body


def openpose(
    image: Image.Image, *, hands: bool = False, face: bool = False, min_visibility: float = 0.5
) -> Image.Image:
    """Human pose as an OpenPose skeleton on black (18 body points; hands and face on request), via mediapipe.

    Needs the `pose` extra. One person per image; an image without a person gives a black condition.
    """
    people = detect_people(image, hands=hands, face=face, min_visibility=min_visibility)
    return draw_openpose(people, image.size, hands=hands, face=face)
