"""Train the shapes-world SD3 (MMDiT transformer, two CLIP encoders, no T5) with SD3's flow-matching objective.

The recipe is the SD base model's (`base_model.py`: same rendered scenes, EMA, warm-up and cosine decay,
empty captions for classifier-free guidance), with SD3's parts: the transformer and both text encoders
learn rectified flow (`flow_matching.py`) on latents shifted and scaled as SD3's VAE stores them. The
autoencoder is reused from a trained one (by default the embedded SD model's) or trained as there.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.tiny_sd import BASE_MODEL_DIR, build_tokenizer, build_vae
from ..models.tiny_sd3 import (TinySD3Config, assemble_pipeline, build_scheduler, build_text_encoders,
                               build_transformer)
from .base_model import (BaseTrainingConfig, DenoiserOptimisation, Log, check_reconstruction, encode_latents,
                         evaluate_base, render_training_set, save_pipeline, tokenize, torch_threads, train_vae)
from .flow_matching import FlowMatching, noisy_latents


@dataclass
class SD3BaseTrainingConfig:
    """Everything that decides the trained SD3 base model; saved as training_config.json beside it."""

    seed: int = 0
    train_images: int = 12000
    vae_from: str = str(BASE_MODEL_DIR)  # reuse this autoencoder (a pipeline folder or its vae/); "" trains one
    vae_steps: int = 1500  # when training one (BaseTrainingConfig's recipe)
    steps: int = 5000
    batch: int = 32
    lr: float = 6e-4
    warmup_steps: int = 200
    empty_caption_rate: float = 0.1
    density: str = "logit_normal"  # SD3's timestep density (flow_matching.DENSITIES)
    weighting: str = "none"  # SD3's loss weighting (flow_matching.WEIGHTINGS)
    ema_decay: float = 0.998
    eval_every: int = 1000
    eval_count: int = 24
    threads: int = 1
    half_precision_storage: bool = True  # store VAE and transformer as float16 (diffusers loads them as float32)
    model: TinySD3Config = field(default_factory=TinySD3Config)


def load_or_train_vae(images: torch.Tensor, config: SD3BaseTrainingConfig, log: Log):
    from diffusers import AutoencoderKL

    if not config.vae_from:
        vae = build_vae(config.model)
        train_vae(vae, images, BaseTrainingConfig(seed=config.seed, vae_steps=config.vae_steps), log)
        return vae
    source = Path(config.vae_from)
    source = source / "vae" if (source / "vae").is_dir() else source
    log(f"reusing the autoencoder in {source}")
    return AutoencoderKL.from_pretrained(str(source), dtype=torch.float32).eval()


def latent_statistics(means: torch.Tensor, stds: torch.Tensor) -> tuple[float, float]:
    """(shift_factor, scaling_factor) so that (z - shift) * scale has zero mean and unit variance, as SD3's VAE."""
    shift = float(means.mean())
    variance = (means.pow(2) + stds.pow(2)).mean() - means.mean().pow(2)
    return shift, float(1.0 / torch.sqrt(variance))


def encode_captions(text_encoders, ids: torch.Tensor, t5_tokens: int, joint_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (b, n) -> (prompt embeds (b, n + t5_tokens, joint_dim), pooled (b, 2p)), as StableDiffusion3Pipeline
    builds them without T5: both CLIPs' penultimate layers side by side, zero tokens in T5's place."""
    hidden, pooled = [], []
    for encoder in text_encoders:
        output = encoder(ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])  # (b, n, d_i)
        pooled.append(output[0])  # (b, p_i)
    clip = torch.cat(hidden, dim=-1)  # (b, n, d_1 + d_2)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    zeros = clip.new_zeros((clip.shape[0], t5_tokens, joint_dim))
    return torch.cat([clip, zeros], dim=-2), torch.cat(pooled, dim=-1)


def train_transformer(transformer, text_encoders, tokenizer, scheduler, means, stds, captions, shift: float,
                      scale: float, config: SD3BaseTrainingConfig, evaluate=None, log: Log = print) -> list:
    """Train the transformer and both text encoders on flow matching; return copies holding their moving averages."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    objective = FlowMatching(density=config.density, weighting=config.weighting)
    token_ids, empty_ids = tokenize(tokenizer, captions), tokenize(tokenizer, [""])  # (n, tokens), (1, tokens)
    for module in (transformer, *text_encoders):
        module.train()
    optimisation = DenoiserOptimisation([transformer, *text_encoders], config.lr, config.steps, config.warmup_steps,
                                        config.ema_decay, "transformer", log)
    joint_dim = transformer.config.joint_attention_dim
    for step in range(config.steps):
        chosen = torch.randint(len(means), (config.batch,), generator=generator)
        posterior_noise = torch.randn(means[chosen].shape, generator=generator)
        latents = (means[chosen] + stds[chosen] * posterior_noise - shift) * scale  # (b, c, h, w)
        ids = token_ids[chosen].clone()
        ids[torch.rand(config.batch, generator=generator) < config.empty_caption_rate] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps, sigmas = objective.sample(scheduler, config.batch, generator)  # (b,), (b,)
        hidden, pooled = encode_captions(text_encoders, ids, config.model.t5_tokens, joint_dim)
        prediction = transformer(noisy_latents(latents, noise, sigmas), hidden, pooled, timesteps).sample
        optimisation.step(step, objective.loss(prediction, latents, noise, sigmas))
        if evaluate and config.eval_every and (step + 1) % config.eval_every == 0:
            evaluate(step + 1, optimisation.averaged())
    for module in (transformer, *text_encoders):
        module.eval()
    return optimisation.averaged()


def train_sd3_base_model(output: str | Path, config: SD3BaseTrainingConfig = SD3BaseTrainingConfig(),
                         log: Log = print) -> Path:
    """Train the SD3 parts and save a StableDiffusion3Pipeline folder; same seed and threads, same weights."""
    with torch_threads(config.threads):
        return _train(Path(output), config, log)


def _train(output: Path, config: SD3BaseTrainingConfig, log: Log) -> Path:
    work = output.with_name(output.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    torch.manual_seed(config.seed)
    images, captions = render_training_set(config.train_images, config.seed, config.model.resolution)
    log(f"rendered {len(images)} training images in {time.time() - started:.0f}s")
    tokenizer = build_tokenizer(work / "tokenizer", config.model)
    vae = load_or_train_vae(images, config, log)
    log("vae on held-out images: " + "  ".join(f"{k} {v:.3f}" for k, v in check_reconstruction(vae).items()))
    means, stds = encode_latents(vae, images)  # (n, c, h, w) each
    shift, scale = latent_statistics(means, stds)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log(f"latents {tuple(means.shape[1:])}, shift factor {shift:.4f}, scaling factor {scale:.4f}")

    torch.manual_seed(config.seed + 1)
    text_encoders = build_text_encoders(tokenizer, config.model)
    transformer = build_transformer(config.model)
    scheduler = build_scheduler(config.model.shift)
    log(f"parameters: transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M, text encoders "
        f"{sum(p.numel() for e in text_encoders for p in e.parameters()) / 1e6:.2f}M")
    history = []

    def evaluate(step: int, averaged: list) -> None:  # its own sampler: setting its timesteps must not touch training's
        pipeline = assemble_pipeline(vae, averaged[1:], tokenizer, averaged[0], build_scheduler(config.model.shift))
        scores, _ = evaluate_base(pipeline, count=config.eval_count, world_seed=config.seed,
                                  max_sequence_length=config.model.t5_tokens)
        history.append({"step": step, **scores})
        log(f"eval at step {step}: " + "  ".join(f"{key} {value:.3f}" for key, value in scores.items()))

    averaged = train_transformer(transformer, text_encoders, tokenizer, scheduler, means, stds, captions, shift, scale,
                                 config, evaluate, log)
    pipeline = assemble_pipeline(vae, averaged[1:], tokenizer, averaged[0], build_scheduler(config.model.shift))
    save_pipeline(pipeline, output, work / "tokenizer", config.half_precision_storage,
                  tokenizers=("tokenizer", "tokenizer_2"))
    minutes = (time.time() - started) / 60
    (output / "training_config.json").write_text(json.dumps(
        {"config": asdict(config), "max_sequence_length": config.model.t5_tokens, "minutes": round(minutes, 1),
         "history": history}, indent=2))
    shutil.rmtree(work)
    log(f"saved {output} after {minutes:.1f} min")
    return output
