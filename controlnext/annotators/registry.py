"""The annotator registry and `annotate`, the one entry point that turns any image into a condition.

An annotator is a function `fn(image, *, option=default, ...) -> PIL.Image` (RGB). It receives the image
in mode RGB, RGBA or L, already at the size it should work at, and returns a condition of the same size.
Its keyword-only parameters are its options: their type hints type the CLI's `--option key=value`.

Conditions are made at the size they are used at: given the size of use (`output_size`), `annotate`
scales the image to it first, so a canny map of a 3000-pixel photo for a 512-pixel generation has the
edges a 512-pixel image has, not a 3000-pixel map shrunk until its one-pixel lines fade away.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from ..errors import ControlNextError
from ..images import RESIZE_MODES, check_pixels, fit_image, fit_layout, normalize_mode, place, resize_short_side, to_rgb

AnnotatorFunction = Callable[..., Image.Image]
Resample = Literal["linear", "nearest", "binary", "lines"]

_RESAMPLE_FILTERS = {"linear": Image.BILINEAR, "nearest": Image.NEAREST, "binary": Image.BILINEAR, "lines": None}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class AnnotatorSpec:
    """A registered annotator: its name, its function and how its result is resized."""

    name: str
    function: AnnotatorFunction
    resample: Resample = "linear"  # "nearest": label colours kept exact; "binary": masks; "lines": thin line maps
    native_resolution: bool = False  # works at the input's own size and ignores `resolution`

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.function) or "").split("\n", 1)[0]

    @property
    def options(self) -> dict[str, inspect.Parameter]:
        parameters = inspect.signature(self.function).parameters.values()
        return {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def option_types(self) -> dict[str, Any]:
        hints = typing.get_type_hints(self.function)
        return {name: hints.get(name, str) for name in self.options}

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise for an option this annotator does not take, or a value outside a fixed set of choices."""
        known = self.options
        for key, value in options.items():
            if key not in known:
                listed = ", ".join(known) or "none"
                raise ControlNextError(f"annotator {self.name!r} has no option {key!r}; its options: {listed}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ControlNextError(f"option {key}={value} of annotator {self.name!r} must be a finite number")
            choices = _literal_choices(self.option_types()[key])
            if choices and value not in choices:
                raise ControlNextError(
                    f"option {key}={value!r} of annotator {self.name!r} must be one of {', '.join(map(str, choices))}"
                )


_REGISTRY: dict[str, AnnotatorSpec] = {}


def register_annotator(
    name: str,
    function: AnnotatorFunction | None = None,
    *,
    resample: Resample = "linear",
    native_resolution: bool = False,
    replace: bool = False,
):
    """Register `function` under `name`; without `function`, return a decorator that does.

    `resample` says how its result is resized when it must be ("linear", "nearest" for label maps,
    "binary" for masks, "lines" for thin white-on-black line maps, which keeps every line);
    `native_resolution` makes it work at the input's own size whatever `resolution` asks.
    """

    def register(fn: AnnotatorFunction) -> AnnotatorFunction:
        if name in _REGISTRY and not replace:
            raise ControlNextError(f"an annotator named {name!r} is already registered; pass replace=True")
        if resample not in _RESAMPLE_FILTERS:
            raise ControlNextError(f"unknown resample {resample!r}; use one of {', '.join(_RESAMPLE_FILTERS)}")
        _REGISTRY[name] = AnnotatorSpec(name, fn, resample, native_resolution)
        return fn

    return register if function is None else register(function)


def list_annotators() -> list[str]:
    return sorted(_REGISTRY)


def get_annotator(name: str) -> AnnotatorSpec:
    if name not in _REGISTRY:
        raise ControlNextError(f"unknown annotator {name!r}; known annotators: {', '.join(list_annotators())}")
    return _REGISTRY[name]


def annotate(
    name: str,
    image: Image.Image,
    *,
    resolution: int | None = None,
    resize_mode: str = "crop_and_resize",
    output_size: tuple[int, int] | None = None,
    **options: Any,
) -> Image.Image:
    """Turn `image` (any size and mode) into the condition image `name` describes, as an RGB image.

    With `output_size` (width, height) and no `resolution`, the annotator works at the size of use: the
    image is scaled to cover, fill or fit that size as `resize_mode` says, annotated, then cropped or
    padded. With `resolution`, it works with the image's short side at that many pixels and the result
    is resized to `output_size` (or back to the input's size). With neither, it works at the input's size.
    Line maps (canny, lines, scribble) are never found on an enlarged photo: they are found at the
    photo's size and the map is enlarged, so their density does not depend on the photo's size.
    """
    spec = get_annotator(name)
    spec.check_options(options)
    if not isinstance(image, Image.Image):
        raise ControlNextError(f"annotate needs a PIL image, got {type(image).__name__}; open files with load_image")
    output_size = _check_sizes(resolution, resize_mode, output_size)
    source = normalize_mode(image)
    check_pixels(*source.size, "the input image", "make it smaller first")
    target = output_size or source.size
    check_pixels(*target, "the condition", "ask for a smaller output size")
    mode = resize_mode if output_size else "just_resize"  # back to the input's size: same aspect ratio

    if resolution is None and output_size is not None and not spec.native_resolution:
        scaled_size, offset = fit_layout(source.size, output_size, resize_mode)
        check_pixels(*scaled_size, f"the image scaled to {resize_mode} {output_size[0]}x{output_size[1]}")
        if _enlarges(spec, source.size, scaled_size):
            result = resize_line_map(_run(spec, source, options), scaled_size)
        else:
            working = source if scaled_size == source.size else source.resize(scaled_size, Image.BICUBIC)
            result = _run(spec, working, options)
        return place(result, output_size, resize_mode, offset)

    working = source
    if resolution is not None and not spec.native_resolution:
        working = _scaled_to(source, resolution)
        working = source if _enlarges(spec, source.size, working.size) else working
    return _resize_result(_run(spec, working, options), target, mode, spec.resample)


def _enlarges(spec: AnnotatorSpec, size: tuple[int, int], scaled: tuple[int, int]) -> bool:
    """Whether a line map would be found on an enlarged photo: enlarging blurs the photo's edges away, so
    line maps are found at the photo's own size and the map is enlarged instead (its lines widen with it)."""
    return spec.resample == "lines" and scaled[0] * scaled[1] > size[0] * size[1]


def annotate_at_size(
    name: str, image: Image.Image, size: tuple[int, int], *, resize_mode: str = "crop_and_resize", **options: Any
) -> Image.Image:
    """The condition for a generation or training example of `size` (width, height), annotated at that size.

    The one call the CLI, the web app and training make; annotator "none" gives the image itself in RGB,
    for the pipeline to fit.
    """
    if name == "none":
        if options:
            raise ControlNextError("annotator 'none' takes no options")
        return to_rgb(normalize_mode(image))
    return annotate(name, image, output_size=tuple(size), resize_mode=resize_mode, **options)


def check_annotator(name: str, options: dict[str, Any] | None = None) -> None:
    """Refuse an unknown annotator or option, without running anything ("none" takes no options)."""
    if name == "none":
        if options:
            raise ControlNextError("annotator 'none' takes no options")
        return
    get_annotator(name).check_options(options or {})


def _scaled_to(source: Image.Image, resolution: int) -> Image.Image:
    scale = resolution / min(source.size)
    check_pixels(round(source.width * scale), round(source.height * scale),
                 f"the image at resolution {resolution}", "use a smaller resolution")  # fmt: skip
    return resize_short_side(source, resolution)


def _run(spec: AnnotatorSpec, working: Image.Image, options: dict[str, Any]) -> Image.Image:
    result = to_rgb(spec.function(working, **options))
    if result.size != working.size:
        raise ControlNextError(f"annotator {spec.name!r} returned {result.size}, not its input's size {working.size}")
    return result


def _check_sizes(resolution: Any, resize_mode: str, output_size: Any) -> tuple[int, int] | None:
    """Validate the size arguments of `annotate`; returns output_size as a (width, height) tuple of ints."""
    if resize_mode not in RESIZE_MODES:
        raise ControlNextError(f"unknown resize mode {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
    if resolution is not None and (
        isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1
    ):
        raise ControlNextError(f"resolution must be a positive number of pixels, got {resolution!r}")
    if output_size is None:
        return None
    sides = tuple(output_size) if isinstance(output_size, (tuple, list)) else ()
    if len(sides) != 2 or any(not isinstance(side, (int, np.integer)) or side < 1 for side in sides):
        raise ControlNextError(f"output_size must be (width, height) in positive pixels, got {output_size!r}")
    return int(sides[0]), int(sides[1])


def _resize_result(result: Image.Image, size: tuple[int, int], mode: str, resample: Resample) -> Image.Image:
    if result.size == size:
        return result
    if resample == "lines":
        scaled_size, offset = fit_layout(result.size, size, mode)
        return place(resize_line_map(result, scaled_size), size, mode, offset)
    resized = fit_image(result, size[0], size[1], mode, _RESAMPLE_FILTERS[resample])
    if resample == "binary":  # interpolation greys out a crisp mask; bring it back to on/off
        resized = Image.fromarray(np.where(np.asarray(resized) >= 128, 255, 0).astype(np.uint8))
    return resized


def resize_line_map(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a white-on-black line map so that no line is lost: binary, white where a line passes.

    Shrinking by s keeps each output pixel that a line covers for at least half a line's share (1 / 2s)
    of its area, so one-pixel lines stay one or two pixels wide instead of fading under the threshold;
    enlarging interpolates and re-thresholds at half.
    """
    import cv2

    lines = (np.asarray(image.convert("L"), dtype=np.uint8) >= 128).astype(np.float32)  # (h, w) in {0, 1}
    shrink = max(image.width / size[0], image.height / size[1], 1.0)
    interpolation = cv2.INTER_AREA if shrink > 1 else cv2.INTER_LINEAR
    coverage = cv2.resize(lines, size, interpolation=interpolation)  # (h', w') in [0, 1]
    kept = coverage >= 0.5 / shrink - 1e-4
    return Image.fromarray(np.repeat(np.where(kept, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2))


def parse_options(name: str, pairs: Iterable[str]) -> dict[str, Any]:
    """Parse `key=value` strings into typed options of annotator `name` (from its function's type hints)."""
    spec = get_annotator(name)
    types_by_name = spec.option_types()
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if key in types_by_name and not sep and _is_flag(types_by_name[key]):
            options[key] = True  # a yes/no option named alone, e.g. `invert`
            continue
        if not sep or not key:
            raise ControlNextError(f"bad option {pair!r}: write it as KEY=VALUE (e.g. low_threshold=50)")
        if key not in types_by_name:
            listed = ", ".join(types_by_name) or "none"
            raise ControlNextError(f"annotator {name!r} has no option {key!r}; its options: {listed}")
        options[key] = _parse_value(key, text.strip(), types_by_name[key])
    spec.check_options(options)
    return options


def _parse_value(key: str, text: str, annotation: Any) -> Any:
    arms = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if type(None) in arms and text.lower() in ("", "none", "null"):
        return None
    for arm in (a for a in arms if a is not type(None)):
        choices = _literal_choices(arm)
        if choices:
            return text  # checked against the choices by check_options
        try:
            return _convert(text, arm)
        except ValueError:
            continue
    expected = " or ".join(getattr(a, "__name__", str(a)) for a in arms)
    raise ControlNextError(f"option {key}={text!r} is not a valid {expected}")


def _convert(text: str, kind: Any) -> Any:
    if kind is bool:
        lowered = text.lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError(text)
    if kind in (int, float):
        return kind(text)
    return kind(text) if callable(kind) else text


def _is_flag(annotation: Any) -> bool:
    return annotation is bool or (_is_union(annotation) and bool in typing.get_args(annotation))


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if _is_union(annotation):
        return tuple(c for arm in typing.get_args(annotation) for c in _literal_choices(arm))
    return ()
