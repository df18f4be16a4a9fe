"""Control methods, one registry: each method's file registers what the rest of the project needs of it.

A `ControlMethod` names the model class, how to recognise the method's files when they carry no
`control.json` (official releases, diffusers folders, single files), how to load and save them, how to
build a fresh model for a base denoiser and which base weights train with it by default. Loading,
training, the CLI and the web catalog read this registry; attaching needs only the model's interface
(`controlnext.control.attach.ControlModel`). A new method is one file that calls `register`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import ControlNextError


@dataclass(frozen=True)
class ControlMethod:
    """What a control method provides to loading, training, the CLI and the web catalog."""

    name: str
    model_class: type | tuple[type, ...]  # what isinstance recognises as this method's model
    load: Callable  # (path, denoiser=None, **options) -> LoadedControl; options it does not take are refused
    # (path, model, base_weights=None, *, original_weights=None, increments=False, metadata=None) -> path; a save
    # that also takes dtype= (the stored precision) lets `controlnext train --save-precision` use fp16 or bf16
    save: Callable
    build: Callable  # (denoiser, TrainConfig, vae_scale_factor=8) -> a fresh model for that base
    detect: Callable[[Path], bool] = lambda path: False  # files without control.json that are this method's
    trainable: Callable[[str], str] = lambda family: "none"  # denoiser family -> the preset "--trainable auto" means
    # the model's learning rate when --module-learning-rate is not given, as a multiple of --learning-rate
    module_lr_factor: float = 1.0


METHODS: dict[str, ControlMethod] = {}


def register(method: ControlMethod) -> ControlMethod:
    """Add a method (or replace one of the same name); returns it."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> ControlMethod:
    if name not in METHODS:
        raise ControlNextError(f"unknown control method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def method_of(model: nn.Module) -> ControlMethod:
    """The registered method whose model class `model` is."""
    for method in METHODS.values():
        if isinstance(model, method.model_class):
            return method
    raise ControlNextError(f"{type(model).__name__} is not the model of a registered control method "
                           f"({', '.join(METHODS)})")


def control_method(path: str | Path) -> str | None:
    """The method of the control at `path`: its control.json, else the first method that recognises its files."""
    path = Path(path)
    if path.is_dir() and (path / "control.json").is_file():
        try:
            name = json.loads((path / "control.json").read_text()).get("method")
        except (json.JSONDecodeError, AttributeError):
            raise ControlNextError(f"{path / 'control.json'} is not a JSON object; is it corrupt?") from None
        if name:
            return name
    return next((method.name for method in METHODS.values() if method.detect(path)), None)


from . import controlnet, controlnext  # noqa: E402,F401  (the built-in methods register themselves)
