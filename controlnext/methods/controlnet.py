"""ControlNet as a control method: recognising its files, loading and saving them, a fresh copy of a base.

The model is diffusers' `ControlNetModel` behind the control interface (`controlnext.models.controlnet`);
its folders and original single files are read and written by `controlnext.control.loading`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..control.loading import is_diffusers_controlnet, load_controlnet, save_controlnet, tensor_names
from ..denoisers import family
from ..errors import ControlNextError
from ..models import ControlNet, SD3ControlNet
from . import ControlMethod, register


def detect(path: Path) -> bool:
    """A diffusers ControlNet folder, or a single file in diffusers or original key names."""
    if path.is_dir():
        return is_diffusers_controlnet(path)
    names = tensor_names(path) or []
    return any("input_hint_block" in name or "controlnet_cond_embedding" in name for name in names)


def build(denoiser: nn.Module, config, vae_scale_factor: int = 8) -> ControlNet:
    """A ControlNet copied from this base's encoder, its zero convolutions at zero (Zhang et al., Sec. 3.1).

    Its condition encoder halves the image once per step from pixels to latents: diffusers' widths
    (16, 32, 96, 256) for SD's factor 8, fewer levels for a VAE of a smaller factor. On SD3 it is
    diffusers' SD3 ControlNet: a copy of the first `--controlnet-layers` joint blocks reading the
    condition's latents.
    """
    if family(denoiser) == "sd3":
        try:
            return SD3ControlNet.from_base(denoiser, config.controlnet_layers)
        except ValueError as error:
            raise ControlNextError(f"--controlnet-layers: {error}") from None
    levels = max(int(vae_scale_factor).bit_length() - 1, 0)  # log2 of the factor
    widths = (16, 32, 96, 256, 256, 256)[:levels + 1]
    return ControlNet.from_unet(denoiser, conditioning_embedding_out_channels=widths)


def save(path, model, base_weights=None, *, original_weights=None, increments=False, metadata=None,
         dtype=None) -> Path:
    """ControlNet keeps the base locked: only its own copy is saved."""
    if base_weights:
        raise ControlNextError("ControlNet trains its own copy of the encoder only; use --trainable none")
    return save_controlnet(path, model, metadata=metadata, dtype=dtype)


register(ControlMethod(name="controlnet", model_class=(ControlNet, SD3ControlNet), load=load_controlnet, save=save, build=build,
                       detect=detect))
