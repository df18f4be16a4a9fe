"""The denoisers that control attaches to, as data: one entry per diffusers class.

An entry says how to read a call (which argument is the noisy sample, the timestep and the encoder
states; how many rows the inner layers see per item, e.g. the frames of a video), names the family's
injection sites (a submodule, before or after it, where the tensor sits in its arguments or output, and
whether the features there are a spatial map or tokens on a patch grid) and lists the documented
arguments through which residual methods pass their outputs. Attaching a control, checking that it
fits and training read this table; adding a family is one entry here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from .errors import ControlNextError

Layout = Literal["map", "tokens"]


@dataclass(frozen=True)
class Site:
    """A place where an add-at-a-site control joins the denoising features."""

    module: str  # submodule path, e.g. "down_blocks.0"
    when: Literal["before", "after"]  # change the submodule's input, or its output
    tensor: str | int | None  # before: the argument's name; after: the index in its output tuple (None: the output)
    width: Callable[[Any], int]  # denoiser config -> channels (maps) or features per token there
    layout: Layout = "map"  # (rows, c, h, w), or (rows, h * w, c) on the patch grid


@dataclass(frozen=True)
class Denoiser:
    """One family's denoiser, described for attaching control and training it."""

    family: Callable[[Any], str]  # config -> family name ("sd", "sdxl", ...), which recipes are keyed by
    sites: dict[str, Site]
    sample: str = "sample"  # the argument holding the noisy input
    timestep: str = "timestep"
    encoder_states: str = "encoder_hidden_states"
    rows_per_item: Callable[[torch.Tensor], int] = lambda sample: 1  # rows the sites see per batch item
    patch_size: Callable[[Any], int] = lambda config: 1  # the sample's side over the token grid's side
    residuals: tuple[str, ...] = ()  # documented forward arguments that residual methods fill
    block_order: tuple[str, ...] = ()  # top-level parts in the order the features pass them
    block_class: str = ""  # the class name of its transformer blocks (trainable-weight selection)


def _first_width(config) -> int:
    return config.block_out_channels[0]


def _last_width(config) -> int:
    return config.block_out_channels[-1]


def _inner_dim(config) -> int:
    return config.num_attention_heads * config.attention_head_dim


# The UNets keep the first skip connection before any addition: a control "at conv_in" changes the input
# of the first down block, not conv_in's output. After a down block only its output features change,
# not the skips it stored.
_UNET_SITES = {
    "conv_in": Site("down_blocks.0", "before", "hidden_states", _first_width),
    "down_blocks.0": Site("down_blocks.0", "after", 0, _first_width),
    "mid_block": Site("mid_block", "after", None, _last_width),
}

DENOISERS: dict[str, Denoiser] = {
    # Stable Diffusion 1.x/2.x and SDXL (SDXL adds pooled text and size embeddings: "text_time").
    "UNet2DConditionModel": Denoiser(
        family=lambda config: "sdxl" if config.get("addition_embed_type") == "text_time" else "sd",
        sites=_UNET_SITES,
        residuals=("down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals"),
        block_order=("down_blocks", "mid_block", "up_blocks"),
        block_class="BasicTransformerBlock",
    ),
    # Stable Video Diffusion: samples (b, frames, c, h, w), flattened to b * frames rows inside.
    "UNetSpatioTemporalConditionModel": Denoiser(
        family=lambda config: "svd",
        sites=_UNET_SITES,
        rows_per_item=lambda sample: sample.shape[1],
        block_order=("down_blocks", "mid_block", "up_blocks"),
        block_class="BasicTransformerBlock",
    ),
    # Stable Diffusion 3: patches become tokens; each joint block returns (encoder states, tokens).
    "SD3Transformer2DModel": Denoiser(
        family=lambda config: "sd3",
        sample="hidden_states",
        sites={
            "pos_embed": Site("pos_embed", "after", None, _inner_dim, "tokens"),
            "transformer_blocks.0": Site("transformer_blocks.0", "after", 1, _inner_dim, "tokens"),
        },
        patch_size=lambda config: config.patch_size,
        residuals=("block_controlnet_hidden_states",),
        block_order=("transformer_blocks",),
        block_class="JointTransformerBlock",
    ),
}


def describe(denoiser) -> Denoiser:
    """The table's entry for a denoiser (by its class or a base class); an error names the known ones."""
    for cls in type(denoiser).__mro__:
        if cls.__name__ in DENOISERS:
            return DENOISERS[cls.__name__]
    raise ControlNextError(f"control cannot attach to a {type(denoiser).__name__}; known denoisers: "
                           f"{', '.join(DENOISERS)}")


def family(denoiser) -> str:
    """The family of a denoiser ("sd", "sdxl", "svd", "sd3"), read from its class and config."""
    return describe(denoiser).family(denoiser.config)


def site_names() -> tuple[str, ...]:
    """Every site name some denoiser has, in table order."""
    return tuple(dict.fromkeys(name for entry in DENOISERS.values() for name in entry.sites))


def site_width(denoiser, name: str) -> int:
    """Channels (or token features) of the denoiser's features at a site."""
    return describe(denoiser).sites[name].width(denoiser.config)


def find_site(denoiser, name: str) -> tuple[Site, torch.nn.Module]:
    """The site called `name` and the submodule it hooks; an error when this denoiser has neither."""
    entry = describe(denoiser)
    if name not in entry.sites:
        raise ControlNextError(f"a {type(denoiser).__name__} has no injection site {name!r}; its sites: "
                               f"{', '.join(entry.sites)}")
    site = entry.sites[name]
    try:
        module = denoiser.get_submodule(site.module)
    except AttributeError:
        module = None
    if module is None:
        raise ControlNextError(f"this control joins the features at {name}, but this {type(denoiser).__name__} "
                               f"has no {site.module}; use a base model that has one")
    return site, module


def pipeline_denoiser(pipe) -> torch.nn.Module:
    """The denoiser of a diffusers pipeline: its `unet`, or its `transformer`."""
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if model is not None:
            return model
    raise ControlNextError(f"{type(pipe).__name__} has neither a unet nor a transformer to attach control to")


# -- reading a call ------------------------------------------------------------------------------------

@dataclass
class DenoiserCall:
    """One call of a denoiser, read through its table entry."""

    inputs: dict[str, Any]  # every argument given, by name
    sample: torch.Tensor
    timestep: torch.Tensor  # (items,)
    items: int  # the batch as the caller counts it
    rows_per_item: int  # rows at the sites per item (frames for video)
    grid: tuple[int, int]  # the token grid (maps: the sample's spatial size)
    parameters: list[str] = field(default_factory=list)  # the forward's argument names in order

    @property
    def rows(self) -> int:
        return self.items * self.rows_per_item


_SIGNATURES: dict[type, inspect.Signature] = {}


def signature(module: torch.nn.Module) -> inspect.Signature:
    cls = type(module)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(module.forward)
    return _SIGNATURES[cls]


def arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A module call's arguments by name."""
    return dict(signature(module).bind_partial(*args, **kwargs).arguments)


def read_call(entry: Denoiser, denoiser: torch.nn.Module, args: tuple, kwargs: dict) -> DenoiserCall:
    inputs = arguments(denoiser, args, kwargs)
    sample = inputs[entry.sample]
    items = sample.shape[0]
    timestep = torch.as_tensor(inputs[entry.timestep], device=sample.device).reshape(-1)
    timestep = timestep.expand(items) if timestep.numel() == 1 else timestep
    patch = entry.patch_size(denoiser.config)
    grid = (sample.shape[-2] // patch, sample.shape[-1] // patch)
    return DenoiserCall(inputs, sample, timestep, items, entry.rows_per_item(sample), grid,
                        list(signature(denoiser).parameters))


def set_argument(module: torch.nn.Module, args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
    """Replace (or add) the argument `name` of a module call, wherever the caller put it."""
    names = list(signature(module).parameters)
    index = names.index(name) if name in names else len(args)
    if index < len(args):
        return (*args[:index], value, *args[index + 1:]), kwargs
    return args, {**kwargs, name: value}


# -- feature layouts -----------------------------------------------------------------------------------

def as_map(x: torch.Tensor, layout: Layout, grid: tuple[int, int]) -> torch.Tensor:
    """Features at a site -> a spatial map (rows, c, h, w), which is how controls are resized and added."""
    if layout == "map":
        return x
    rows, tokens, width = x.shape  # (rows, h * w, c)
    if tokens != grid[0] * grid[1]:
        raise ControlNextError(f"{tokens} tokens at the site do not form the {grid[0]}x{grid[1]} patch grid")
    return x.transpose(1, 2).reshape(rows, width, *grid)  # (rows, c, h, w)


def from_map(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A spatial map back to the site's own layout."""
    if layout == "map":
        return x
    return x.flatten(2).transpose(1, 2)  # (rows, h * w, c)
