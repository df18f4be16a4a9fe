"""Pose sequences from a driving video: the linear fit onto the reference body, drawing, files, bad input.

A scripted detector stands in for mediapipe (which finds nobody in synthetic pictures): it returns the
skeleton the test gave each frame, so the retargeting is checked against numbers known in advance.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controlnext.annotators.openpose_format import PersonKeypoints, draw_openpose
from controlnext.annotators.pose_sequence import (RETARGET_KEYPOINTS, Retarget, fit_retarget, sequence_from_folder,
                                                  sequence_from_video)
from controlnext.errors import ControlNextError

# A standing person in a 64 x 96 frame (x, y, confidence), OpenPose COCO order.
STANDING = np.array([
    [32, 12, 1], [32, 22, 1], [24, 22, 1], [20, 34, 1], [18, 46, 1], [40, 22, 1], [44, 34, 1], [46, 46, 1],
    [27, 48, 1], [27, 66, 1], [27, 84, 1], [37, 48, 1], [37, 66, 1], [37, 84, 1], [30, 10, 1], [34, 10, 1],
    [28, 11, 1], [36, 11, 1],
], dtype=float)  # fmt: skip


def person(body: np.ndarray) -> PersonKeypoints:
    return PersonKeypoints(body.copy())


def moved(body: np.ndarray, scale: float, dx: float, dy: float) -> np.ndarray:
    out = body.copy()
    out[:, :2] = body[:, :2] * scale + (dx, dy)
    return out


class ScriptedDetector:
    """Returns the next scripted list of people for each call (the reference image comes last)."""

    def __init__(self, per_call: list[list[PersonKeypoints]]):
        self.per_call = list(per_call)

    def __call__(self, image: Image.Image) -> list[PersonKeypoints]:
        return self.per_call.pop(0)


def test_fit_maps_a_known_skeleton_onto_the_reference():
    driving = [moved(STANDING, 1.0, 3 * k, 0) for k in range(4)]  # walking right, same size
    reference = moved(STANDING, 2.0, 10, -4)  # the reference body: twice as tall, elsewhere
    fit = fit_retarget(reference, driving)
    # the fit goes through the mean of the driving x positions (walking 0..9 px): x' = 2x + 10 - 2 * 4.5
    assert fit.scale == pytest.approx(2.0) and fit.offset == pytest.approx((10 - 9.0, -4))
    first = fit.apply(person(driving[0]))
    assert np.allclose(first.body[:, :2], reference[:, :2] - (9.0, 0))  # wrists too, though not fitted
    assert np.array_equal(first.body[:, 2], driving[0][:, 2])


def test_fit_ignores_points_missing_in_either_body():
    reference = moved(STANDING, 0.5, 5, 5)
    driving = STANDING.copy()
    driving[[0, 14, 15], 2] = 0  # nose and eyes not found
    driving[[0, 14, 15], :2] = 999  # ... at a place that would spoil the fit
    reference[8, 2] = 0
    fit = fit_retarget(reference, [driving])
    assert fit.scale == pytest.approx(0.5) and fit.offset == pytest.approx((5, 5))


def test_fit_needs_keypoints_seen_in_both():
    reference = STANDING.copy()
    reference[list(RETARGET_KEYPOINTS), 2] = 0
    with pytest.raises(ControlNextError, match="too few body keypoints"):
        fit_retarget(reference, [STANDING])


def test_sequence_is_reference_pose_then_driving_poses_on_the_reference_canvas():
    reference = Image.new("RGB", (128, 192))
    frames = [Image.new("RGB", (64, 96)) for _ in range(3)]
    driving = [moved(STANDING, 1.0, k, 0) for k in range(3)]
    reference_body = moved(STANDING, 2.0, 0, 0)
    detector = ScriptedDetector([[person(b)] for b in driving[:1]] + [[]] + [[person(driving[2])], [person(reference_body)]])
    sequence = sequence_from_video(reference, frames, detect=detector)
    assert sequence.size == (128, 192) and sequence.missing == [1]
    controls = sequence.control_frames()
    assert len(controls) == 4 and all(frame.size == (128, 192) for frame in controls)
    assert np.array_equal(np.asarray(controls[0]), np.asarray(draw_openpose([person(reference_body)], (128, 192))))
    assert not np.asarray(controls[2]).any()  # nobody found in driving frame 1: a black condition
    assert sequence.retarget.scale == pytest.approx(2.0)


def test_without_retargeting_frames_cover_the_canvas():
    detector = ScriptedDetector([[person(STANDING)], [person(STANDING)]])
    sequence = sequence_from_video(Image.new("RGB", (128, 96)), [Image.new("RGB", (64, 96))], detect=detector,
                                   retarget=False)
    assert sequence.retarget is None
    assert np.allclose(sequence.frames[0][0].body[:, :2], STANDING[:, :2] * 2 - (0, 48))  # cover, centre-crop


def test_written_sequence_reads_back_from_its_json_files(tmp_path):
    driving = [moved(STANDING, 1.0, k, 2 * k) for k in range(3)]
    detector = ScriptedDetector([[person(b)] for b in driving] + [[person(STANDING)]])
    sequence = sequence_from_video(Image.new("RGB", (64, 96)), [Image.new("RGB", (64, 96))] * 3, detect=detector)
    sequence.write(tmp_path / "poses")
    names = sorted(p.name for p in (tmp_path / "poses").iterdir())
    assert names[:2] == ["frame_00000.json", "frame_00000.png"] and "reference.json" in names
    again = ScriptedDetector([[person(STANDING)]])
    frames, read = sequence_from_folder(Image.new("RGB", (64, 96)), tmp_path / "poses", detect=again)
    assert len(frames) == 4 and read.retarget.scale == pytest.approx(1.0, abs=1e-4)  # written on the reference
    for a, b in zip(frames, sequence.control_frames()):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean() < 1


def test_pose_images_follow_the_stored_reference_pose(tmp_path):
    folder = tmp_path / "poses"
    folder.mkdir()
    Image.new("RGB", (32, 48), (255, 0, 0)).save(folder / "reference.png")
    for k in range(2):
        Image.new("RGB", (32, 48), (0, 80 * (k + 1), 0)).save(folder / f"{k}.png")
    frames, sequence = sequence_from_folder(Image.new("RGB", (64, 96)), folder, detect=ScriptedDetector([]))
    assert sequence is None and [f.getpixel((0, 0)) for f in frames] == [(255, 0, 0), (0, 80, 0), (0, 160, 0)]
    assert all(f.size == (64, 96) for f in frames)


@pytest.mark.parametrize("reference_people, driving_people, message", [
    ([], [[person(STANDING)]], "no person found in the reference image"),
    ([person(STANDING)], [[]], "no person found in any frame"),
])  # fmt: skip
def test_nobody_to_follow_gives_one_line(reference_people, driving_people, message):
    detector = ScriptedDetector([*driving_people, reference_people])
    with pytest.raises(ControlNextError, match=message):
        sequence_from_video(Image.new("RGB", (64, 96)), [Image.new("RGB", (64, 96))], detect=detector)


def test_retarget_is_the_identity_by_default():
    assert np.array_equal(Retarget().apply(person(STANDING)).body, STANDING)
