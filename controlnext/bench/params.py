"""Trainable and total parameters of ControlNeXt and ControlNet on a base architecture (no weights needed)."""

from __future__ import annotations

import re

import torch

from .architectures import ARCHITECTURES, build_unet


def count_parameters(architecture: str) -> dict:
    """Parameter counts for `architecture` ("sd15" | "sdxl"), built on the meta device in seconds.

    ControlNeXt trains its module plus the selected base weights (which replace base weights, so they add
    nothing at inference); ControlNet trains and adds a copy of the encoder (ControlNetModel.from_unet).
    """
    from ..models import ControlNet, ControlNeXtModel

    spec = ARCHITECTURES[architecture]
    unet = build_unet(architecture, device="meta")
    base = _numel(unet.parameters())
    pattern = re.compile(spec["trained_unet_pattern"])
    trained_unet = _numel(p for name, p in unet.named_parameters() if pattern.search(name))
    with torch.device("meta"):
        module = _numel(ControlNeXtModel.from_variant(spec["controlnext_variant"]).parameters())
        controlnet = _numel(ControlNet.from_unet(unet, load_weights_from_unet=False).parameters())
    return {
        "architecture": architecture,
        "base_unet": base,
        "controlnext": {"module": module, "trained_unet": trained_unet, "trainable": module + trained_unet,
                        "added": module, "total": base + module, "trained_unet_pattern": spec["trained_unet_pattern"]},
        "controlnet": {"trainable": controlnet, "added": controlnet, "total": base + controlnet},
    }


def _numel(parameters) -> int:
    return sum(p.numel() for p in parameters)
