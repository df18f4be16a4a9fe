"""`controlnext video`: animate a reference image with the poses of a driving video (Stable Video Diffusion).

Writes an MP4 (the parameters in its metadata), a GIF and a JSON of every parameter beside it.
"""

from __future__ import annotations

import argparse
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


REQUEST_FIELDS = ("base", "reference", "control", "driving", "poses", "stride", "max_frames", "retarget", "hands",
                  "face", "scale", "frames_per_window", "overlap", "num_frames", "fps", "output_fps", "motion_bucket",
                  "noise_aug", "min_guidance", "max_guidance", "steps", "decode_chunk", "seed", "width", "height",
                  "variant", "allow_pickle", "allow_download", "cache_dir", "device", "dtype", "cpu_offload")


def request_from(args: argparse.Namespace):
    """The library request the flags describe."""
    from ..video_generation import VideoRequest

    return VideoRequest(**{name: getattr(args, name) for name in REQUEST_FIELDS})


def check_arguments(args: argparse.Namespace) -> None:
    """One line for values that cannot work, before anything heavy loads."""
    from ..errors import ControlNextError

    request_from(args).check()
    if Path(args.output).suffix.lower() != ".mp4":
        raise ControlNextError(f"--output {args.output} must end in .mp4")


def run(args: argparse.Namespace) -> int:
    from . import quiet_loading_bars
    from ..video_generation import conditions, generate_video, save_video

    if not args.debug:
        quiet_loading_bars()

    request = request_from(args)
    prepared = conditions(request, progress=not args.no_progress)
    if prepared.note:
        print(f"note: {prepared.note}", file=sys.stderr)
    if args.save_poses and prepared.frames:
        folder = Path(args.save_poses)
        folder.mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(prepared.frames):
            frame.save(folder / f"condition_{index:05d}.png")
    result = generate_video(request, prepared, progress=not args.no_progress)
    for path in save_video(result, args.output, gif=args.gif):
        print(path)
    return 0
