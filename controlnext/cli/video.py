"""`controlnext video`: animate a reference image with the poses of a driving video (Stable Video Diffusion).

Writes an MP4 (the parameters in its metadata), a GIF and a JSON of every parameter beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """Animate a reference image with Stable Video Diffusion and a ControlNeXt pose control: the pose of
every --stride-th frame of --driving is detected (mediapipe, offline), mapped onto the reference body and
drawn; frame k of the video follows pose k. --poses takes a folder of OpenPose JSON files or pose images
instead (as `controlnext annotate openpose VIDEO -o FOLDER` writes). Long videos are denoised in sliding
windows of --frames-per-window frames sharing --overlap frames."""


def add_parser(subparsers, parent) -> None:
    p = subparsers.add_parser("video", parents=[parent], description=DESCRIPTION,
                              help="animate a reference image with the poses of a driving video")
    p.add_argument("--base", required=True, help="Stable Video Diffusion model: a diffusers folder or a model id in "
                   "the offline Hugging Face cache (e.g. stabilityai/stable-video-diffusion-img2vid-xt-1-1)")
    p.add_argument("--control", "-c", default=None, metavar="PATH", help="ControlNeXt SVD control: our folder, or the "
                   "official release folder (controlnet.bin + unet.bin with --allow-pickle, or their safetensors)")
    p.add_argument("--reference", "-r", required=True, metavar="IMAGE", help="the image to animate (frame 0)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--driving", "-d", metavar="VIDEO", help="driving video: MP4, GIF, WebM or a folder of frames")
    source.add_argument("--poses", metavar="FOLDER", help="pose sequence: OpenPose JSON files or pose images")
    p.add_argument("--stride", type=int, default=2, help="take every k-th driving frame (default: 2)")
    p.add_argument("--max-frames", type=int, default=None, help="use at most this many driving frames")
    p.add_argument("--no-retarget", dest="retarget", action="store_false",
                   help="keep the driving body's size and place instead of fitting it onto the reference body")
    p.add_argument("--no-hands", dest="hands", action="store_false", help="draw the body without hands")
    p.add_argument("--no-face", dest="face", action="store_false", help="draw the body without face points")
    p.add_argument("--scale", type=float, default=1.0, help="control strength (default: 1.0)")
    p.add_argument("--frames-per-window", type=int, default=None,
                   help="frames denoised together (default: the base's frame count, 14 or 25)")
    p.add_argument("--overlap", type=int, default=None, help="frames shared by neighbouring windows "
                   "(default: a quarter of a window)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames to generate without a control (default: the base's frame count)")
    p.add_argument("--fps", type=int, default=7, help="frame-rate conditioning of the base (default: 7)")
    p.add_argument("--output-fps", type=float, default=None,
                   help="frame rate of the files (default: the driving video's rate over --stride, else --fps)")
    p.add_argument("--motion-bucket", type=int, default=127, help="motion conditioning, 0-255 (default: 127)")
    p.add_argument("--noise-aug", type=float, default=0.02,
                   help="noise added to the reference image (default: 0.02)")
    p.add_argument("--min-guidance", type=float, default=3.0, help="guidance of the first frame (default: 3.0)")
    p.add_argument("--max-guidance", type=float, default=3.0,
                   help="guidance of the last frame; it rises linearly in between (default: 3.0)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    p.add_argument("--decode-chunk", type=int, default=8, help="frames the VAE decodes at once (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--width", type=int, default=None, help="video width, a multiple of 8 (default: 1024, "
                   "or 576 for a portrait reference)")
    p.add_argument("--height", type=int, default=None, help="video height (default: 576, or 1024 for portrait)")
    p.add_argument("--variant", default=None, help="official ControlNeXt layout of a release file (e.g. svd)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickled .bin weights (trusted files only)")
    p.add_argument("--allow-download", action="store_true", help="allow downloading --base from the Hugging Face Hub")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder to look for model ids in")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp32 on CPU, fp16 on GPU")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep each model on the CPU until it runs (diffusers' model offload; less GPU memory)")
    p.add_argument("--output", "-o", default="output.mp4", help="output MP4; the GIF and the JSON go beside it")
    p.add_argument("--save-poses", metavar="FOLDER", default=None, help="also write the condition frames there")
    p.add_argument("--no-gif", dest="gif", action="store_false", help="skip the GIF")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(check=check_arguments, run=run)


def check_arguments(args: argparse.Namespace) -> None:
    """One line for values that cannot work, before anything heavy loads."""
    from ..errors import ControlNextError

    positive = {"--stride": args.stride, "--steps": args.steps, "--decode-chunk": args.decode_chunk,
                "--max-frames": args.max_frames, "--frames-per-window": args.frames_per_window,
                "--num-frames": args.num_frames, "--fps": args.fps, "--output-fps": args.output_fps}
    for flag, value in positive.items():
        if value is not None and value <= 0:
            raise ControlNextError(f"{flag} must be positive, not {value}")
    if args.control and not (args.driving or args.poses):
        raise ControlNextError("--control needs the motion to follow: pass --driving VIDEO or --poses FOLDER")
    if (args.driving or args.poses) and not args.control:
        raise ControlNextError("--driving/--poses need a pose control: pass --control")
    if args.control and args.num_frames:
        raise ControlNextError("with a control the frame count is that of the poses; drop --num-frames "
                               "(use --max-frames to shorten)")
    if not 0 <= args.motion_bucket <= 255:
        raise ControlNextError(f"--motion-bucket must lie in 0..255, not {args.motion_bucket}")
    if args.noise_aug < 0:
        raise ControlNextError(f"--noise-aug must not be negative, not {args.noise_aug}")
    if args.overlap is not None and args.overlap < 0:
        raise ControlNextError(f"--overlap must not be negative, not {args.overlap}")
    if Path(args.output).suffix.lower() != ".mp4":
        raise ControlNextError(f"--output {args.output} must end in .mp4")


def default_size(reference_size: tuple[int, int]) -> tuple[int, int]:
    """1024 x 576, turned upright for a portrait reference."""
    return (576, 1024) if reference_size[1] > reference_size[0] else (1024, 576)


def base_frame_count(base: str, cache_dir: str | None) -> int:
    """The frame count the base UNet was trained on, read from its config without loading weights."""
    from diffusers import UNetSpatioTemporalConditionModel

    from ..errors import ControlNextError

    try:
        config = UNetSpatioTemporalConditionModel.load_config(base, subfolder="unet", local_files_only=True,
                                                              cache_dir=cache_dir)
    except (OSError, ValueError):
        raise ControlNextError(f"no Stable Video Diffusion UNet config in {base} (expected unet/config.json); give a "
                               "diffusers StableVideoDiffusionPipeline folder or a cached model id") from None
    return int(config.get("num_frames", 25))


def run(args: argparse.Namespace) -> int:
    import torch

    from ..devices import default_dtype, resolve_device
    from ..errors import ControlNextError
    from ..images import check_size, fit_image, load_image, to_rgb
    from ..pipelines.base import resolve_dtype
    from ..pipelines.video import ControlledVideoPipeline, plan_windows
    from ..videos import read_video, write_gif, write_mp4

    reference = to_rgb(load_image(args.reference))
    width, height = default_size(reference.size)
    width, height = args.width or width, args.height or height
    check_size(width, height, 8, "video")
    reference = fit_image(reference, width, height)
    source_fps, controls, note = None, None, ""
    if args.driving:
        driving = read_video(args.driving, stride=args.stride, max_frames=args.max_frames)
        source_fps = driving.fps
        frame_count = 1 + len(driving.frames)
    elif args.poses:
        frame_count = None
    window = args.frames_per_window or base_frame_count(args.base, args.cache_dir)
    if args.driving:
        if frame_count < window:  # before detecting anything
            raise ControlNextError(
                f"the driving video gives {frame_count - 1} frames at --stride {args.stride} ({frame_count} with the "
                f"reference), fewer than one window of {window}; give a longer video, a smaller --stride or "
                f"--frames-per-window {frame_count}")
        plan_windows(frame_count, window, _overlap(args, window, frame_count))
        from ..annotators.pose_sequence import mediapipe_detector, sequence_from_video

        sequence = sequence_from_video(reference, driving.frames, detect=mediapipe_detector(args.hands, args.face),
                                       retarget=args.retarget, progress=not args.no_progress)
        controls = sequence.control_frames(args.hands, args.face)
        if sequence.missing:
            note = f"note: nobody found in {len(sequence.missing)} of {len(driving.frames)} driving frames (drawn black)"
    elif args.poses:
        from ..annotators.pose_sequence import mediapipe_detector, sequence_from_folder

        controls, _ = sequence_from_folder(reference, args.poses, detect=mediapipe_detector(args.hands, args.face),
                                           retarget=args.retarget, hands=args.hands, face=args.face)
    if note:
        print(note, file=sys.stderr)
    num_frames = len(controls) if controls else (args.num_frames or window)
    overlap = _overlap(args, window, num_frames)
    windows = plan_windows(num_frames, window, overlap)
    if args.save_poses and controls:
        folder = Path(args.save_poses)
        folder.mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(controls):
            frame.save(folder / f"condition_{index:05d}.png")

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or default_dtype(device), device)
    pipe = ControlledVideoPipeline.from_pretrained(
        args.base, [args.control] if args.control else [], device=device, dtype=dtype, cpu_offload=args.cpu_offload,
        allow_pickle=args.allow_pickle, allow_download=args.allow_download, cache_dir=args.cache_dir,
        **({"variant": args.variant} if args.variant else {}),
    )
    result = pipe(
        reference, control_frames=controls if controls else None, control_scales=args.scale,
        frames_per_window=window, overlap=overlap, progress=not args.no_progress,
        width=width, height=height, num_frames=num_frames, num_inference_steps=args.steps,
        min_guidance_scale=args.min_guidance, max_guidance_scale=args.max_guidance, fps=args.fps,
        motion_bucket_id=args.motion_bucket, noise_aug_strength=args.noise_aug, decode_chunk_size=args.decode_chunk,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    )
    if not isinstance(result.frames, list) or not result.frames:
        raise ControlNextError("the pipeline returned no frames")
    frames = result.frames[0]
    output_fps = args.output_fps or source_fps or float(args.fps)
    params = parameters(args, width, height, num_frames, window, overlap, len(windows), output_fps, device, dtype)
    out = Path(args.output)
    write_mp4(frames, out, output_fps, metadata=params)
    written = [out]
    if args.gif:
        written.append(write_gif(frames, out.with_suffix(".gif"), output_fps))
    out.with_suffix(".json").write_text(json.dumps(params, indent=2))
    written.append(out.with_suffix(".json"))
    for path in written:
        print(path)
    return 0


def _overlap(args: argparse.Namespace, window: int, num_frames: int) -> int:
    if args.overlap is not None:
        return args.overlap
    return 0 if num_frames <= window else max(1, window // 4)


def parameters(args, width, height, num_frames, window, overlap, windows, output_fps, device, dtype) -> dict:
    """Everything needed to make this video again with `controlnext video`."""
    from .. import __version__

    return {
        "version": __version__, "base": args.base, "control": args.control, "reference": args.reference,
        "driving": args.driving, "poses": args.poses, "stride": args.stride, "max_frames": args.max_frames,
        "retarget": args.retarget, "hands": args.hands, "face": args.face, "scale": args.scale,
        "num_frames": num_frames, "frames_per_window": window, "overlap": overlap, "windows": windows,
        "fps": args.fps, "output_fps": output_fps, "motion_bucket": args.motion_bucket, "noise_aug": args.noise_aug,
        "min_guidance": args.min_guidance, "max_guidance": args.max_guidance, "steps": args.steps,
        "decode_chunk": args.decode_chunk, "seed": args.seed, "width": width, "height": height,
        "device": device, "dtype": str(dtype).removeprefix("torch."), "cpu_offload": args.cpu_offload,
        "variant": args.variant,
    }
