"""One video generation, as `controlnext video` and the web app's Video tab run it.

A `VideoRequest` names the base, the control, the reference image and the motion to follow (a driving
video whose poses are detected and retargeted, or a pose folder); `conditions` turns it into the
reference frame and the condition frames, `generate_video` runs the pipeline and returns the frames
with every parameter, and `save_video` writes the MP4 (parameters in its metadata), GIF and JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from .errors import ControlNextError


@dataclass
class VideoRequest:
    """Everything one video depends on; `check()` refuses what cannot work without importing torch."""

    base: str
    reference: str
    control: str | None = None
    driving: str | None = None  # a video file or folder of frames: poses are detected and retargeted
    poses: str | None = None  # a folder of OpenPose JSON files or pose images
    stride: int = 2
    max_frames: int | None = None
    retarget: bool = True
    hands: bool = True
    face: bool = True
    scale: float = 1.0
    frames_per_window: int | None = None  # default: the base's frame count
    overlap: int | None = None  # default: a quarter of a window when the video needs several
    num_frames: int | None = None  # without a control only
    fps: int = 7
    output_fps: float | None = None
    motion_bucket: int = 127
    noise_aug: float = 0.02
    min_guidance: float = 3.0
    max_guidance: float = 3.0
    steps: int = 25
    decode_chunk: int = 8
    seed: int = 0
    width: int | None = None
    height: int | None = None
    variant: str | None = None
    allow_pickle: bool = False
    allow_download: bool = False
    cache_dir: str | None = None
    device: str = "auto"
    dtype: str | None = None
    cpu_offload: bool = False

    def check(self) -> VideoRequest:
        positive = {"stride": self.stride, "steps": self.steps, "decode-chunk": self.decode_chunk,
                    "max-frames": self.max_frames, "frames-per-window": self.frames_per_window,
                    "num-frames": self.num_frames, "fps": self.fps, "output-fps": self.output_fps}
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ControlNextError(f"--{name} must be positive, not {value}")
        if self.driving and self.poses:
            raise ControlNextError("give --driving or --poses, not both")
        if self.control and not (self.driving or self.poses):
            raise ControlNextError("--control needs the motion to follow: pass --driving VIDEO or --poses FOLDER")
        if (self.driving or self.poses) and not self.control:
            raise ControlNextError("--driving/--poses need a pose control: pass --control")
        if self.control and self.num_frames:
            raise ControlNextError("with a control the frame count is that of the poses; drop --num-frames "
                                   "(use --max-frames to shorten)")
        if not 0 <= self.motion_bucket <= 255:
            raise ControlNextError(f"--motion-bucket must lie in 0..255, not {self.motion_bucket}")
        if self.noise_aug < 0:
            raise ControlNextError(f"--noise-aug must not be negative, not {self.noise_aug}")
        if self.overlap is not None and self.overlap < 0:
            raise ControlNextError(f"--overlap must not be negative, not {self.overlap}")
        return self

    def parameters(self, **resolved) -> dict:
        """The request with what was resolved for it (sizes, frame count, windows, device...), for the files."""
        from . import __version__

        return {"version": __version__, **asdict(self), **resolved}


@dataclass
class VideoConditions:
    """The reference frame at the video size, the condition frames and the rate of the driving video."""

    reference: Image.Image
    frames: list[Image.Image] = field(default_factory=list)  # [reference pose] + driving poses; empty: no control
    source_fps: float | None = None
    note: str = ""


@dataclass
class VideoResult:
    frames: list[Image.Image]
    fps: float
    conditions: list[Image.Image]
    parameters: dict
    note: str = ""


def default_size(reference_size: tuple[int, int]) -> tuple[int, int]:
    """1024 x 576, turned upright for a portrait reference."""
    return (576, 1024) if reference_size[1] > reference_size[0] else (1024, 576)


def base_frame_count(base: str, cache_dir: str | None = None) -> int:
    """The frame count the base UNet was trained on, read from its config without loading weights."""
    from diffusers import UNetSpatioTemporalConditionModel

    try:
        config = UNetSpatioTemporalConditionModel.load_config(base, subfolder="unet", local_files_only=True,
                                                              cache_dir=cache_dir)
    except (OSError, ValueError):
        raise ControlNextError(f"no Stable Video Diffusion UNet config in {base} (expected unet/config.json); give a "
                               "diffusers StableVideoDiffusionPipeline folder or a cached model id") from None
    return int(config.get("num_frames", 25))


def window_of(request: VideoRequest, num_frames: int) -> tuple[int, int]:
    """(frames per window, overlap) for a video of `num_frames` frames."""
    window = request.frames_per_window or base_frame_count(request.base, request.cache_dir)
    if request.overlap is not None:
        return window, request.overlap
    return window, 0 if num_frames <= window else max(1, window // 4)


def conditions(request: VideoRequest, reference: Image.Image | None = None, progress: bool = False) -> VideoConditions:
    """The reference at the video size and the condition frames: detected, retargeted, drawn poses of the driving
    video, or the pose folder's; a driving video shorter than one window is refused before any detection."""
    from .annotators.pose_sequence import mediapipe_detector, sequence_from_folder, sequence_from_video
    from .images import check_size, fit_image, load_image, to_rgb
    from .videos import read_video

    reference = to_rgb(reference if reference is not None else load_image(request.reference))
    width, height = default_size(reference.size)
    width, height = request.width or width, request.height or height
    check_size(width, height, 8, "video")
    reference = fit_image(reference, width, height)
    detect = mediapipe_detector(request.hands, request.face)
    if request.driving:
        driving = read_video(request.driving, stride=request.stride, max_frames=request.max_frames)
        count = 1 + len(driving.frames)
        window, _ = window_of(request, count)
        if count < window:
            raise ControlNextError(
                f"the driving video gives {count - 1} frames at --stride {request.stride} ({count} with the "
                f"reference), fewer than one window of {window}; give a longer video, a smaller --stride or "
                f"--frames-per-window {count}")
        sequence = sequence_from_video(reference, driving.frames, detect=detect, retarget=request.retarget,
                                       progress=progress)
        note = (f"nobody found in {len(sequence.missing)} of {len(driving.frames)} driving frames (drawn black)"
                if sequence.missing else "")
        return VideoConditions(reference, sequence.control_frames(request.hands, request.face), driving.fps, note)
    if request.poses:
        frames, _ = sequence_from_folder(reference, request.poses, detect=detect, retarget=request.retarget,
                                         hands=request.hands, face=request.face)
        return VideoConditions(reference, frames)
    return VideoConditions(reference)


def load_video_pipeline(request: VideoRequest):
    """The ControlledVideoPipeline the request's base and control make, on its device and dtype."""
    from .devices import default_dtype, resolve_device
    from .pipelines.base import resolve_dtype
    from .pipelines.video import ControlledVideoPipeline

    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype or default_dtype(device), device)
    return ControlledVideoPipeline.from_pretrained(
        request.base, [request.control] if request.control else [], device=device, dtype=dtype,
        cpu_offload=request.cpu_offload, allow_pickle=request.allow_pickle, allow_download=request.allow_download,
        cache_dir=request.cache_dir, **({"variant": request.variant} if request.variant else {}),
    )


def generate_video(request: VideoRequest, prepared: VideoConditions | None = None,
                   load: Callable = load_video_pipeline, progress: bool = False) -> VideoResult:
    """Run one request (its conditions made here unless given) through the pipeline `load` returns."""
    import torch

    from .pipelines.video import plan_windows

    prepared = prepared or conditions(request.check(), progress=progress)
    width, height = prepared.reference.size
    num_frames = len(prepared.frames) or request.num_frames or base_frame_count(request.base, request.cache_dir)
    window, overlap = window_of(request, num_frames)
    windows = plan_windows(num_frames, window, overlap)
    pipe = load(request)
    result = pipe(
        prepared.reference, control_frames=prepared.frames or None, control_scales=request.scale,
        frames_per_window=window, overlap=overlap, progress=progress, width=width, height=height,
        num_frames=num_frames, num_inference_steps=request.steps, min_guidance_scale=request.min_guidance,
        max_guidance_scale=request.max_guidance, fps=request.fps, motion_bucket_id=request.motion_bucket,
        noise_aug_strength=request.noise_aug, decode_chunk_size=request.decode_chunk,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    )
    fps = request.output_fps or prepared.source_fps or float(request.fps)
    device = str(pipe.pipe._execution_device)
    parameters = request.parameters(
        width=width, height=height, num_frames=num_frames, frames_per_window=window, overlap=overlap,
        windows=len(windows), output_fps=fps, device=device, dtype=str(pipe.pipe.unet.dtype).removeprefix("torch."))
    return VideoResult(result.frames[0], fps, prepared.frames, parameters, prepared.note)


def save_video(result: VideoResult, output: str | Path, gif: bool = True) -> list[Path]:
    """The MP4 (parameters in its metadata), the GIF and the JSON of parameters beside it."""
    from .videos import write_gif, write_mp4

    output = Path(output)
    written = [write_mp4(result.frames, output, result.fps, metadata=result.parameters)]
    if gif:
        written.append(write_gif(result.frames, output.with_suffix(".gif"), result.fps))
    output.with_suffix(".json").write_text(json.dumps(result.parameters, indent=2))
    return [*written, output.with_suffix(".json")]
