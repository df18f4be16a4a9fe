"""Tiny seeded Stable Diffusion components for tests and demos: same classes as real weights, few parameters."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_unet(seed: int = 0, cross_attention_dim: int = 16, sample_size: int = 8, **overrides):
    """A two-level UNet2DConditionModel (channels 8, 16) with cross attention in the first block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_controlnext(seed: int = 0, out_channels: int = 8, **overrides):
    """A small ControlNeXt module (8x smaller output) matching `tiny_unet`'s first block."""
    from .models import ControlNeXtModel

    torch.manual_seed(seed)
    config = dict(
        stem_channels=(8,), stem_groups=2, block_out_channels=(8, 16), block_groups=(2, 4),
        out_channels=out_channels, time_proj_dim=16, time_embed_dim=32,
    )
    config.update(overrides)
    model = ControlNeXtModel(**config).eval()
    with torch.no_grad():  # random init leaves the last conv near zero; make control visible in tests
        model.mid_convs[1].weight.normal_(0, 0.5)
    return model


def tiny_controlnet(unet=None, seed: int = 0, zero_convs: bool = False):
    """A ControlNet copied from `unet` (default `tiny_unet()`), condition 8x the latent size.

    With `zero_convs=False` the zero convolutions get random weights, so the control is visible in tests.
    """
    from .models import ControlNet

    unet = unet if unet is not None else tiny_unet()
    torch.manual_seed(seed)
    model = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 8)).eval()
    if not zero_convs:
        zero = [model.controlnet_cond_embedding.conv_out, model.controlnet_mid_block, *model.controlnet_down_blocks]
        with torch.no_grad():
            for conv in zero:
                conv.weight.normal_(0, 0.3)
                conv.bias.normal_(0, 0.1)
    return model


def write_clip_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A character-level CLIP tokenizer (byte alphabet, no merges) as vocab.json + merges.txt."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))


def tiny_pipeline_components(seed: int = 0, folder: Path | None = None) -> dict:
    """UNet, VAE (8x), CLIP text encoder and tokenizer, DDIM scheduler: the parts of a StableDiffusionPipeline."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder or tempfile.mkdtemp(prefix="controlnext-tokenizer-"))
    write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(4, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return dict(
        unet=tiny_unet(seed), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None,
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionPipeline in diffusers format to `folder`."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    pipe = StableDiffusionPipeline(**tiny_pipeline_components(seed), requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
