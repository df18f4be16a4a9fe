"""The frozen parts of a base model that training needs: its diffusers pipeline, read as `generate` reads it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import denoisers


@dataclass
class BaseModel:
    """The family's pipeline, its denoiser, VAE and text encoder(s), and the training noise scheduler."""

    path: Path
    pipe: object  # the diffusers pipeline: prompt encoding and validation images are its own
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    noise_scheduler: object
    call_options: dict = field(default_factory=dict)  # pipeline-call options the base records (max_sequence_length)

    @property
    def family(self) -> str:
        return denoisers.family(self.unet)

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: the scheduler's type, or "flow_matching" (SD3's velocity noise - data)."""
        if self.family == "sd3":
            return "flow_matching"
        return self.noise_scheduler.config.prediction_type

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> (hidden states (b, tokens, d), pooled embedding (b, p) or None) by the pipeline's encode_prompt."""
        options = dict(self.call_options)
        if self.family == "sd3":  # its encode_prompt requires the prompts of the second and third encoders
            options.update(prompt_2=None, prompt_3=None)
        encoded = self.pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False, **options)
        return encoded[0], encoded[2] if len(encoded) > 2 else None  # SDXL and SD3 also return pooled embeddings

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Images (b, 3, H, W) in [-1, 1] -> scaled latents (b, 4, H/8, W/8), sampled from the VAE posterior."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator).float()  # (b, 4, H/8, W/8)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def prepare_condition(self, control: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The condition as `control` reads it: pixels in [0, 1], or latents for controls that encode it (SD3 ControlNet)."""
        if hasattr(control, "prepare_condition"):
            return control.prepare_condition(pixels, self.vae)
        return pixels

    def added_conditions(self, pooled: torch.Tensor | None, original_sizes: torch.Tensor,
                         crops_top_left: torch.Tensor, resolution: int) -> dict | None:
        """SDXL's extra conditioning: pooled text embeds and time ids (original size, crop corner, target size)."""
        if self.family != "sdxl":
            return None
        target = torch.tensor([resolution, resolution]).expand(original_sizes.shape[0], 2)
        time_ids = torch.cat([original_sizes, crops_top_left, target], dim=1)  # (b, 6)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}

    def fingerprint(self) -> str:
        """A short hash of the UNet's architecture: checkpoints and weights must match it."""
        return unet_fingerprint(self.unet)


def unet_fingerprint(unet) -> str:
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_training_base(source: str | Path | None) -> BaseModel:
    """The base model's parts for training, read as `generate` reads it (a local diffusers folder, the offline
    Hugging Face cache or a single .safetensors file; None: the embedded default model)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from ..pipelines.base import call_defaults, load_base
    from .video import is_video_base

    if is_video_base(source):  # Stable Video Diffusion: a CLIP image encoder instead of text encoders
        from ..pipelines.video import load_video_base

        pipe = load_video_base(source, device="cpu", dtype=torch.float32)
        for module in (pipe.unet, pipe.vae, pipe.image_encoder):
            module.requires_grad_(False).eval()
        return BaseModel(Path(str(source)), pipe, pipe.unet, pipe.vae, [pipe.image_encoder], pipe.scheduler)
    pipe = load_base(source or None, device="cpu", dtype=torch.float32)
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    encoders = [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None]
    denoiser = denoisers.pipeline_denoiser(pipe)
    for module in (denoiser, pipe.vae, *encoders):
        module.requires_grad_(False).eval()
    if denoisers.family(denoiser) == "sd3":  # the training sigmas: the sampler's own shifted schedule
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule (same betas)
    return BaseModel(Path(str(source or "")), pipe, denoiser, pipe.vae, encoders, noise_scheduler, call_defaults(pipe))
