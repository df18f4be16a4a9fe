"""Watching it learn: generate on fixed conditions and prompts, save a grid, measure control fidelity."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import ControlNextError
from ..images import load_image, prepare_condition, tensor_to_pil
from .config import TrainConfig


@dataclass
class ValidationSet:
    """Fixed conditions (n, 3, H, W) in [0, 1] and their prompts."""

    conditions: torch.Tensor
    prompts: list[str]


def validation_set(config: TrainConfig, dataset) -> ValidationSet:
    """The --validation-images with their prompts, else the first examples of the data with their captions."""
    size = config.resolution
    if config.validation_images:
        conditions = torch.stack([prepare_condition(load_image(p), size, size) for p in config.validation_images])
        captions = [""] * len(conditions)
    else:
        items = [dataset[i] for i in range(min(config.validation_examples, len(dataset)))]
        conditions = torch.stack([item["conditioning"] for item in items])
        captions = [item["caption"] for item in items]
    prompts = config.validation_prompts or captions
    if len(prompts) == 1:
        prompts = prompts * len(conditions)
    if len(prompts) != len(conditions):
        raise ControlNextError(f"{len(prompts)} --validation-prompts for {len(conditions)} validation conditions; "
                               "give one prompt for all or one per condition")
    return ValidationSet(conditions, list(prompts))


def resolve_metric(name: str) -> tuple[str, Callable[[Image.Image, Image.Image], float]] | None:
    """--validation-metric -> (name, f(condition, generated) -> float); "auto" is edge F1 when available."""
    if name == "none":
        return None
    key = "edge_f1" if name == "auto" else name
    try:
        function = getattr(importlib.import_module("controlnext.metrics"), key)
    except (ImportError, AttributeError):
        if name == "auto":
            return None
        raise ControlNextError(f"--validation-metric {name} needs controlnext.metrics.{key}, which this installation "
                               "lacks; pass --validation-metric none") from None
    return key, function


@torch.no_grad()
def sample(model, base, conditions: torch.Tensor, prompts: list[str], *, steps: int, guidance_scale: float,
           seed: int, device) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance through the controlled UNet -> images (n, 3, H, W) in [0, 1]."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    n, _, height, width = conditions.shape
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    shape = (n, base.unet.config.in_channels, height // factor, width // factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)  # (n, 4, h, w)
    latents = latents * scheduler.init_noise_sigma
    hidden, pooled = base.encode_prompts([""] * n + list(prompts), device)  # (2n, tokens, d): unconditional first
    sizes = torch.tensor([[height, width]] * 2 * n)
    added = base.added_conditions(pooled, sizes, torch.zeros_like(sizes), height) if base.family == "sdxl" else None
    condition = torch.cat([conditions, conditions]).to(device)  # (2n, 3, H, W): both halves see the condition
    for t in scheduler.timesteps:
        latent_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)  # (2n, 4, h, w)
        prediction = model(latent_input, t, hidden, condition, added)
        unconditional, conditional = prediction.float().chunk(2)
        guided = unconditional + guidance_scale * (conditional - unconditional)  # CFG, Ho & Salimans (2022) Eq. 6
        latents = scheduler.step(guided, t, latents).prev_sample
    return base.decode_latents(latents)  # (n, 3, H, W)


def image_grid(conditions: torch.Tensor, images: torch.Tensor) -> Image.Image:
    """One row per example: condition | generated image."""
    n, _, height, width = images.shape
    grid = Image.new("RGB", (2 * width, n * height))
    for row, (condition, image) in enumerate(zip(conditions, images)):
        grid.paste(tensor_to_pil(condition), (0, row * height))
        grid.paste(tensor_to_pil(image), (width, row * height))
    return grid


def fidelity(metric, conditions: torch.Tensor, images: torch.Tensor) -> float | None:
    """Mean control fidelity of generated images against their conditions."""
    if metric is None:
        return None
    _, function = metric
    scores = [float(function(tensor_to_pil(c), tensor_to_pil(i))) for c, i in zip(conditions, images)]
    return sum(scores) / len(scores)
