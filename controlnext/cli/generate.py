"""`controlnext generate`: images from a prompt and one or more controls, each PNG carrying its parameters.

The flags are the fields of `controlnext.request.GenerationRequest`; a request is built and checked before
torch is imported, so a bad value costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ControlNextError
from ..metadata import PARAMETERS_KEY, read_parameters, save_with_parameters  # noqa: F401 (read_parameters: public here too)
from ..request import ControlSettings, GenerationRequest, LoraSettings, Setting, settings

NESTED = {"controls": ControlSettings}  # list fields whose items' fields are repeatable flags, one per control
METAVARS = {int: "N", float: "X"}


def add_parser(subparsers, parent) -> None:
    p = subparsers.add_parser(
        "generate", parents=[parent], help="generate images with control",
        description="Generate images that follow a prompt and one or more control conditions. Repeat "
        "--control/--image (and optionally --scale/--start/--end/--annotator/--unet-weights) once per control; a "
        "per-control flag given once applies to every control.",
    )
    p.add_argument("--from", dest="from_png", metavar="PNG", help="start from the parameters stored in a PNG made by "
                   "controlnext (all but --device); flags given too replace them, --control replaces its controls")
    add_request_arguments(p)
    p.add_argument("--output", "-o", default="output.png", help="output PNG; with several images, _0, _1, ... are added "
                   "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(check=check, run=run)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per request field (per control field: repeatable); defaults stay None so --from can fill them."""
    for spec in settings(GenerationRequest).values():
        if spec.name in NESTED:
            for item in settings(NESTED[spec.name]).values():
                if item.cli:
                    _add(parser, item, repeat=True)
        elif spec.name == "loras":
            parser.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                                help="style LoRA with its weight (repeatable)")
        elif spec.cli:
            _add(parser, spec)


def _add(parser: argparse.ArgumentParser, spec: Setting, repeat: bool = False) -> None:
    names = [flag(spec.name), *([spec.short] if spec.short else [])]
    help_text = spec.help
    if spec.kind is bool:
        parser.add_argument(*names, action="store_true", default=None, help=help_text)
        return
    if repeat:
        help_text += " (per control"
        help_text += f"; default: {spec.default})" if not spec.required and spec.default is not None else ")"
    elif not spec.required and spec.default is not None:
        help_text += f" (default: {spec.default!r})" if spec.default == "" else f" (default: {spec.default})"
    value_type = spec.kind if spec.kind in (int, float) else str
    metavar = spec.metavar or ("{" + ",".join(spec.choices) + "}" if spec.choices else METAVARS.get(spec.kind, "TEXT"))
    parser.add_argument(*names, type=value_type, action="append" if repeat else "store", default=None,
                        metavar=metavar, help=help_text)


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The request the flags (over the parameters of --from, if given) describe, checked."""
    values = GenerationRequest.values_from_parameters(_stored_parameters(args.from_png)) if args.from_png else {}
    for spec in settings(GenerationRequest).values():
        given = getattr(args, spec.name, None)
        if spec.name not in NESTED and spec.name != "loras" and given is not None:
            values[spec.name] = given
    values["controls"] = _controls(args, values.get("controls", []))
    if args.lora is not None:
        values["loras"] = [LoraSettings.parse(text) for text in args.lora]
    if "prompt" not in values:
        raise ControlNextError("--prompt is required (or --from a PNG made by controlnext)")
    return GenerationRequest(**values).check(flag)


def _controls(args: argparse.Namespace, stored: list[ControlSettings]) -> list[ControlSettings]:
    """Controls from the per-control flags; without --control, the flags given change the stored controls."""
    per_control = {name: getattr(args, name) for name, spec in settings(ControlSettings).items()
                   if spec.cli and getattr(args, name) is not None}
    if "control" in per_control:
        controls, images = per_control.pop("control"), per_control.pop("image", [])
        if len(images) != len(controls):
            raise ControlNextError(f"{len(controls)} --control but {len(images)} --image; give one image per control")
        stored = [ControlSettings(c, i) for c, i in zip(controls, images)]
    elif per_control and not stored:
        raise ControlNextError(f"{flag(next(iter(per_control)))} needs a --control")
    n = len(stored)
    for name, given in per_control.items():
        if len(given) not in (1, n):
            raise ControlNextError(f"{len(given)} {flag(name)} values for {n} control{'s' * (n != 1)}; give one, or one "
                                   "per --control")
    changed = [{name: given[k if len(given) > 1 else 0] for name, given in per_control.items()} for k in range(n)]
    return [ControlSettings(**{**vars(control), **change}) for control, change in zip(stored, changed)]


def _stored_parameters(path: str) -> dict:
    if not Path(path).is_file():
        raise ControlNextError(f"--from {path}: file not found")
    try:
        return read_parameters(path)
    except (KeyError, ValueError, OSError):
        raise ControlNextError(f"--from {path}: no controlnext parameters in it; give a PNG made by controlnext") from None


def check(args: argparse.Namespace) -> None:
    args.request = request_from_args(args)
    if any(c.annotator != "none" for c in args.request.controls):
        from ..annotators import check_annotator

        for control in args.request.controls:
            check_annotator(control.annotator, control.annotator_options)


def run(args: argparse.Namespace) -> int:
    from . import quiet_loading_bars, quiet_unused_bitsandbytes

    if not args.debug:
        quiet_unused_bitsandbytes()  # before diffusers imports it
    from ..generation import generate

    if not args.debug:
        quiet_loading_bars()

    request = getattr(args, "request", None) or request_from_args(args)
    bar = ProgressBar(enabled=not args.no_progress)
    try:
        result = generate(request, progress=bar, note=lambda text: print(f"note: {text}", file=sys.stderr))
    finally:
        bar.close()
    for k, (image, parameters) in enumerate(zip(result.images, result.parameters)):
        out = output_path(args.output, k, len(result.images))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_with_parameters(image, out, parameters)
        print(out)
    return 0


class ProgressBar:
    """A denoising progress bar on stderr, fed by generation's step callback."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="denoising")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def output_path(output: str, index: int, count: int) -> Path:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    return path if count == 1 else path.with_name(f"{path.stem}_{index}{path.suffix}")
