"""Watching it learn: generate on fixed conditions and prompts with the family's pipeline, save a grid, measure
control fidelity."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from PIL import Image

from ..control import ControlUnit, attach_control
from ..denoisers import pipeline_denoiser
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
def generate(base, control, conditions: torch.Tensor, prompts: list[str], *, steps: int, guidance_scale: float,
             seed: int, scale: float = 1.0) -> torch.Tensor:
    """The family's own diffusers pipeline with DDIM (SD3: its flow-matching Euler) and `control` attached (None:
    the base alone) -> (n, 3, H, W).

    The initial noise comes from a CPU generator seeded with `seed` in float32, so every validation starts
    from the same latents, whatever the device and precision of training."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    sampler = FlowMatchEulerDiscreteScheduler if base.prediction_type == "flow_matching" else DDIMScheduler
    pipe = type(base.pipe).from_pipe(base.pipe, scheduler=sampler.from_config(base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipeline_denoiser(pipe)
    n, _, height, width = conditions.shape
    shape = (n, denoiser.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # (n, c, h, w)
    units = [] if control is None else [ControlUnit(control, base.prepare_condition(control, conditions), scale=scale,
                                                    name="validation")]
    attached = attach_control(denoiser, units, scheduler=pipe.scheduler, cfg=guidance_scale > 1) if units else nullcontext()
    with attached:
        return pipe(list(prompts), height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                    latents=latents, output_type="pt", **base.call_options).images  # (n, 3, H, W) in [0, 1]


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
