"""Video files and frame folders: round trips through PyAV and Pillow, and one line for each bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnext.errors import ControlNextError
from controlnext.videos import read_video, read_video_metadata, write_gif, write_mp4

pytest.importorskip("av")


def moving_square(count: int = 6, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    """A white square moving right on dark blue, one position per frame."""
    frames = []
    for k in range(count):
        image = Image.new("RGB", size, (10, 20, 120))
        ImageDraw.Draw(image).rectangle((4 + 6 * k, 12, 20 + 6 * k, 28), fill=(250, 250, 250))
        frames.append(image)
    return frames


def mean_error(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())


def test_mp4_round_trip_keeps_frames_rate_and_parameters(tmp_path):
    frames = moving_square()
    path = write_mp4(frames, tmp_path / "out" / "clip.mp4", fps=7.5, metadata={"seed": 3, "steps": 25})
    video = read_video(path)
    assert len(video.frames) == 6 and video.size == (64, 48) and video.fps == pytest.approx(7.5)
    assert max(mean_error(a, b) for a, b in zip(frames, video.frames)) < 4  # H.264 at crf 18: nearly lossless
    assert read_video_metadata(path) == {"seed": 3, "steps": 25}


def test_stride_and_limit_take_every_kth_frame(tmp_path):
    frames = moving_square(7)
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=8)
    video = read_video(path, stride=2, max_frames=3)
    assert len(video.frames) == 3 and video.fps == pytest.approx(4)
    for got, index in zip(video.frames, (0, 2, 4)):
        assert mean_error(got, frames[index]) < 4


def test_gif_and_frame_folder(tmp_path):
    frames = moving_square(4)
    gif = read_video(write_gif(frames, tmp_path / "clip.gif", fps=10))
    assert len(gif.frames) == 4 and gif.fps == pytest.approx(10)
    assert max(mean_error(a, b) for a, b in zip(frames, gif.frames)) < 4
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, frame in enumerate(frames):  # frame10 must follow frame2: natural order
        frame.save(folder / f"frame{[0, 2, 10, 11][k]}.png")
    video = read_video(folder, fps=12)
    assert video.fps == 12 and all(mean_error(a, b) == 0 for a, b in zip(frames, video.frames))


def sound_only(path):
    import wave

    with wave.open(str(path), "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(8000)
        sound.writeframes(b"\x00\x00" * 800)
    return path


def bad_input(tmp_path, kind: str):
    if kind == "missing":
        return tmp_path / "nothing.mp4"
    if kind == "unreadable":
        (tmp_path / "notes.mp4").write_text("not a video")
        return tmp_path / "notes.mp4"
    if kind == "empty file":
        (tmp_path / "empty.mp4").write_bytes(b"")
        return tmp_path / "empty.mp4"
    if kind == "sound only":
        return sound_only(tmp_path / "sound.wav")
    folder = tmp_path / kind.replace(" ", "-")
    folder.mkdir()
    if kind == "sizes differ":
        Image.new("RGB", (64, 48)).save(folder / "0.png")
        Image.new("RGB", (48, 64)).save(folder / "1.png")
    return folder


@pytest.mark.parametrize("kind, message", [
    ("missing", "video not found"),
    ("unreadable", "cannot read"),
    ("empty file", "cannot read"),
    ("sound only", "has no video stream"),
    ("empty folder", "holds no frames"),
    ("sizes differ", "differ in size (48x64, 64x48)"),
])  # fmt: skip
def test_bad_videos_give_one_line(tmp_path, kind, message):
    with pytest.raises(ControlNextError, match=r"^[^\n]+$") as error:
        read_video(bad_input(tmp_path, kind))
    assert message in str(error.value)


def test_odd_sides_cannot_become_mp4(tmp_path):
    with pytest.raises(ControlNextError, match="even frame sides"):
        write_mp4([Image.new("RGB", (63, 48))], tmp_path / "odd.mp4", fps=8)
