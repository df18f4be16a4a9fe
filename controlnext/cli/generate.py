"""`controlnext generate`: images from a prompt and one or more controls, each PNG carrying its parameters."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..metadata import PARAMETERS_KEY, read_parameters, save_with_parameters  # noqa: F401 (read_parameters: public here too)


def add_parser(subparsers, parent) -> None:
    p = subparsers.add_parser(
        "generate", parents=[parent], help="generate images with control",
        description="Generate images that follow a prompt and one or more control conditions. Repeat "
        "--control/--image (and optionally --scale/--start/--end/--annotator) once per control.",
    )
    p.add_argument("--prompt", "-p", required=True, help="what to draw")
    p.add_argument("--negative-prompt", "-n", default="", help="what not to draw (used by classifier-free guidance)")
    p.add_argument("--base", default=None, help="base model: diffusers folder, .safetensors file or cached model id "
                   "(default: the embedded shapes model)")
    p.add_argument("--base-config", default=None, help="diffusers folder whose configs a single-file --base uses")
    p.add_argument("--control", "-c", action="append", default=[], metavar="PATH",
                   help="control weights: a folder or file, or the name of a bundled control (repeatable)")
    p.add_argument("--image", "-i", action="append", default=[], metavar="IMAGE", help="condition image per control")
    p.add_argument("--annotator", action="append", default=None, metavar="NAME",
                   help="make the condition from --image with this annotator (per control; 'none' to skip)")
    p.add_argument("--scale", action="append", type=float, default=None, help="control strength per control")
    p.add_argument("--start", action="append", type=float, default=None, help="fraction of the schedule where control starts")
    p.add_argument("--end", action="append", type=float, default=None, help="fraction of the schedule where control ends")
    p.add_argument("--apply-to", choices=["both", "cond"], default="both",
                   help="apply control to both classifier-free guidance halves (official) or the conditional one")
    p.add_argument("--variant", default=None,
                   help="official ControlNeXt layout of a release file (sdxl, sd15, sd15-v1, svd, svd-training)")
    p.add_argument("--unet-weights", action="append", default=None, metavar="auto|absolute|increments",
                   help="how a control's trained UNet tensors are stored, per control or once for all (default auto: "
                   "read from the tensors against the base)")
    p.add_argument("--resize-mode", default="crop_and_resize",
                   help="how condition images reach the image size: crop_and_resize (default; keeps the aspect "
                   "ratio), just_resize (stretches, as the official pipelines do) or resize_and_fill (pads with black)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickled .bin/.pth weights (trusted files only)")
    p.add_argument("--allow-download", action="store_true", help="allow downloading a base model id from the Hugging Face Hub")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder to look for model ids in")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]", help="style LoRA with its weight (repeatable)")
    p.add_argument("--task", choices=["txt2img", "img2img", "inpaint"], default="txt2img", help="what the base pipeline does")
    p.add_argument("--init-image", default=None, help="starting image for img2img and inpaint")
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    p.add_argument("--strength", type=float, default=0.75, help="how much img2img/inpaint changes the init image")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 disables it)")
    p.add_argument("--scheduler", default="unipc", help="ddim, unipc, euler, euler_a or dpm++2m")
    p.add_argument("--seed", type=int, default=0, help="random seed; image k of a batch uses seed + k")
    p.add_argument("--width", type=int, default=None, help="image width (multiple of 8; default: the model's size)")
    p.add_argument("--height", type=int, default=None, help="image height (multiple of 8)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate")
    p.add_argument("--output", "-o", default="output.png", help="output PNG; with several images, _0, _1, ... are added")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp32 on CPU, fp16 on GPU")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)


def parse_lora(text: str) -> tuple[str, float]:
    from ..errors import ControlNextError

    path, _, weight = text.rpartition(":") if ":" in text and not Path(text).exists() else (text, "", "1")
    try:
        return path, float(weight)
    except ValueError:
        raise ControlNextError(f"--lora {text}: the weight after ':' must be a number") from None


def resolve_control(name: str) -> str:
    """A bundled control's name (e.g. 'canny') -> its folder; anything else is a path."""
    from ..pipelines.base import BUNDLED_CONTROLS

    bundled = BUNDLED_CONTROLS / name
    return str(bundled) if not Path(name).exists() and bundled.is_dir() else name


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import ControlNextError
    from ..images import load_image, to_rgb
    from ..pipelines import ControlledPipeline
    from ..pipelines.base import resolve_dtype

    if len(args.image) != len(args.control):
        raise ControlNextError(f"{len(args.control)} --control but {len(args.image)} --image; give one image per control")
    if args.num_images < 1 or args.steps < 1:
        raise ControlNextError("--num-images and --steps must be at least 1")
    if args.task != "txt2img" and not args.init_image:
        raise ControlNextError(f"--task {args.task} needs --init-image")
    if args.task == "inpaint" and not args.mask:
        raise ControlNextError("--task inpaint needs --mask")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = resolve_dtype(args.dtype or ("fp32" if device == "cpu" else "fp16"), device)
    annotators = args.annotator or []
    if annotators and len(annotators) not in (1, len(args.control)):
        raise ControlNextError("give one --annotator, or one per --control")
    if args.unet_weights and len(args.unet_weights) not in (1, len(args.control)):
        raise ControlNextError("give one --unet-weights, or one per --control")

    conditions = []
    for i, path in enumerate(args.image):
        image = load_image(path)
        if "A" in image.getbands() or "transparency" in image.info:
            print(f"note: {path} has transparency; transparent pixels count as black", file=sys.stderr)
        name = annotators[i if len(annotators) > 1 else 0] if annotators else "none"
        if name != "none":
            from ..annotators import annotate

            image = annotate(name, image)
        conditions.append(to_rgb(image))

    pipe = ControlledPipeline.from_pretrained(
        args.base, [resolve_control(c) for c in args.control], task=args.task, device=device, dtype=dtype,
        scheduler=args.scheduler, loras=[parse_lora(x) for x in args.lora], allow_pickle=args.allow_pickle,
        allow_download=args.allow_download, base_config=args.base_config, cache_dir=args.cache_dir,
        variant=args.variant, unet_weights=args.unet_weights or "auto",
    )
    pipe.pipe.set_progress_bar_config(disable=args.no_progress, desc="denoising")
    kwargs = dict(
        negative_prompt=args.negative_prompt or None, num_inference_steps=args.steps, guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=[torch.Generator("cpu").manual_seed(args.seed + k) for k in range(args.num_images)],
    )
    if args.width:
        kwargs["width"] = args.width
    if args.height:
        kwargs["height"] = args.height
    if args.task != "txt2img":
        kwargs.update(image=to_rgb(load_image(args.init_image)), strength=args.strength)
        if args.task == "inpaint":
            kwargs["mask_image"] = to_rgb(load_image(args.mask))
    result = pipe(
        args.prompt, control_images=conditions, control_scales=args.scale,
        control_starts=args.start if args.start is not None else 0.0,
        control_ends=args.end if args.end is not None else 1.0, apply_to=args.apply_to, resize_mode=args.resize_mode,
        **kwargs,
    )
    for k, image in enumerate(result.images):
        out = output_path(args.output, k, len(result.images))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_with_parameters(image, out, parameters(args, k, image.size))
        print(out)
    return 0


def output_path(output: str, index: int, count: int) -> Path:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    return path if count == 1 else path.with_name(f"{path.stem}_{index}{path.suffix}")


def parameters(args: argparse.Namespace, index: int, size: tuple[int, int]) -> dict:
    """Everything needed to make this image again with `controlnext generate`."""
    from .. import __version__

    return {
        "version": __version__, "prompt": args.prompt, "negative_prompt": args.negative_prompt,
        "base": args.base or "embedded", "task": args.task, "init_image": args.init_image, "mask": args.mask,
        "strength": args.strength if args.task != "txt2img" else None,
        "controls": [
            {"control": c, "image": i, "annotator": (args.annotator or ["none"])[min(k, len(args.annotator or ["none"]) - 1)],
             "scale": _nth(args.scale, k), "start": _nth(args.start, k, 0.0), "end": _nth(args.end, k, 1.0),
             "unet_weights": _nth(args.unet_weights, k, "auto")}
            for k, (c, i) in enumerate(zip(args.control, args.image))
        ],
        "apply_to": args.apply_to, "resize_mode": args.resize_mode, "loras": args.lora, "steps": args.steps,
        "guidance": args.guidance, "scheduler": args.scheduler, "seed": args.seed + index, "width": size[0],
        "height": size[1], "dtype": args.dtype,
    }


def _nth(values, k, default=None):
    if not values:
        return default
    return values[k] if len(values) > 1 else values[0]
