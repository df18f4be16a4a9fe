"""Pose: mediapipe keypoints in OpenPose order on real photos, and drawing from OpenPose JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from annotator_helpers import array, shapes_image, shared_image
from PIL import Image

from controlnext.annotators import (
    annotate,
    detect_people,
    openpose_json_data,
    read_openpose_json,
    render_openpose_json,
)
from controlnext.annotators.openpose_format import BODY_COLORS, BODY_KEYPOINTS, FACE_POINT_COLOR, HAND_POINT_COLOR
from controlnext.errors import ControlNextError

point = {name: index for index, name in enumerate(BODY_KEYPOINTS)}


@pytest.fixture(scope="module")
def mediapipe():
    return pytest.importorskip("mediapipe")


@pytest.mark.parametrize("file", ["pose1.png", "human.png"])
def test_mediapipe_finds_one_person_with_plausible_keypoints(mediapipe, file):
    image = shared_image(file)
    people = detect_people(image)
    assert len(people) == 1
    body = people[0].body  # (18, 3)
    upper_body = ["nose", "neck", "right_shoulder", "left_shoulder", "right_eye", "left_eye", "right_hip", "left_hip"]
    assert all(body[point[name], 2] > 0 for name in upper_body)
    present = body[body[:, 2] > 0]
    assert (present[:, 0] >= 0).all() and (present[:, 0] < image.width).all() and (present[:, 1] < image.height).all()
    x, y = body[:, 0], body[:, 1]
    assert y[point["nose"]] < y[point["neck"]] < y[point["right_hip"]]  # head above shoulders above hips
    assert max(y[point["right_eye"]], y[point["left_eye"]]) < y[point["neck"]]
    assert x[point["right_shoulder"]] < x[point["neck"]] < x[point["left_shoulder"]]  # facing the camera
    shoulders_midpoint = (body[point["right_shoulder"], :2] + body[point["left_shoulder"], :2]) / 2
    np.testing.assert_allclose(body[point["neck"], :2], shoulders_midpoint)
    shoulder_width = x[point["left_shoulder"]] - x[point["right_shoulder"]]
    assert 0.15 * image.width < shoulder_width < 0.8 * image.width


def test_openpose_condition_draws_the_detected_keypoints_on_black(mediapipe):
    image = shared_image("human.png")
    body = detect_people(image)[0].body
    out = array(annotate("openpose", image))
    assert out.shape == (image.height, image.width, 3)
    for name in ("neck", "right_shoulder", "left_hip"):
        x, y = body[point[name], :2].astype(int)
        assert tuple(out[y, x]) == BODY_COLORS[point[name]]
    assert (out.max(axis=2) == 0).mean() > 0.85  # black background


def test_hands_and_face_on_request(mediapipe):
    image = shared_image("pose1.png")
    person = detect_people(image, hands=True, face=True)[0]
    assert person.face.shape == (68, 3)
    assert person.left_hand is not None or person.right_hand is not None
    body_only = array(annotate("openpose", image))
    full = array(annotate("openpose", image, hands=True, face=True))
    white = (full == 255).all(axis=2)
    blue = (full == HAND_POINT_COLOR).all(axis=2)
    assert white.sum() > 100 and blue.sum() > 100
    assert not (body_only == 255).all(axis=2).any() and not (body_only == HAND_POINT_COLOR).all(axis=2).any()


def test_detected_pose_round_trips_through_openpose_json(mediapipe, tmp_path):
    image = shared_image("pose1.png")
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(openpose_json_data(detect_people(image), image.size)))
    from_json = array(annotate("openpose_json", image, json_path=str(path)))
    assert np.array_equal(from_json, array(annotate("openpose", image)))


def test_no_person_gives_a_black_condition(mediapipe):
    out = array(annotate("openpose", shapes_image(96, 96)))
    assert out.max() == 0


def pose_json(points: dict[str, tuple[float, float]], **extra) -> dict:
    flat = np.zeros((18, 3))
    for name, (x, y) in points.items():
        flat[point[name]] = (x, y, 1.0)
    return {"people": [{"pose_keypoints_2d": flat.reshape(-1).tolist(), **extra}]}


ARM = {
    "nose": (256, 100), "neck": (256, 160), "right_shoulder": (196, 160), "left_shoulder": (316, 160),
    "right_elbow": (196, 260),
}  # fmt: skip


def test_json_keypoints_are_drawn_in_openpose_colours_at_their_places(tmp_path):
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(pose_json(ARM)))
    out = array(annotate("openpose_json", Image.new("RGB", (512, 512)), json_path=str(path)))
    for name, (x, y) in ARM.items():
        assert tuple(out[y, x]) == BODY_COLORS[point[name]]  # each keypoint in its own colour
    assert tuple(out[160, 226]) == tuple(int(c * 0.6) for c in BODY_COLORS[0])  # neck-right shoulder: limb 0, 60%
    assert tuple(out[210, 196]) == tuple(int(c * 0.6) for c in BODY_COLORS[2])  # right upper arm: limb 2
    assert tuple(out[300, 300]) == (0, 0, 0) and tuple(out[160, 400]) == (0, 0, 0)  # nothing drawn elsewhere


@pytest.mark.parametrize(
    "scale, extra, size",
    [
        (1.0, {}, (512, 512)),  # pixels of the image
        (0.5, {"canvas_width": 256, "canvas_height": 256}, (512, 512)),  # pixels of a named canvas
        (1 / 512, {}, (512, 512)),  # normalised to [0, 1]
        (1.0, {"canvas_width": 512, "canvas_height": 512}, None),  # canvas size drawn as is
    ],
)
def test_json_coordinate_conventions(scale, extra, size):
    data = pose_json({k: (x * scale, y * scale) for k, (x, y) in ARM.items()})
    data.update(extra)
    out = array(render_openpose_json(data, size))
    assert out.shape == (512, 512, 3)
    assert tuple(out[100, 256]) == BODY_COLORS[point["nose"]]
    assert tuple(out[260, 196]) == BODY_COLORS[point["right_elbow"]]


def test_body25_hands_and_face_from_json():
    body25 = np.zeros((25, 3))
    body25[0] = (100, 50, 1)  # nose
    body25[8] = (100, 150, 1)  # mid hip: not an OpenPose COCO point
    body25[9] = (80, 150, 1)  # right hip -> COCO 8
    hand = np.zeros((21, 3))
    hand[0] = (40, 200, 1)
    hand[5] = (40, 230, 1)
    face = np.array([[150.0, 40.0, 1.0]])
    person = {
        "pose_keypoints_2d": body25.reshape(-1).tolist(),
        "hand_left_keypoints_2d": hand.reshape(-1).tolist(),
        "face_keypoints_2d": face.reshape(-1).tolist(),
    }
    data = {"people": [person], "canvas_width": 256, "canvas_height": 256}
    people, canvas, normalized = read_openpose_json(data)
    assert canvas == (256, 256) and not normalized
    np.testing.assert_array_equal(people[0].body[point["right_hip"]], (80, 150, 1))
    out = array(render_openpose_json(data))
    assert tuple(out[150, 80]) == BODY_COLORS[point["right_hip"]] and tuple(out[150, 100]) == (0, 0, 0)
    assert tuple(out[200, 40]) == HAND_POINT_COLOR and tuple(out[40, 150]) == FACE_POINT_COLOR
    assert out[215, 40].max() > 0  # the hand edge between the two hand points
    no_extras = array(render_openpose_json(data, hands=False, face=False))
    assert tuple(no_extras[200, 40]) == (0, 0, 0) and tuple(no_extras[40, 150]) == (0, 0, 0)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"persons": []}', "with a 'people' list"),
        ('{"people": [{"pose_keypoints_2d": [1, 2]}]}', "x, y, confidence triples"),
        ('{"people": [{"pose_keypoints_2d": [1, 2, 1, 3, 4, 1]}]}', "has 2 body keypoints; expected 18"),
        ('{"people": [{"face_keypoints_2d": []}]}', "has no pose_keypoints_2d"),
    ],
)
def test_bad_openpose_json(tmp_path, content, message):
    path = tmp_path / "pose.json"
    path.write_text(content)
    with pytest.raises(ControlNextError, match=message):
        annotate("openpose_json", Image.new("RGB", (64, 64)), json_path=str(path))


def test_missing_json_file_and_missing_canvas_size(tmp_path):
    with pytest.raises(ControlNextError, match="OpenPose JSON file not found"):
        annotate("openpose_json", Image.new("RGB", (64, 64)), json_path=str(tmp_path / "nope.json"))
    with pytest.raises(ControlNextError, match="names no canvas_width"):
        render_openpose_json(pose_json(ARM))


# -- several people, small people, partial bodies, quiet runs ---------------------------------------


def side_by_side(*images: Image.Image, gap: int = 100, background=(200, 200, 200)) -> Image.Image:
    """People from different photos standing next to each other on one canvas, each scaled to one height."""
    height = max(image.height for image in images)
    scaled = [image.convert("RGB").resize((round(image.width * height / image.height), height)) for image in images]
    canvas = Image.new("RGB", (sum(s.width for s in scaled) + gap * (len(scaled) - 1), height), background)
    left = 0
    for image in scaled:
        canvas.paste(image, (left, 0))
        left += image.width + gap
    return canvas


def test_every_person_is_found_and_drawn(mediapipe):
    group = side_by_side(shared_image("pose1.png"), shared_image("human.png"))
    people = detect_people(group)
    assert len(people) == 2
    necks = [person.body[point["neck"]] for person in people]
    assert all(neck[2] > 0 for neck in necks)
    assert necks[0][0] < group.width / 2 < necks[1][0]  # one in each half, left to right
    out = array(annotate("openpose", group))
    for neck in necks:
        assert tuple(out[int(neck[1]), int(neck[0])]) == BODY_COLORS[point["neck"]]


def test_hands_and_faces_of_every_person(mediapipe):
    people = detect_people(side_by_side(shared_image("pose1.png"), shared_image("human.png")), hands=True, face=True)
    assert all(person.face is not None and (person.face[:, 2] > 0).sum() > 50 for person in people)
    hands = [(person, hand) for person in people for hand in (person.left_hand, person.right_hand) if hand is not None]
    assert len(hands) >= 3
    for person, hand in hands:  # each hand starts at one of its owner's wrists
        wrists = person.body[[point["left_wrist"], point["right_wrist"]], :2]
        assert np.hypot(*(wrists - hand[0, :2]).T).min() < 60


def small_person(height_fraction: float) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A person `height_fraction` of the frame tall in a large 2400 x 1600 street photo; with their box."""
    street = shared_image("building.png").convert("RGB").resize((2400, 3600)).crop((0, 1000, 2400, 2600))
    person = shared_image("human.png").convert("RGB")
    height = round(1600 * height_fraction)
    person = person.resize((round(person.width * height / person.height), height))
    street.paste(person, (1500, 900))
    return street, (1500, 900, 1500 + person.width, 900 + height)


@pytest.mark.parametrize("fraction", [0.2, 0.15])
def test_a_small_person_in_a_large_frame_is_found(mediapipe, fraction):
    street, (x0, y0, x1, y1) = small_person(fraction)
    people = detect_people(street)
    assert len(people) == 1
    present = people[0].body[people[0].body[:, 2] > 0]
    assert len(present) >= 10
    assert (present[:, 0] > x0 - 20).all() and (present[:, 0] < x1 + 20).all() and (present[:, 1] > y0 - 20).all()


@pytest.mark.parametrize("file", ["building.png", "room.png", "dog.png", "toy.png", "bird.png"])
def test_no_person_is_found_where_there_is_none(mediapipe, file):
    assert detect_people(shared_image(file)) == []


def test_a_headshot_whose_shoulder_leaves_the_frame_keeps_its_neck(mediapipe):
    image = shared_image("man.png")  # the man's left shoulder is cut by the right edge
    body = detect_people(image)[0].body
    assert body[point["left_shoulder"], 2] == 0 and body[point["right_shoulder"], 2] > 0  # off the image: not drawn
    neck = body[point["neck"]]
    assert neck[2] > 0 and body[point["right_shoulder"], 0] < neck[0] < image.width
    assert body[point["nose"], 1] < neck[1]
    out = array(annotate("openpose", image))
    assert tuple(out[int(neck[1]), int(neck[0])]) == BODY_COLORS[point["neck"]]


def test_pose_options_are_checked(mediapipe):
    for options, message in [({"max_people": 0}, "max_people"), ({"min_person": 0.0}, "min_person")]:
        with pytest.raises(ControlNextError, match=message):
            annotate("openpose", shapes_image(), **options)


def test_openpose_prints_nothing(tmp_path, shared_images, mediapipe):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [sys.executable, "-m", "controlnext", "annotate", "openpose", str(shared_images / "pose1.png"),
            "-o", str(tmp_path / "pose.png"), "--option", "hands", "face"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.strip() == str(tmp_path / "pose.png")
