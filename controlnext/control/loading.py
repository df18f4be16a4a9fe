"""Saving and loading controls: our format and the official ControlNeXt release layouts.

Our format is a folder: the module's `config.json` + `diffusion_pytorch_model.safetensors` (diffusers
save_pretrained), `control.json` (method, how the base tensors are stored, recommended scale) and, when
base weights were trained, `unet.safetensors` with only those tensors. The official layout is a module
file (`controlnet.safetensors` or `.bin`) beside a UNet file of trained tensors, absolute or as
increments (`unet_weight_increasements.*`), possibly in LDM key names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ControlNextError
from ..models import VARIANTS, ControlNeXtModel

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
MODULE_FILES = ("controlnet.safetensors", "controlnext.safetensors", "controlnet.bin", "controlnext.bin")
UNET_FILES = (
    "unet.safetensors", "unet_weight_increasements.safetensors", "unet_weight_increments.safetensors",
    "unet.bin", "unet_weight_increasements.bin", "unet_weight_increments.bin",
)


@dataclass
class LoadedControl:
    """A control ready to attach: its model, the base tensors it trained, and its recommended scale."""

    model: nn.Module
    method: str = "controlnext"
    unet_weights: dict[str, torch.Tensor] | None = None  # absolute values, diffusers key names
    scale: float = 1.0
    source: str = ""
    metadata: dict = field(default_factory=dict)


# -- tensors files ---------------------------------------------------------------------------------

def read_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a safetensors file (or, with allow_pickle, a torch pickle read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ControlNextError(f"weights file not found: {path}")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ControlNextError(
                f"{path.name} is a pickled file, which can run code when read; convert it to .safetensors "
                "or pass --allow-pickle if you trust its source"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for corrupt or unsafe pickles
            raise ControlNextError(f"cannot read {path} as torch weights ({type(error).__name__}); is it corrupt?") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ControlNextError(f"{path} does not hold a flat dictionary of tensors")
        return data
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ControlNextError(f"cannot read {path} as safetensors ({error}); is it corrupt or truncated?") from None


# -- LDM (original Stable Diffusion) key names -------------------------------------------------------

def ldm_to_diffusers_unet_keys(tensors: dict[str, torch.Tensor], unet_config) -> dict[str, torch.Tensor]:
    """Rename LDM UNet keys (input_blocks/middle_block/output_blocks) of attention layers to diffusers names.

    Covers what ControlNeXt trains (tensors inside the transformer blocks); other keys raise an error.
    """
    per_block = unet_config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    out = {}
    for key, value in tensors.items():
        name = key.removeprefix("model.diffusion_model.")
        if not re.match(r"(input_blocks|middle_block|output_blocks)\.", name):
            out[name] = value
            continue
        match = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.1\.(.+)", name) or re.match(
            r"(middle_block)\.()1\.(.+)", name)
        if not match:
            raise ControlNextError(f"cannot convert LDM key {key!r}: only attention layers are supported")
        kind, index, rest = match.groups()
        if kind == "middle_block":
            out[f"mid_block.attentions.0.{rest}"] = value
        elif kind == "input_blocks":
            block, layer = divmod(int(index) - 1, per_block + 1)
            out[f"down_blocks.{block}.attentions.{layer}.{rest}"] = value
        else:
            block, layer = divmod(int(index), per_block + 1)
            out[f"up_blocks.{block}.attentions.{layer}.{rest}"] = value
    return out


# -- ControlNeXt -------------------------------------------------------------------------------------

def detect_variant(module_tensors: dict[str, torch.Tensor], unet) -> str:
    """Name the official configuration a module file follows, from its keys and the base model."""
    if "embedding.0.weight" not in module_tensors:
        return "sd15-v1"
    is_sdxl = unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"
    return "sdxl" if is_sdxl else "sd15"


def injection_width(unet, injection: str) -> int:
    """Channels of the UNet's features at an injection point."""
    channels = unet.config.block_out_channels
    return channels[-1] if injection == "mid_block" else channels[0]


def check_fits(model: ControlNeXtModel, unet, source: str) -> None:
    """Raise a one-line error when a ControlNeXt module was made for a base of another width."""
    if unet is None or model.injection == "residuals":
        return
    want, have = model.config.out_channels, injection_width(unet, model.injection)
    if want != have:
        raise ControlNextError(
            f"{source} was made for a base model with {want} channels at {model.injection}, but this base has "
            f"{have}; use the base model the control was trained for"
        )


def check_unet_weights(unet, weights: dict[str, torch.Tensor], source: str) -> None:
    """Raise unless every trained tensor names a parameter of `unet` with the same shape."""
    if unet is None:
        return
    params = dict(unet.named_parameters())
    for name, value in weights.items():
        if name not in params:
            raise ControlNextError(f"{source} changes UNet weight {name!r}, which this base model lacks; "
                                   "use the base model the control was trained for")
        if params[name].shape != value.shape:
            raise ControlNextError(f"{source}: UNet weight {name} is {tuple(value.shape)} but the base has "
                                   f"{tuple(params[name].shape)}; use the base model the control was trained for")


def absolute_weights(unet, weights: dict[str, torch.Tensor], increments: bool) -> dict[str, torch.Tensor]:
    if not increments:
        return weights
    if unet is None:
        raise ControlNextError("weight increments need the base UNet to add them to")
    params = dict(unet.named_parameters())
    return {name: params[name].detach().to(delta.dtype) + delta.to(params[name].device) for name, delta in weights.items()}


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def load_controlnext(
    path: str | Path,
    unet=None,
    *,
    variant: str | None = None,
    unet_file: str | Path | None = None,
    increments: bool | None = None,
    allow_pickle: bool = False,
) -> LoadedControl:
    """Load a ControlNeXt control from our folder format, an official release folder, or a module file."""
    path = Path(path)
    if not path.exists():
        raise ControlNextError(f"control weights not found: {path}")
    metadata: dict = {}
    if path.is_dir() and (path / "config.json").is_file():
        metadata = json.loads((path / "control.json").read_text()) if (path / "control.json").is_file() else {}
        try:
            model = ControlNeXtModel.from_pretrained(path)
        except (OSError, ValueError, RuntimeError) as error:
            raise ControlNextError(f"cannot load the ControlNeXt module in {path}: {str(error).splitlines()[0]}") from None
        if unet_file is None and (path / "unet.safetensors").is_file():
            unet_file = path / "unet.safetensors"
            increments = metadata.get("unet_weights") == "increments" if increments is None else increments
    else:
        module_file = path if path.is_file() else _find(path, MODULE_FILES)
        if module_file is None:
            raise ControlNextError(f"no ControlNeXt module in {path}; expected config.json or one of {', '.join(MODULE_FILES)}")
        tensors = read_tensors(module_file, allow_pickle)
        variant = variant or detect_variant(tensors, unet)
        if variant not in VARIANTS:
            raise ControlNextError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        model = ControlNeXtModel.from_variant(variant)
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except RuntimeError:  # same names, other shapes
            missing, unexpected = ["(tensor shapes differ)"], []
        if missing or unexpected:
            raise ControlNextError(
                f"{module_file.name} does not match the {variant} layout (missing {len(missing)}, unexpected "
                f"{len(unexpected)} keys, e.g. {(missing or unexpected)[0]}); pass the right --variant"
            )
        if unet_file is None and path.is_dir():
            unet_file = _find(path, UNET_FILES)
        metadata = {"variant": variant}
    check_fits(model, unet, str(path))

    unet_weights = None
    if unet_file is not None:
        unet_file = Path(unet_file)
        weights = read_tensors(unet_file, allow_pickle)
        if unet is not None and any(re.match(r"(model\.diffusion_model\.)?(input|middle|output)_block", k) for k in weights):
            weights = ldm_to_diffusers_unet_keys(weights, unet.config)
        if increments is None:
            increments = bool(re.search(r"increa?s?ement|increment|delta", unet_file.name))
        check_unet_weights(unet, weights, str(unet_file))
        unet_weights = absolute_weights(unet, weights, increments)
    return LoadedControl(model.eval(), "controlnext", unet_weights, float(metadata.get("scale", 1.0)), str(path), metadata)


def save_controlnext(
    path: str | Path,
    model: ControlNeXtModel,
    unet_weights: dict[str, torch.Tensor] | None = None,
    *,
    base_unet=None,
    increments: bool = False,
    layout: str = "ours",
    metadata: dict | None = None,
) -> Path:
    """Save a ControlNeXt control; `layout="official"` writes the release layout (controlnet + unet files)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in (unet_weights or {}).items()}
    if increments and weights:
        if base_unet is None:
            raise ValueError("saving increments needs the base UNet")
        params = dict(base_unet.named_parameters())
        weights = {k: v - params[k].detach().cpu().to(v.dtype) for k, v in weights.items()}
    if layout == "official":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "controlnet.safetensors"))
        if weights:
            name = "unet_weight_increasements.safetensors" if increments else "unet.safetensors"
            save_file(weights, str(path / name))
        return path
    if layout != "ours":
        raise ValueError(f"unknown layout {layout!r}; use 'ours' or 'official'")
    model.save_pretrained(path, safe_serialization=True)
    if weights:
        save_file(weights, str(path / "unet.safetensors"))
    info = {"method": "controlnext", "unet_weights": "increments" if increments else "absolute", **(metadata or {})}
    (path / "control.json").write_text(json.dumps(info, indent=2))
    return path


# -- methods registry ----------------------------------------------------------------------------------

# A control method is one loader here; `load_control` reads `control.json` to pick it.
LOADERS: dict[str, Callable[..., LoadedControl]] = {"controlnext": load_controlnext}


def load_control(path: str | Path, unet=None, *, method: str | None = None, **options) -> LoadedControl:
    """Load a control of any method; the method comes from `control.json`, else the argument, else ControlNeXt."""
    path = Path(path)
    if method is None and path.is_dir() and (path / "control.json").is_file():
        method = json.loads((path / "control.json").read_text()).get("method")
    method = method or "controlnext"
    if method not in LOADERS:
        raise ControlNextError(f"unknown control method {method!r}; known: {', '.join(LOADERS)}")
    return LOADERS[method](path, unet, **options)
