"""The frozen parts of a Stable Diffusion base model that training needs, read from a local diffusers folder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import denoisers


@dataclass
class BaseModel:
    """UNet, VAE, text encoder(s) with tokenizer(s) and the training noise scheduler of one base model."""

    path: Path
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list
    noise_scheduler: object

    @property
    def family(self) -> str:
        return denoisers.family(self.unet)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> (hidden states (b, tokens, d), pooled SDXL embedding (b, p) or None), as the pipelines do."""
        if self.family != "sdxl":
            ids = self._token_ids(self.tokenizers[0], prompts, device)
            return self.text_encoders[0](ids)[0], None  # (b, 77, d)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            output = encoder(self._token_ids(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # (b, 77, d_i): SDXL reads the penultimate layer
            pooled = output[0] if output[0].ndim == 2 else pooled  # (b, p) from the projecting encoder
        return torch.cat(hidden, dim=-1), pooled  # (b, 77, d_1 + d_2)

    @staticmethod
    def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        return tokens.input_ids.to(device)  # (b, tokens)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Images (b, 3, H, W) in [-1, 1] -> scaled latents (b, 4, H/8, W/8), sampled from the VAE posterior."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator).float()  # (b, 4, H/8, W/8)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (b, 3, H, W) in [0, 1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        images = self.vae.decode(latents.to(self.vae.dtype)).sample  # (b, 3, H, W) in [-1, 1]
        return (images.float() / 2 + 0.5).clamp(0, 1)

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
    from diffusers import DDPMScheduler

    from ..pipelines.base import load_base

    pipe = load_base(source or None, device="cpu", dtype=torch.float32)
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    for module in (pipe.unet, pipe.vae, *encoders):
        module.requires_grad_(False).eval()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule (same betas)
    return BaseModel(Path(str(source or "")), pipe.unet, pipe.vae, encoders, tokenizers, noise_scheduler)
