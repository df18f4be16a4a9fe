"""The annotator registry and `annotate`, the one entry point that turns any image into a condition.

An annotator is a function `fn(image, *, option=default, ...) -> PIL.Image` (RGB). It receives the image
in mode RGB, RGBA or L, already at the detection resolution, and returns a condition of the same size.
Its keyword-only parameters are its options: their type hints type the CLI's `--option key=value`.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from ..errors import ControlNextError
from ..images import RESIZE_MODES, fit_image, normalize_mode, resize_short_side, to_rgb

AnnotatorFunction = Callable[..., Image.Image]
Resample = Literal["linear", "nearest", "binary"]

_RESAMPLE_FILTERS = {"linear": Image.BILINEAR, "nearest": Image.NEAREST, "binary": Image.BILINEAR}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class AnnotatorSpec:
    """A registered annotator: its name, its function and how its result is resized."""

    name: str
    function: AnnotatorFunction
    resample: Resample = "linear"  # "nearest" keeps label colours exact; "binary" re-thresholds line maps
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

    `resample` says how its result is resized ("linear", "nearest" for label maps, "binary" for line
    maps); `native_resolution` makes it work at the input's own size whatever `resolution` asks.
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

    The annotator works with the image's short side at `resolution` pixels (its own size if None); the
    result is brought to `output_size` (width, height) with `resize_mode`, or back to the input's size.
    """
    spec = get_annotator(name)
    spec.check_options(options)
    if not isinstance(image, Image.Image):
        raise ControlNextError(f"annotate needs a PIL image, got {type(image).__name__}; open files with load_image")
    output_size = _check_sizes(resolution, resize_mode, output_size)

    source = normalize_mode(image)
    working = source if resolution is None or spec.native_resolution else resize_short_side(source, resolution)
    result = to_rgb(spec.function(working, **options))
    if output_size is None:
        return _resize_result(result, source.size, "just_resize", spec.resample)  # same aspect ratio
    return _resize_result(result, output_size, resize_mode, spec.resample)


def _check_sizes(resolution: Any, resize_mode: str, output_size: Any) -> tuple[int, int] | None:
    """Validate the size arguments of `annotate`; returns output_size as a (width, height) tuple of ints."""
    if resize_mode not in RESIZE_MODES:
        raise ControlNextError(f"unknown resize mode {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
    if resolution is not None and (not isinstance(resolution, (int, np.integer)) or resolution < 1):
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
    resized = fit_image(result, size[0], size[1], mode, _RESAMPLE_FILTERS[resample])
    if resample == "binary":  # interpolation greys out crisp line maps; bring them back to on/off
        resized = Image.fromarray(np.where(np.asarray(resized) >= 128, 255, 0).astype(np.uint8))
    return resized


def parse_options(name: str, pairs: Iterable[str]) -> dict[str, Any]:
    """Parse `key=value` strings into typed options of annotator `name` (from its function's type hints)."""
    spec = get_annotator(name)
    types_by_name = spec.option_types()
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
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


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if _is_union(annotation):
        return tuple(c for arm in typing.get_args(annotation) for c in _literal_choices(arm))
    return ()
