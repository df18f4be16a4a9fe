"""Control methods the trainer knows: how to build a fresh model for a base UNet and how to save it.

A method is one `TrainingMethod` entry in METHODS; its model implements the attach interface
(`controlnext.control.attach.ControlModel`), so the trainer runs it through `attach_control` as
inference does. Loading back goes through `controlnext.control.loading.LOADERS` by the same name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..control.attach import check_fits
from ..control.loading import save_controlnet, save_controlnext
from ..denoisers import site_width
from ..errors import ControlNextError
from ..models import VARIANTS, ControlNeXtModel
from .config import TrainConfig


@dataclass(frozen=True)
class TrainingMethod:
    """How to build a fresh control model for a base UNet and how to save a trained one."""

    build: Callable[..., nn.Module]  # (base UNet, config, vae_scale_factor=8) -> control model
    save: Callable[..., Path]  # (path, model, unet_weights, *, original_weights, increments, metadata) -> path
    auto_trainable: Callable[[bool], str]  # is_sdxl -> the preset "--trainable auto" means


def is_sdxl_unet(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def parse_module_config(text: str | None) -> dict:
    """--module-config: a JSON object or the path of a .json file holding one."""
    if not text:
        return {}
    source = Path(text).read_text() if text.strip().endswith(".json") and Path(text).is_file() else text
    try:
        values = json.loads(source)
    except json.JSONDecodeError as error:
        raise ControlNextError(f"--module-config is neither a JSON object nor a .json file ({error})") from None
    if not isinstance(values, dict):
        raise ControlNextError("--module-config must be a JSON object of ControlNeXtModel arguments")
    return values


def build_controlnext(unet: nn.Module, config: TrainConfig, vae_scale_factor: int = 8) -> ControlNeXtModel:
    """A fresh module: a named official layout, or our sizes with the injection point and width of this base.

    Any image-to-latent factor works: the module pools its features to the size of the injection point."""
    if config.module_variant:
        if config.module_variant not in VARIANTS:
            raise ControlNextError(f"unknown --module-variant {config.module_variant!r}; known: {', '.join(VARIANTS)}")
        model = ControlNeXtModel.from_variant(config.module_variant)
        source = f"--module-variant {config.module_variant}"
    else:
        sizes = parse_module_config(config.module_config)
        sizes.setdefault("injection", "conv_in" if is_sdxl_unet(unet) else "down_blocks.0")
        sizes.setdefault("out_channels", site_width(unet, sizes["injection"]))
        sizes.setdefault("pool_before_norm", sizes["injection"] != "conv_in")  # as the official code at each point
        try:
            model = ControlNeXtModel(**sizes)
        except (TypeError, ValueError) as error:
            raise ControlNextError(f"--module-config does not build a ControlNeXt module: {error}") from None
        source = "the control module"
    check_fits(model, unet, source)
    return model


def save_controlnext_training(path, model, unet_weights, *, original_weights=None, increments=False, metadata=None):
    """Save for `load_control`; increments are taken against the base weights before training."""
    base = _Parameters(original_weights) if increments else None
    return save_controlnext(path, model, unet_weights, base_unet=base, increments=increments, metadata=metadata)


class _Parameters:
    """Stands in for a base UNet whose parameters are the given tensors (what save_controlnext reads)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def named_parameters(self):
        return iter(self.tensors.items())


def build_controlnet(unet: nn.Module, config: TrainConfig, vae_scale_factor: int = 8) -> nn.Module:
    """A ControlNet copied from this base's encoder, its zero convolutions at zero (Zhang et al., Sec. 3.1).

    Its condition encoder halves the image once per step from pixels to latents: diffusers' widths
    (16, 32, 96, 256) for SD's factor 8, fewer levels for a VAE of a smaller factor.
    """
    from ..models import ControlNet

    levels = max(int(vae_scale_factor).bit_length() - 1, 0)  # log2 of the factor
    widths = (16, 32, 96, 256, 256, 256)[:levels + 1]
    return ControlNet.from_unet(unet, conditioning_embedding_out_channels=widths)


def save_controlnet_training(path, model, unet_weights, *, original_weights=None, increments=False, metadata=None):
    """ControlNet keeps the base locked: only its own copy is saved."""
    if unet_weights:
        raise ControlNextError("ControlNet trains its own copy of the encoder only; use --trainable none")
    return save_controlnet(path, model, metadata=metadata)


METHODS: dict[str, TrainingMethod] = {
    "controlnext": TrainingMethod(
        build=build_controlnext,
        save=save_controlnext_training,
        auto_trainable=lambda is_sdxl: "sdxl" if is_sdxl else "sd15",
    ),
    "controlnet": TrainingMethod(
        build=build_controlnet,
        save=save_controlnet_training,
        auto_trainable=lambda is_sdxl: "none",
    ),
}


def get_method(name: str) -> TrainingMethod:
    if name not in METHODS:
        raise ControlNextError(f"unknown --method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
