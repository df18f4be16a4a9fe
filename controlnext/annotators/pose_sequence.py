"""Pose sequences for video: the poses of a driving video, moved onto the reference image's body.

As in ControlNeXt's video release: the pose of every `stride`-th frame is detected, the driving body
is mapped onto the reference body by one linear map for the whole video (a least-squares fit of the
vertical coordinates of the body keypoints seen in both, the same scale horizontally, the horizontal
offset that fits best), and the sequence is drawn on the reference image's canvas. The control of a
video is `[reference pose] + driving poses`: frame 0 of the generated video is the reference image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ControlNextError
from ..images import fit_image, to_rgb
from .openpose_format import PersonKeypoints, draw_openpose, openpose_json_data, read_openpose_json

# Body points the fit uses (OpenPose COCO order): nose, neck, shoulders, hips, knees, ankles, eyes, ears.
# Elbows and wrists move the most between frames, so they would pull the fit away from the body's frame.
RETARGET_KEYPOINTS = (0, 1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)

Detector = Callable[[Image.Image], list[PersonKeypoints]]


@dataclass(frozen=True)
class Retarget:
    """x' = scale * x + offset[0], y' = scale * y + offset[1]: driving-frame pixels to reference pixels."""

    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)

    def apply(self, person: PersonKeypoints) -> PersonKeypoints:
        def move(points: np.ndarray | None) -> np.ndarray | None:
            if points is None:
                return None
            moved = points.copy()
            moved[:, :2] = points[:, :2] * self.scale + np.asarray(self.offset)
            return moved

        return PersonKeypoints(move(person.body), move(person.left_hand), move(person.right_hand), move(person.face))


def fit_retarget(reference_body: np.ndarray, bodies: Sequence[np.ndarray],
                 keypoints: Sequence[int] = RETARGET_KEYPOINTS) -> Retarget:
    """The linear map that puts the driving bodies (each (18, 3), pixels) onto the reference body (18, 3).

    Vertically a least-squares line y_ref = scale * y + b over every keypoint seen in the reference and in
    a frame; horizontally the same scale (pixels stay square) and the offset mean(x_ref - scale * x).
    """
    pairs = [(reference_body[i], body[i]) for body in bodies for i in keypoints
             if reference_body[i, 2] > 0 and body[i, 2] > 0]
    if len(pairs) < 2:
        raise ControlNextError("too few body keypoints are seen in both the reference image and the driving video "
                               "to fit the driving body onto the reference body; pass --no-retarget")
    reference = np.array([p[0][:2] for p in pairs])  # (n, 2)
    driving = np.array([p[1][:2] for p in pairs])  # (n, 2)
    if np.ptp(driving[:, 1]) < 1e-6:
        raise ControlNextError("the driving body's keypoints all lie on one line, so no scale fits; pass --no-retarget")
    scale, offset_y = np.polyfit(driving[:, 1], reference[:, 1], 1)
    offset_x = float(np.mean(reference[:, 0] - scale * driving[:, 0]))
    return Retarget(float(scale), (offset_x, float(offset_y)))


@dataclass
class PoseSequence:
    """The reference pose and the driving poses (one list of people per frame), on one canvas."""

    reference: list[PersonKeypoints]
    frames: list[list[PersonKeypoints]]
    size: tuple[int, int]  # (width, height) of the canvas the keypoints are in
    retarget: Retarget | None = None
    missing: list[int] = field(default_factory=list)  # driving frames where nobody was found

    def control_frames(self, hands: bool = True, face: bool = True) -> list[Image.Image]:
        """`[reference pose] + driving poses`, drawn in the OpenPose style on black (RGB, canvas size)."""
        people = [self.reference, *self.frames]
        return [draw_openpose(persons, self.size, hands=hands, face=face) for persons in people]

    def write(self, folder: str | Path, hands: bool = True, face: bool = True) -> list[Path]:
        """The driving poses as `frame_00000.png` + `frame_00000.json` (OpenPose JSON), and `reference.*`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        named = [("reference", self.reference)] if self.reference else []
        named += [(f"frame_{index:05d}", people) for index, people in enumerate(self.frames)]
        for name, people in named:
            draw_openpose(people, self.size, hands=hands, face=face).save(folder / f"{name}.png")
            (folder / f"{name}.json").write_text(json.dumps(openpose_json_data(people, self.size)))
            written.append(folder / f"{name}.png")
        return written


def mediapipe_detector(hands: bool = True, face: bool = True, **options) -> Detector:
    """The bundled offline detector (mediapipe, extra `pose`): the most prominent person of each frame, found in
    the whole frame (a driving video's dancer fills it; the finer search for small people costs every frame)."""
    from .mediapipe_pose import detect_people

    return partial(detect_people, hands=hands, face=face, **{"max_people": 1, "min_person": 0.3, **options})


def detect_sequence(frames: Sequence[Image.Image], detect: Detector, progress: bool = False) -> list[list[PersonKeypoints]]:
    """The person of each frame (the first the detector gives: mediapipe_detector's is the most prominent)."""
    from tqdm.auto import tqdm

    return [detect(to_rgb(frame))[:1] for frame in tqdm(frames, desc="poses", disable=not progress, leave=False)]


def sequence_from_video(
    reference: Image.Image | None,
    frames: Sequence[Image.Image],
    *,
    detect: Detector | None = None,
    retarget: bool = True,
    progress: bool = False,
) -> PoseSequence:
    """Detect the pose of the reference image and of each driving frame; map the driving body onto the reference's.

    Keypoints end up in the reference image's pixels: the canvas is the reference image. Without a
    reference the driving poses stay as found, on the frames' canvas.
    """
    detect = detect or mediapipe_detector()
    if not frames:
        raise ControlNextError("the driving video has no frames")
    people = detect_sequence(frames, detect, progress)
    if reference is None:
        if not any(people):
            raise ControlNextError(_NOBODY_DRIVING)
        return PoseSequence([], people, frames[0].size, None, [i for i, persons in enumerate(people) if not persons])
    reference_people = detect(to_rgb(reference))[:1]
    return _assemble(reference_people, people, reference.size, frames[0].size, retarget)


def sequence_from_folder(
    reference: Image.Image,
    folder: str | Path,
    *,
    detect: Detector | None = None,
    retarget: bool = True,
    hands: bool = True,
    face: bool = True,
) -> tuple[list[Image.Image], PoseSequence | None]:
    """Control frames from a folder of OpenPose JSON files, or of pose images; and the sequence, if JSON.

    JSON keypoints (pixels of their canvas, or normalised) are retargeted and drawn like detected ones.
    Pose images are control frames already; they follow the folder's `reference.png` if it has one (as
    `controlnext annotate` writes it), else the pose detected in the reference image.
    """
    from ..images import load_image
    from ..videos import frame_files

    folder = Path(folder)
    if not folder.is_dir():
        raise ControlNextError(f"pose folder not found: {folder}")
    detect = detect or mediapipe_detector(hands, face)
    files = [f for f in frame_files(folder, (".json",)) if f.stem != "reference"]
    if files:
        people, size = [], None
        for file in files:
            persons, canvas, normalized = read_openpose_json(file)
            canvas = (1, 1) if normalized else canvas
            if canvas is None:
                raise ControlNextError(f"{file} names no canvas_width/canvas_height; write them into the JSON")
            if size not in (None, canvas):
                raise ControlNextError(f"the pose files of {folder} have different canvases ({size[0]}x{size[1]} and "
                                       f"{canvas[0]}x{canvas[1]}); give the poses of one video")
            size = canvas
            people.append(persons[:1])
        if size == (1, 1):  # normalised keypoints: they span the reference canvas
            people = [[p.scaled(*reference.size) for p in persons] for persons in people]
            size = reference.size
        sequence = _assemble(detect(to_rgb(reference))[:1], people, reference.size, size, retarget)
        return sequence.control_frames(hands, face), sequence
    images = [f for f in frame_files(folder) if f.stem != "reference"]
    if not images:
        raise ControlNextError(f"{folder} holds neither OpenPose JSON files nor pose images")
    frames = [to_rgb(load_image(f)) for f in images]
    if len({frame.size for frame in frames}) > 1:
        raise ControlNextError(f"the pose images of {folder} differ in size; give the poses of one video")
    stored = [f for f in frame_files(folder) if f.stem == "reference"]
    if stored:
        first = to_rgb(load_image(stored[0]))
    else:
        people = detect(to_rgb(reference))[:1]
        if not people:
            raise ControlNextError(_NO_REFERENCE)
        first = draw_openpose(people, reference.size, hands=hands, face=face)
    return fit_frames([first, *frames], *reference.size), None


_NOBODY_DRIVING = "no person found in any frame of the driving video; give a video with a clearly visible person"
_NO_REFERENCE = ("no person found in the reference image; give a reference image with a clearly visible person "
                 "(or a pose folder with its reference.png)")


def _assemble(reference_people, people, canvas: tuple[int, int], driving_size: tuple[int, int],
              retarget: bool) -> PoseSequence:
    if not reference_people:
        raise ControlNextError(_NO_REFERENCE)
    missing = [index for index, persons in enumerate(people) if not persons]
    if len(missing) == len(people):
        raise ControlNextError(_NOBODY_DRIVING)
    if retarget:
        mapping = fit_retarget(reference_people[0].body, [persons[0].body for persons in people if persons])
    else:  # the driving frame's layout, covering the canvas and centred, as frames are cropped
        scale = max(canvas[0] / driving_size[0], canvas[1] / driving_size[1])
        mapping = Retarget(scale, ((canvas[0] - scale * driving_size[0]) / 2, (canvas[1] - scale * driving_size[1]) / 2))
    moved = [[mapping.apply(person) for person in persons] for persons in people]
    return PoseSequence(reference_people, moved, canvas, mapping if retarget else None, missing)


def fit_frames(frames: Sequence[Image.Image], width: int, height: int) -> list[Image.Image]:
    """Frames brought to (width, height) by covering and centre-cropping, as every condition is."""
    return [fit_image(to_rgb(frame), width, height) for frame in frames]
