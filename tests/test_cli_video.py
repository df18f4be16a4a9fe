"""`controlnext video` and `controlnext annotate NAME VIDEO` end to end on a tiny Stable Video Diffusion model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnext.cli import main
from controlnext.videos import read_video, read_video_metadata, write_mp4

pytest.importorskip("av")


@pytest.fixture(scope="module")
def svd_base(tmp_path_factory):
    from controlnext.testing import save_tiny_svd_pipeline

    return save_tiny_svd_pipeline(tmp_path_factory.mktemp("tiny-svd"), num_frames=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "reference.png"
    image = Image.new("RGB", (80, 64), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((20, 8, 52, 56), fill=(230, 200, 60))
    image.save(path)
    return path


def pose_folder(folder, count: int, size=(64, 64), reference: bool = True):
    """Pose images (a bar moving down) after a stored reference pose, as `annotate openpose` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    if reference:
        Image.new("RGB", size, (255, 0, 0)).save(folder / "reference.png")
    for k in range(count):
        image = Image.new("RGB", size)
        ImageDraw.Draw(image).rectangle((8, 4 * k, 40, 4 * k + 10), fill=(0, 255, 0))
        image.save(folder / f"frame_{k:05d}.png")
    return folder


def video(tmp_path, svd_base, reference, *extra, name="out.mp4"):
    out = tmp_path / name
    argv = ["video", "--base", str(svd_base), "--reference", str(reference), "--width", "64", "--height", "64",
            "--steps", "2", "--no-progress", "-o", str(out), *extra]
    assert main(argv) == 0
    return out


def test_video_without_control_writes_mp4_gif_and_parameters(tmp_path, svd_base, reference):
    out = video(tmp_path, svd_base, reference, "--num-frames", "4", "--seed", "5", "--fps", "6",
                "--motion-bucket", "100", "--output-fps", "5")
    frames = read_video(out)
    assert len(frames.frames) == 4 and frames.size == (64, 64) and frames.fps == pytest.approx(5)
    assert len(read_video(out.with_suffix(".gif")).frames) == 4
    params = json.loads(out.with_suffix(".json").read_text())
    assert read_video_metadata(out) == params
    assert params["seed"] == 5 and params["fps"] == 6 and params["motion_bucket"] == 100 and params["num_frames"] == 4
    assert params["frames_per_window"] == 4 and params["windows"] == 1 and params["device"] == "cpu"
    again = video(tmp_path, svd_base, reference, "--num-frames", "4", "--seed", "5", "--fps", "6",
                  "--motion-bucket", "100", "--output-fps", "5", name="again.mp4")
    gifs = [read_video(path.with_suffix(".gif")).frames for path in (out, again)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*gifs))  # the same frames
    # x264 need not give the same bytes twice in one process, but the same picture
    difference = [np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean()
                  for a, b in zip(frames.frames, read_video(again).frames)]
    assert max(difference) < 4  # the round-trip bound of test_videos
    assert main(["video", "--base", str(svd_base), "--reference", str(reference), "--width", "64", "--height", "64",
                 "--steps", "1", "--num-frames", "4", "--no-progress", "--no-gif", "-o", str(tmp_path / "x.mp4")]) == 0
    assert not (tmp_path / "x.gif").exists()


def broken(tmp_path, kind):
    if kind == "unreadable":
        (tmp_path / "clip.mp4").write_text("not a video")
        return ["--driving", str(tmp_path / "clip.mp4")]
    if kind == "empty":
        (tmp_path / "frames").mkdir()
        return ["--driving", str(tmp_path / "frames")]
    if kind == "sizes":
        folder = pose_folder(tmp_path / "poses", 3)
        Image.new("RGB", (32, 64)).save(folder / "frame_00001.png")
        return ["--poses", str(folder)]
    if kind == "short":
        write_mp4([Image.new("RGB", (64, 64))] * 4, tmp_path / "short.mp4", fps=8)
        return ["--driving", str(tmp_path / "short.mp4"), "--frames-per-window", "6"]
    if kind == "frame count":
        return ["--poses", str(pose_folder(tmp_path / "poses", 3)), "--num-frames", "6"]
    return []


@pytest.mark.parametrize("kind, message", [
    ("unreadable", "cannot read"),
    ("empty", "holds no frames"),
    ("sizes", "differ in size"),
    ("short", "the driving video gives 2 frames at --stride 2 (3 with the reference), fewer than one window of 6"),
    ("frame count", "the frame count is that of the poses"),
])  # fmt: skip
def test_bad_input_gives_one_line_and_exit_2(tmp_path, svd_base, reference, capsys, kind, message):
    argv = ["video", "--base", str(svd_base), "--reference", str(reference), "--control", str(tmp_path),
            "--stride", "2", "-o", str(tmp_path / "x.mp4"), *broken(tmp_path, kind)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


@pytest.fixture
def person_video(tmp_path):
    """A real photo of a person sliding right over four frames."""
    from annotator_helpers import shared_image

    pytest.importorskip("mediapipe")
    person = shared_image("pose1.png").convert("RGB").resize((188, 286))
    frames = []
    for k in range(4):
        frame = Image.new("RGB", (224, 288), (90, 90, 90))
        frame.paste(person, (6 * k, 1))
        frames.append(frame)
    return write_mp4(frames, tmp_path / "driving.mp4", fps=8)


def test_annotate_openpose_video_writes_a_pose_per_frame(tmp_path, person_video):
    out = tmp_path / "poses"
    assert main(["annotate", "openpose", str(person_video), "-o", str(out), "--stride", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["frame_00000.json", "frame_00000.png", "frame_00001.json", "frame_00001.png"]
    first = json.loads((out / "frame_00000.json").read_text())
    assert (first["canvas_width"], first["canvas_height"]) == (224, 288) and len(first["people"]) == 1
    x = [json.loads((out / n).read_text())["people"][0]["pose_keypoints_2d"][3] for n in names[::2]]
    assert 8 < x[1] - x[0] < 16  # the neck moved with the person (two frames of 6 px)
    assert np.asarray(Image.open(out / "frame_00000.png")).any()


def test_annotate_canny_video_writes_a_condition_per_frame(tmp_path):
    frames = [Image.new("RGB", (64, 48), (20 * k, 0, 0)) for k in range(3)]
    for frame in frames:
        ImageDraw.Draw(frame).rectangle((10, 10, 30, 30), fill=(255, 255, 255))
    write_mp4(frames, tmp_path / "clip.mp4", fps=8)
    assert main(["annotate", "canny", str(tmp_path / "clip.mp4"), "-o", str(tmp_path / "edges")]) == 0
    assert sorted(p.name for p in (tmp_path / "edges").iterdir()) == [f"frame_0000{k}.png" for k in range(3)]


@pytest.fixture(scope="module")
def svd_control_folder(tmp_path_factory):
    """A ControlNeXt SVD-style control in our format that fits the tiny base (32 channels after down_blocks[0])."""
    from controlnext.control.loading import save_controlnext
    from controlnext.testing import tiny_svd_controlnext

    return save_controlnext(tmp_path_factory.mktemp("svd-control"), tiny_svd_controlnext(1))


def test_video_from_a_pose_folder_follows_the_poses(tmp_path, svd_base, reference, svd_control_folder):
    poses = pose_folder(tmp_path / "poses", 5)
    out = video(tmp_path, svd_base, reference, "--control", str(svd_control_folder), "--poses", str(poses),
                "--frames-per-window", "4", "--overlap", "2", "--save-poses", str(tmp_path / "seen"))
    assert len(read_video(out).frames) == 6  # the reference and five poses
    params = json.loads(out.with_suffix(".json").read_text())
    assert params["windows"] == 2 and params["overlap"] == 2 and params["poses"] == str(poses)
    seen = sorted((tmp_path / "seen").iterdir())
    assert len(seen) == 6 and Image.open(seen[0]).getpixel((0, 0)) == (255, 0, 0)  # the stored reference pose first
    plain = video(tmp_path, svd_base, reference, "--control", str(svd_control_folder), "--poses", str(poses),
                  "--frames-per-window", "4", "--overlap", "2", "--scale", "0", name="plain.mp4")
    difference = [np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean()
                  for a, b in zip(read_video(out).frames, read_video(plain).frames)]
    assert max(difference) > 1  # the control changed the video


def test_video_from_a_driving_video(tmp_path, svd_base, person_video, svd_control_folder):
    from annotator_helpers import IMAGES

    out = video(tmp_path, svd_base, IMAGES / "human.png", "--control", str(svd_control_folder), "--driving",
                str(person_video), "--stride", "1", "--save-poses", str(tmp_path / "seen"))
    assert len(read_video(out).frames) == 5 and read_video(out).fps == pytest.approx(8)  # the driving rate
    seen = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "seen").iterdir())]
    assert len(seen) == 5 and all(frame.any() for frame in seen)  # a pose in every condition
