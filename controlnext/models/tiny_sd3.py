"""A tiny Stable Diffusion 3 for the shapes world: SD3's architecture (an MMDiT transformer, a VAE, two CLIP
text encoders with projections, flow matching), only narrower and shallower, and without T5.

The components are the classes a real SD3 / SD3.5 checkpoint has (`SD3Transformer2DModel`, `AutoencoderKL`
with a shift and scaling factor, two `CLIPTextModelWithProjection`, `FlowMatchEulerDiscreteScheduler`), so
the model runs through diffusers' own `StableDiffusion3Pipeline`, its img2img and inpaint pipelines, and
through the same control code as downloaded weights. The third text encoder is left out, as diffusers
allows: the pipeline then feeds `max_sequence_length` zero tokens in its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tiny_sd import build_tokenizer, build_vae

SD3_BASE_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "sd3-base"


@dataclass(frozen=True)
class TinySD3Config:
    """Sizes of the tiny SD3's parts (defaults: the shapes-world base model)."""

    resolution: int = 64
    text_hidden_size: int = 32  # per CLIP encoder; the transformer reads both side by side
    text_layers: int = 2
    text_heads: int = 2
    text_projection: int = 32  # pooled projection per encoder; the transformer reads both (2x)
    max_tokens: int = 32
    vae_channels: tuple[int, ...] = (32, 64, 64)  # latents at resolution / 2**(len - 1)
    latent_channels: int = 4
    norm_groups: int = 8  # of the VAE
    patch_size: int = 2
    layers: int = 4
    heads: int = 2
    head_dim: int = 32
    t5_tokens: int = 8  # the zero tokens standing in for T5 (the pipeline's max_sequence_length)
    shift: float = 1.0  # the flow-matching schedule's shift (SD3 uses 3.0 at 1024 px; small images need less)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def build_text_encoders(tokenizer, config: TinySD3Config = TinySD3Config()) -> list:
    """Two freshly initialised CLIPTextModelWithProjection (SD3's CLIP-L and CLIP-G slots)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden_size, intermediate_size=4 * config.text_hidden_size,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_tokens, projection_dim=config.text_projection, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return [CLIPTextModelWithProjection(text), CLIPTextModelWithProjection(text)]


def build_transformer(config: TinySD3Config = TinySD3Config()):
    """A freshly initialised SD3Transformer2DModel reading both CLIP encoders (hidden states side by side)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=config.latent_size, patch_size=config.patch_size, in_channels=config.latent_channels,
        out_channels=config.latent_channels, num_layers=config.layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.heads, joint_attention_dim=2 * config.text_hidden_size,
        caption_projection_dim=config.width, pooled_projection_dim=2 * config.text_projection,
        pos_embed_max_size=config.latent_size,
    )


def build_scheduler(shift: float = 1.0):
    """SD3's sampler: Euler on the rectified-flow ODE, sigmas shifted by `shift` (Esser et al., 2024, Sec. 5.3.2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def assemble_pipeline(vae, text_encoders, tokenizer, transformer, scheduler):
    """A StableDiffusion3Pipeline without T5; one tokenizer serves both CLIP slots."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizer,
        text_encoder_2=text_encoders[1], tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_pipeline(folder: str | Path, config: TinySD3Config = TinySD3Config(), seed: int = 0,
                   shift_factor: float = 0.0, scaling_factor: float = 1.0):
    """A freshly initialised tiny SD3 pipeline (random weights; the tokenizer's files go to `folder`)."""
    import torch

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder, config)
    vae = build_vae(config)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    return assemble_pipeline(vae, build_text_encoders(tokenizer, config), tokenizer, build_transformer(config),
                             build_scheduler(config.shift))


def load_sd3_base_pipeline(folder: str | Path = SD3_BASE_MODEL_DIR, dtype=None):
    """The shapes-world SD3 (or any SD3 diffusers folder) as a StableDiffusion3Pipeline, float32 by default."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from ..errors import ControlNextError

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ControlNextError(f"no diffusers model in {folder}; train one with scripts/train_base_sd3.py")
    return StableDiffusion3Pipeline.from_pretrained(str(folder), dtype=dtype or torch.float32, text_encoder_3=None,
                                                    tokenizer_3=None)
