"""ControlNeXt as a control method: recognising its files, loading and saving them, a fresh module for a base.

The module and Cross Normalization live in `controlnext.models.controlnext`; the release layouts and our
folder format are read and written by `controlnext.control.loading`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..control.attach import check_fits
from ..control.loading import PICKLE_SUFFIXES, load_controlnext, release_module_file, save_controlnext, tensor_names
from ..denoisers import family, find_site, site_width
from ..errors import ControlNextError
from ..models import VARIANTS, ControlNeXtModel
from . import ControlMethod, register

# Per family, where the official code adds the control and which base weights its recipe trains.
# On SD3 right after the patch embedding, where the image is tokens on the patch grid, with the joint
# blocks' attention outputs.
DEFAULT_SITES = {"sd": "down_blocks.0", "sdxl": "conv_in", "svd": "down_blocks.0", "sd3": "pos_embed"}
TRAINABLE = {"sd": "sd15", "sdxl": "sdxl", "sd3": "sd3"}
# A family whose official code joins the features its own way starts from that layout (its width follows the base):
# SVD-v2's training code normalises, then pools, with eps 1e-5, times 0.2.
FAMILY_LAYOUTS = {"svd": {k: v for k, v in VARIANTS["svd-training"].items() if k != "out_channels"}}


def detect(path: Path) -> bool:
    """Our module folder without control.json, an official release folder or module file."""
    if path.is_dir():
        config = path / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == ControlNeXtModel.__name__:
            return True
        return release_module_file(path) is not None
    if path.suffix in PICKLE_SUFFIXES:
        return True  # the official releases ship pickled modules; reading them needs the explicit opt-in
    names = tensor_names(path) or []
    return any(name.startswith(("mid_convs.", "down_res.")) for name in names)


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


def build(denoiser: nn.Module, config, vae_scale_factor: int = 8) -> ControlNeXtModel:
    """A fresh module: a named official layout, or our sizes with the injection site and width of this base.

    Any image-to-latent factor works: the module pools its features to the size of the injection site."""
    if config.module_variant:
        if config.module_variant not in VARIANTS:
            raise ControlNextError(f"unknown --module-variant {config.module_variant!r}; known: {', '.join(VARIANTS)}")
        model = ControlNeXtModel.from_variant(config.module_variant)
        source = f"--module-variant {config.module_variant}"
    else:
        kind = family(denoiser)
        sizes = {**FAMILY_LAYOUTS.get(kind, {}), **parse_module_config(config.module_config)}
        if "injection" not in sizes:
            if kind not in DEFAULT_SITES:
                raise ControlNextError(f"no default injection site for a {kind} base; give \"injection\" in "
                                       "--module-config")
            sizes["injection"] = DEFAULT_SITES[kind]
        find_site(denoiser, sizes["injection"])
        sizes.setdefault("out_channels", site_width(denoiser, sizes["injection"]))
        sizes.setdefault("pool_before_norm", sizes["injection"] != "conv_in")  # as the official code at each site
        try:
            model = ControlNeXtModel(**sizes)
        except (TypeError, ValueError) as error:
            raise ControlNextError(f"--module-config does not build a ControlNeXt module: {error}") from None
        source = "the control module"
    check_fits(model, denoiser, source)
    return model


def save(path, model, base_weights=None, *, original_weights=None, increments=False, metadata=None,
         dtype=None) -> Path:
    """Our folder format; increments are taken against `original_weights`, the base weights before training."""
    base = _Parameters(original_weights) if increments else None
    return save_controlnext(path, model, base_weights, base_unet=base, increments=increments, metadata=metadata,
                            dtype=dtype)


class _Parameters:
    """Stands in for a base model whose parameters are the given tensors (what save_controlnext reads)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def named_parameters(self):
        return iter(self.tensors.items())


register(ControlMethod(
    name="controlnext", model_class=ControlNeXtModel, load=load_controlnext, save=save, build=build, detect=detect,
    trainable=lambda kind: TRAINABLE.get(kind, "sd15"),
    module_lr_factor=10.0,  # its maintainers' recipe: 1e-4 for the module beside 1e-5 for the base subset
))
