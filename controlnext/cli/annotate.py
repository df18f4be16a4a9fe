"""`controlnext annotate NAME IMAGE -o OUT`: turn an image into a condition image with one annotator."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "annotate",
        parents=[parent],
        help="turn an image into a condition image (canny, openpose, depth, ...)",
        description="Turn an image into a condition image. An unknown NAME lists the annotators. A video (or a "
        "folder of frames) gives a folder of conditions, one per frame; with openpose, OpenPose JSON beside each.",
    )
    parser.add_argument("name", metavar="NAME", help="annotator, e.g. canny, lineart, openpose, depth")
    parser.add_argument("image", metavar="IMAGE", type=Path, help="input image file (PNG, JPEG, ...), or a video "
                        "(MP4, GIF, WebM, ...) or folder of frames")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write the condition image (for a "
                        "video: a folder)")
    parser.add_argument(
        "--resolution", type=int, default=None,
        help="short side the annotator works at (default: that of --output-size, else the image's own)",
    )
    parser.add_argument(
        "--resize-mode", default="crop_and_resize",
        help="how to reach --output-size: crop_and_resize (default), just_resize or resize_and_fill",
    )  # fmt: skip
    parser.add_argument(
        "--output-size", metavar="WxH", default=None,
        help="size of the result, which the annotator works at: the size the condition is used at (default: the input's)",
    )  # fmt: skip
    parser.add_argument(
        "--option", metavar="KEY=VALUE", action="extend", nargs="+", default=[],
        help="annotator option, e.g. low_threshold=50, model_path=/models/dpt, or a yes/no option named alone (invert)",
    )  # fmt: skip
    video = parser.add_argument_group("video input")
    video.add_argument("--stride", type=int, default=1, help="annotate every k-th frame (default: 1)")
    video.add_argument("--max-frames", type=int, default=None, help="annotate at most this many frames")
    video.add_argument("--reference", metavar="IMAGE", default=None, help="openpose: map the driving body onto the "
                       "person of this image and draw on its canvas (as `controlnext video` does)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..annotators import annotate, parse_options
    from ..errors import ControlNextError
    from ..images import load_image

    options = parse_options(args.name, args.option)
    if _is_video(args.image):
        return _annotate_video(args, options)
    output_size = _parse_size(args.output_size) if args.output_size else None
    image = load_image(args.image)
    condition = annotate(
        args.name, image, resolution=args.resolution, resize_mode=args.resize_mode, output_size=output_size, **options
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        condition.save(args.output)
    except (ValueError, OSError) as error:
        raise ControlNextError(f"cannot write {args.output} ({error}); use a .png or .jpg file name") from None
    print(args.output)
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    from ..errors import ControlNextError

    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise ControlNextError(f"--output-size {text!r} must be WIDTHxHEIGHT in pixels, e.g. 512x768")
    return int(width), int(height)


def _is_video(path: Path) -> bool:
    from ..videos import VIDEO_SUFFIXES

    return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES


def _annotate_video(args: argparse.Namespace, options: dict) -> int:
    """Every --stride-th frame to a condition PNG in the --output folder; openpose writes OpenPose JSON too."""
    from ..annotators import annotate
    from ..errors import ControlNextError
    from ..videos import read_video

    if args.stride < 1 or (args.max_frames is not None and args.max_frames < 1):
        raise ControlNextError("--stride and --max-frames must be at least 1")
    if args.output.suffix or args.output.is_file():
        raise ControlNextError(f"-o {args.output}: a video gives one condition per frame; name a folder")
    video = read_video(args.image, stride=args.stride, max_frames=args.max_frames)
    if args.name == "openpose" and not (args.resolution or args.output_size):
        from ..annotators.pose_sequence import mediapipe_detector, sequence_from_video
        from ..images import load_image

        hands, face = options.pop("hands", False), options.pop("face", False)  # the openpose annotator's defaults
        reference = load_image(args.reference) if args.reference else None
        sequence = sequence_from_video(reference, video.frames, detect=mediapipe_detector(hands, face, **options),
                                       progress=True)
        sequence.write(args.output, hands, face)
    elif args.reference:
        raise ControlNextError("--reference applies to openpose (without --resolution/--output-size)")
    else:
        output_size = _parse_size(args.output_size) if args.output_size else None
        args.output.mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(video.frames):
            condition = annotate(args.name, frame, resolution=args.resolution, resize_mode=args.resize_mode,
                                 output_size=output_size, **options)
            condition.save(args.output / f"frame_{index:05d}.png")
    print(args.output)
    return 0
