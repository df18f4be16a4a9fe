"""`controlnext annotate NAME IMAGE -o OUT`: turn an image into a condition image with one annotator."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "annotate",
        parents=[parent],
        help="turn an image into a condition image (canny, openpose, depth, ...)",
        description="Turn an image into a condition image. An unknown NAME lists the annotators.",
    )
    parser.add_argument("name", metavar="NAME", help="annotator, e.g. canny, lineart, openpose, depth")
    parser.add_argument("image", metavar="IMAGE", type=Path, help="input image file (PNG, JPEG, ...)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write the condition image")
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
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..annotators import annotate, parse_options
    from ..errors import ControlNextError
    from ..images import load_image

    options = parse_options(args.name, args.option)
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
