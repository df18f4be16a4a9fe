"""A tiny Stable Diffusion for the shapes world: the standard architecture, only narrower and shallower.

The components are the ones a real Stable Diffusion 1.x checkpoint has (a CLIP tokenizer and text
encoder, an AutoencoderKL, a UNet2DConditionModel, a DDIM scheduler), so the embedded base model runs
through exactly the same diffusers code path as downloaded weights. The tokenizer is a real byte-level
BPE CLIP tokenizer whose merges spell every word of the shapes world as one token.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..data.shapes import PALETTE, SHAPE_KINDS

BASE_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "base"
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"


@dataclass(frozen=True)
class TinySDConfig:
    """Sizes of the tiny model's parts (defaults: the shipped base model)."""

    resolution: int = 128
    text_hidden_size: int = 64
    text_layers: int = 3
    text_heads: int = 4
    max_tokens: int = 32
    vae_channels: tuple[int, ...] = (32, 64, 64)  # latents at resolution / 2**(len - 1)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 128, 128)
    # 1 where a level has cross-attention (SDXL's layout: none at the finest level, which is costly; empty: SD
    # 1.x's, every level but the coarsest)
    unet_attention: tuple[int, ...] = (0, 1, 1, 0)
    unet_layers_per_block: int = 1
    attention_heads: int = 4
    norm_groups: int = 8

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def shapes_words() -> list[str]:
    """Every word a shapes-world caption uses."""
    return sorted({*PALETTE, *SHAPE_KINDS, "a", "an", "and", "on", "background", ","})


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that spell every word as one token (Sennrich et al., 2016, Alg. 1, run to the end).

    Ties go to the pair first in sorted order, so the merges are the same on every machine.
    """
    spellings = {tuple(word[:-1]) + (word[-1] + WORD_END,): 0 for word in words}
    merges = []
    while True:
        pairs = Counter(pair for spelling in spellings for pair in zip(spelling, spelling[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        spellings = {_merge(spelling, best): 0 for spelling in spellings}


def _merge(spelling: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, index = [], 0
    while index < len(spelling):
        if spelling[index:index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(spelling[index])
            index += 1
    return tuple(merged)


def write_tokenizer_files(folder: str | Path, words: Iterable[str] | None = None, max_tokens: int = 32) -> Path:
    """Write a CLIP tokenizer (vocab.json, merges.txt) for `words`; any other text falls back to bytes.

    The vocabulary is laid out as CLIP's: the 256 byte symbols, the same with the word-end mark, the
    merged symbols in merge order, then the start and end tokens (the end token also pads).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(sorted(set(words or shapes_words())))
    byte_symbols = sorted(ByteLevel.alphabet())
    symbols = byte_symbols + [symbol + WORD_END for symbol in byte_symbols] + [a + b for a, b in merges]
    vocab = {symbol: index for index, symbol in enumerate(dict.fromkeys(symbols + [START_TOKEN, END_TOKEN]))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_tokens, "bos_token": START_TOKEN,
        "eos_token": END_TOKEN, "pad_token": END_TOKEN, "unk_token": END_TOKEN}, indent=2))
    return folder


def build_tokenizer(folder: str | Path, config: TinySDConfig = TinySDConfig()):
    """A transformers CLIPTokenizer for the shapes world, its files written to `folder`."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder, max_tokens=config.max_tokens)
    return CLIPTokenizer.from_pretrained(str(folder))


def build_text_encoder(tokenizer, config: TinySDConfig = TinySDConfig()):
    """A freshly initialised CLIPTextModel sized by `config`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden_size, intermediate_size=4 * config.text_hidden_size,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_tokens, projection_dim=config.text_hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_vae(config: TinySDConfig = TinySDConfig()):
    """A freshly initialised AutoencoderKL sized by `config`."""
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels, layers_per_block=1, latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups, sample_size=config.resolution,
    )


def build_unet(config: TinySDConfig = TinySDConfig()):
    """A freshly initialised UNet2DConditionModel with cross-attention at the levels `config.unet_attention` marks."""
    from diffusers import UNet2DConditionModel

    levels = len(config.unet_channels)
    attention = config.unet_attention or (1,) * (levels - 1) + (0,)
    if len(attention) != levels:
        raise ValueError(f"unet_attention has {len(attention)} entries for {levels} levels; give one per level")
    return UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=config.latent_channels, out_channels=config.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if on else "DownBlock2D" for on in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if on else "UpBlock2D" for on in reversed(attention)),
        block_out_channels=config.unet_channels, layers_per_block=config.unet_layers_per_block,
        cross_attention_dim=config.text_hidden_size, attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_groups,
    )


def build_scheduler(prediction_type: str = "v_prediction"):
    """DDPM's linear betas (1e-4 to 0.02) sampled with DDIM from the last timestep; v-prediction as SD 2.x.

    Not SD 1.x's scaled-linear betas: on a 16 x 16 latent their last step keeps sqrt(alpha_bar_T) = 0.07 of
    the signal, so the latents' mean (the background colour) leaks through the noise (Lin et al., 2024,
    Sec. 3.1); linear betas keep 0.006. v-prediction, because epsilon's loss weighs the clean image by
    SNR(t), next to nothing where the background colour is decided, so the caption was not learned in time.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                         prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="trailing")


def load_base_pipeline(folder: str | Path = BASE_MODEL_DIR, dtype=None):
    """The embedded base model (or any SD 1.x diffusers folder) as a StableDiffusionPipeline, float32 by default."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ..errors import ControlNextError

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ControlNextError(f"no diffusers model in {folder}; train one with scripts/train_base.py")
    return StableDiffusionPipeline.from_pretrained(
        str(folder), dtype=dtype or torch.float32, safety_checker=None, requires_safety_checker=False
    )
