"""Reading and writing videos: the one place where video files and frame folders become frames.

Containers (MP4, MOV, MKV, WebM, AVI, GIF) are decoded and MP4 is encoded with PyAV (FFmpeg; extra
`video`); GIFs are written with Pillow; a folder of image files reads as frames in natural order
(`frame2.png` before `frame10.png`). Every frame is an RGB PIL image and all frames have one size.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ControlNextError, MissingDependencyError
from .images import load_image, to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif")
METADATA_KEY = "comment"  # the MP4 tag that carries the generation parameters as JSON


@dataclass
class Video:
    """Frames of one size (RGB) and their rate."""

    frames: list[Image.Image]
    fps: float
    source: str = ""

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size


def _av():
    try:
        import av
    except ImportError:
        raise MissingDependencyError("av (PyAV)", "video") from None
    return av


def natural_key(path: Path) -> list:
    """Sort key that orders the numbers inside names by value: frame2 before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of `folder` with one of `suffixes`, in natural order."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes), key=natural_key)


def read_video(
    path: str | Path,
    *,
    stride: int = 1,
    max_frames: int | None = None,
    fps: float | None = None,
) -> Video:
    """Every `stride`-th frame (up to `max_frames`) of a video file or a folder of frames.

    `fps` is the rate of a folder of frames (default 8); for a file it overrides the rate the file states.
    The returned rate is that of the frames read: the source's rate divided by `stride`.
    """
    path = Path(path)
    if stride < 1:
        raise ControlNextError(f"the frame stride must be at least 1, not {stride}")
    if max_frames is not None and max_frames < 1:
        raise ControlNextError(f"the frame limit must be at least 1, not {max_frames}")
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise ControlNextError(f"{path} holds no frames (image files {', '.join(IMAGE_SUFFIXES)}); "
                                   "give a video file or a folder of images")
        files = files[::stride][:max_frames]
        frames = [to_rgb(load_image(file)) for file in files]
        rate = fps or 8.0
    elif path.is_file():
        frames, rate = _decode(path, stride, max_frames)
        rate = fps or rate
    else:
        raise ControlNextError(f"video not found: {path}")
    if not frames:
        raise ControlNextError(f"{path} holds no video frames; give a video with at least one frame")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
        raise ControlNextError(f"the frames of {path} differ in size ({listed}); give frames of one size")
    return Video(frames, rate / stride, str(path))


def _decode(path: Path, stride: int, max_frames: int | None) -> tuple[list[Image.Image], float]:
    av = _av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise ControlNextError(f"cannot read {path} as a video ({_reason(error)}); give an MP4, GIF, "
                               "WebM or a folder of frames") from None
    with container:
        if not container.streams.video:
            raise ControlNextError(f"{path} has no video stream; give a video file")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 8)
        frames: list[Image.Image] = []
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index % stride == 0:
                    frames.append(frame.to_image().convert("RGB"))
                    if max_frames is not None and len(frames) >= max_frames:
                        break
        except av.error.FFmpegError as error:
            if not frames:
                raise ControlNextError(f"cannot decode {path} ({_reason(error)}); is it corrupt?") from None
            # a damaged tail: keep the frames decoded so far, as players do
    return frames, rate


def frame_count(path: str | Path) -> int:
    """How many frames a video file or frame folder holds (decoded when the container does not say)."""
    path = Path(path)
    if path.is_dir():
        return len(frame_files(path))
    if not path.is_file():
        raise ControlNextError(f"video not found: {path}")
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ControlNextError(f"{path} has no video stream; give a video file")
            stream = container.streams.video[0]
            return stream.frames or sum(1 for _ in container.decode(stream))
    except av.error.FFmpegError as error:
        raise ControlNextError(f"cannot read {path} as a video ({_reason(error)})") from None


def read_frames(path: str | Path, indices: list[int]) -> list[Image.Image]:
    """The frames at `indices` (any order, repeats allowed) of a video file or frame folder, as RGB images."""
    path = Path(path)
    wanted = set(indices)
    if path.is_dir():
        files = frame_files(path)
        found = {i: to_rgb(load_image(files[i])) for i in wanted if i < len(files)}
    else:
        av = _av()
        found = {}
        try:
            with av.open(str(path)) as container:
                for index, frame in enumerate(container.decode(video=0)):
                    if index in wanted:
                        found[index] = frame.to_image().convert("RGB")
                    if index >= max(wanted):
                        break
        except (av.error.FFmpegError, OSError) as error:
            raise ControlNextError(f"cannot read {path} as a video ({_reason(error)})") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise ControlNextError(f"{path} has no frame {missing[0]} (it holds {len(found)} of those asked for)")
    return [found[i] for i in indices]


def _reason(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text.splitlines()[0][:160]


def write_mp4(
    frames: list[Image.Image],
    path: str | Path,
    fps: float,
    metadata: dict | None = None,
    crf: int = 18,
) -> Path:
    """Encode frames as H.264 MP4 (yuv420p, plays everywhere); `metadata` is stored as JSON in its comment tag."""
    av = _av()
    path = Path(path)
    frames = _check_frames(frames)
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ControlNextError(f"MP4 (H.264, yuv420p) needs even frame sides, not {width}x{height}; "
                               "generate at a size that is a multiple of 8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        if metadata is not None:
            container.metadata[METADATA_KEY] = json.dumps(metadata)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.asarray(image, dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate  # frames without timestamps encode differently run to run
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder
    return path


def write_gif(frames: list[Image.Image], path: str | Path, fps: float) -> Path:
    """Write frames as a looping GIF (Pillow; adaptive palette per frame)."""
    path = Path(path)
    frames = _check_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = max(20, round(1000 / fps))  # ms per frame; browsers slow down anything under 20 ms
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0)
    return path


def read_video_metadata(path: str | Path) -> dict:
    """The parameters stored by `write_mp4(..., metadata=...)` in an MP4 file."""
    av = _av()
    with av.open(str(path)) as container:
        text = container.metadata.get(METADATA_KEY)
    if text is None:
        raise ControlNextError(f"{path} carries no controlnext parameters")
    return json.loads(text)


def _check_frames(frames: list[Image.Image]) -> list[Image.Image]:
    if not frames:
        raise ControlNextError("no frames to write")
    frames = [to_rgb(frame) for frame in frames]
    if len({frame.size for frame in frames}) > 1:
        raise ControlNextError("frames of different sizes cannot form one video")
    return frames
