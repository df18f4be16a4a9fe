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


def tiny_svd_unet(seed: int = 0, **overrides):
    """A two-level UNetSpatioTemporalConditionModel (channels 32, 64: its group norms take 32 groups)."""
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=16,
        num_attention_heads=2, addition_time_embed_dim=4, projection_class_embeddings_input_dim=3 * 4,
    )
    config.update(overrides)
    return UNetSpatioTemporalConditionModel(**config).eval()


def tiny_sd3_transformer(seed: int = 0):
    """A two-block SD3Transformer2DModel: 2x2 patches become tokens of 8 features."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=8, pooled_projection_dim=12,
        pos_embed_max_size=16,
    ).eval()


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


def tiny_svd_controlnext(seed: int = 0, out_channels: int = 32):
    """`tiny_controlnext` joined as the SVD-v2 control joins: after down_blocks[0], normalise then pool, eps 1e-5,
    times 0.2; 32 channels for `tiny_svd_unet`."""
    return tiny_controlnext(seed, out_channels=out_channels, injection="down_blocks.0", pool_before_norm=False,
                            output_scale=0.2, cross_norm_eps=1e-5)


def byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE tokenizers (GPT-2, CLIP) use for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


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
    chars = byte_alphabet()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))


def tiny_clip_tokenizer():
    """A loaded character-level CLIPTokenizer (its files live only while loading)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="controlnext-tokenizer-") as folder:
        write_clip_tokenizer(Path(folder))
        return CLIPTokenizer.from_pretrained(folder)


def tiny_pipeline_components(seed: int = 0) -> dict:
    """UNet, VAE (8x), CLIP text encoder and tokenizer, DDIM scheduler: the parts of a StableDiffusionPipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
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


def main() -> None:
    """`python -m controlnext.testing DIR`: write a tiny random base model and control to DIR/base, DIR/control."""
    import sys

    from .control.loading import save_controlnext

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")
    save_tiny_pipeline(out / "base")
    save_controlnext(out / "control", tiny_controlnext(seed=3))
    print(out)


if __name__ == "__main__":
    main()


def tiny_sdxl_components(seed: int = 0) -> dict:
    """The parts of a StableDiffusionXLPipeline at toy size: two text encoders, size/crop conditioning."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, projection_dim=16)).eval()
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4, transformer_layers_per_block=(1, 2),
    ).eval()
    vae = tiny_pipeline_components(seed)["vae"]
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, scheduler=scheduler, image_encoder=None, feature_extractor=None)


def tiny_svd_components(seed: int = 0, num_frames: int = 6) -> dict:
    """The parts of a StableVideoDiffusionPipeline at toy size, built as diffusers' own SVD tests build them:
    `tiny_svd_unet` taking image latents, a temporal-decoder VAE (8x), a CLIP vision encoder, an EDM Euler
    scheduler (v-prediction, Karras sigmas)."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    # noise and image latents side by side: 8 input channels
    unet = tiny_svd_unet(seed, in_channels=8, num_attention_heads=(2, 4), num_frames=num_frames)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4,
        layers_per_block=1,
    ).eval()
    torch.manual_seed(seed + 2)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2, image_size=224,
        intermediate_size=32, patch_size=32,
    )).eval()
    feature_extractor = CLIPImageProcessor(crop_size=32, size=32)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    return dict(unet=unet, vae=vae, image_encoder=image_encoder, feature_extractor=feature_extractor,
                scheduler=scheduler)


def tiny_svd_pipeline(seed: int = 0, num_frames: int = 6):
    """A StableVideoDiffusionPipeline of `tiny_svd_components` (64 x 64 frames), progress bar off."""
    from diffusers import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline(**tiny_svd_components(seed, num_frames))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_svd_pipeline(folder: str | Path, seed: int = 0, num_frames: int = 6) -> Path:
    """Write a tiny random StableVideoDiffusionPipeline in diffusers format to `folder`."""
    folder = Path(folder)
    tiny_svd_pipeline(seed, num_frames).save_pretrained(folder)
    return folder


# -- SD3 ---------------------------------------------------------------------------------------------

def tiny_sd3_config():
    """Sizes of a toy SD3 as diffusers' own SD3 tests build one: 16 latent channels, two CLIPs, no T5."""
    from .models.tiny_sd3 import TinySD3Config

    return TinySD3Config(resolution=32, text_hidden_size=16, text_layers=1, text_heads=2, text_projection=8,
                         max_tokens=16, vae_channels=(8, 16), latent_channels=16, layers=2, heads=2, head_dim=8,
                         t5_tokens=4)


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline at toy size (32 px images, 8 x 8 patch grid of 16-feature tokens), random weights.

    The VAE's posterior is a point mass (log-variance -30), so diffusers' sampled condition latents equal
    the mode that this project's SD3 ControlNet reads."""
    import tempfile

    from .models.tiny_sd3 import build_pipeline

    with tempfile.TemporaryDirectory(prefix="controlnext-tokenizer-") as folder:
        pipe = build_pipeline(folder, tiny_sd3_config(), seed=seed, shift_factor=0.1, scaling_factor=1.5)
    latent = pipe.vae.config.latent_channels
    with torch.no_grad():
        pipe.vae.quant_conv.weight[latent:] = 0
        pipe.vae.quant_conv.bias[latent:] = -30.0
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.eval()
    return pipe


def save_tiny_sd3_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write the toy SD3 in diffusers format, recording the zero tokens it stands T5 in with (4)."""
    folder = Path(folder)
    pipe = tiny_sd3_pipeline(seed)
    pipe.save_pretrained(folder)
    (folder / "training_config.json").write_text(json.dumps({"max_sequence_length": tiny_sd3_config().t5_tokens}))
    return folder


def tiny_sd3_controlnext(seed: int = 0, **overrides):
    """A small ControlNeXt module for the toy SD3: 16 features, added after the patch embedding."""
    return tiny_controlnext(seed, **{"out_channels": 16, "injection": "pos_embed", "pool_before_norm": True, **overrides})


def tiny_sd3_controlnet(transformer, seed: int = 0, zero_convs: bool = False):
    """An SD3 ControlNet copied from the toy transformer (one block); random instead of zero layers by default."""
    from .models import SD3ControlNet

    torch.manual_seed(seed)
    model = SD3ControlNet.from_base(transformer, num_layers=1).eval()
    if not zero_convs:
        with torch.no_grad():
            for layer in (*model.controlnet_blocks, model.pos_embed_input.proj):
                layer.weight.normal_(0, 0.3)
                layer.bias.normal_(0, 0.1)
    return model
