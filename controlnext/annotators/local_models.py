"""Loading transformers models for neural annotators from a local folder, never from the network."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import devices
from ..errors import ControlNextError

if TYPE_CHECKING:
    import torch

_FOLDER_LAYOUT = "a folder saved with save_pretrained (config.json, model.safetensors, preprocessor_config.json)"


def resolve_device(device: str) -> torch.device:
    """The torch device for a name; 'auto' follows the rule generation uses (controlnext.devices)."""
    import torch

    return torch.device(devices.resolve_device(device))


def load_local_model(model_path: str | Path | None, auto_class: str, task: str, examples: str) -> tuple[Any, Any]:
    """(model, image processor) of a local transformers folder, for `task` ("depth estimation", ...)."""
    if not model_path:
        raise ControlNextError(f"{task} needs model_path=<folder>: a local {task} model ({examples}), {_FOLDER_LAYOUT}")
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        raise ControlNextError(
            f"model folder not found: {folder}; give a local {task} model ({examples}), {_FOLDER_LAYOUT}"
        )
    for required in ("config.json", "preprocessor_config.json"):
        if not (folder / required).is_file():
            raise ControlNextError(
                f"{folder} has no {required}; expected a {task} model ({examples}), {_FOLDER_LAYOUT}"
            )
    stamp = (folder / "config.json").stat().st_mtime_ns
    return _load(str(folder.resolve()), stamp, auto_class, task, examples)


@functools.lru_cache(maxsize=4)
def _load(folder: str, stamp: int, auto_class: str, task: str, examples: str) -> tuple[Any, Any]:
    import transformers

    config = _read_config(folder)
    head = auto_class.removeprefix("AutoModel")  # e.g. "ForDepthEstimation"
    architectures = config.get("architectures") or []
    if architectures and not any(name.endswith(head) for name in architectures):
        raise ControlNextError(f"{folder} holds a {architectures[0]}, not a {task} model; give one such as {examples}")
    try:
        model = getattr(transformers, auto_class).from_pretrained(folder, local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except ValueError:  # the Auto class does not know this config's model type
        model_type = config.get("model_type", "unknown")
        raise ControlNextError(
            f"{folder} holds a {model_type!r} model, not a {task} model; give one such as {examples}"
        ) from None
    except (OSError, RuntimeError) as error:  # missing or mismatched weights
        raise ControlNextError(f"cannot load the {task} model in {folder}: {str(error).splitlines()[0]}") from None
    return model.eval(), processor


def _read_config(folder: str) -> dict:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ControlNextError(f"cannot read {folder}/config.json ({error}); {_FOLDER_LAYOUT}") from None
    if not isinstance(config, dict):
        raise ControlNextError(f"{folder}/config.json is not a model config; {_FOLDER_LAYOUT}")
    return config
