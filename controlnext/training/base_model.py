"""Train the embedded base model on the shapes world: first the VAE, then the text encoder and UNet together.

Latent diffusion as in Rombach et al. (2022): the autoencoder learns reconstruction plus a small KL term
(Eq. 25 of their appendix, without the perceptual and adversarial terms, which flat shapes do not need);
the denoiser learns epsilon prediction, L = ||eps - eps_theta(z_t, t, c)||^2 (Ho et al., 2020, Eq. 14),
with a share of empty captions so that classifier-free guidance works (Ho & Salimans, 2022). The
learning-rate schedule, the moving average of the weights and Min-SNR weighting are diffusers' own
(`get_scheduler`, `EMAModel`, `compute_snr`).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..denoisers import pipeline_denoiser
from ..devices import resolve_device
from ..data.shapes import ShapesWorld, render_condition, render_image
from ..metrics import IN_PLACE_SCORES, edge_f1, mean_shape_scores
from ..models.tiny_sd import (TinySDConfig, build_scheduler, build_text_encoder, build_tokenizer, build_unet,
                              build_vae)


@dataclass
class BaseTrainingConfig:
    """Everything that decides the trained base model; saved as training_config.json beside it."""

    seed: int = 0
    train_images: int = 12000  # rendered once from the shapes world's train split
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_crop: int = 32  # train the autoencoder on random crops of this side (0: whole images), as SD's was
    vae_from: str = ""  # reuse this AutoencoderKL folder (or a pipeline folder's vae/) instead of training one
    # start the text encoder and UNet from this trained pipeline folder (and reuse its VAE unless vae_from says
    # otherwise): one more warm-up and cosine cycle of unet_steps on a model already trained
    init_from: str = ""
    kl_weight: float = 1e-6  # per latent element against per-pixel reconstruction, as LDM's VAE
    unet_steps: int = 8000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    empty_caption_rate: float = 0.1
    # Min-SNR loss weighting (Hang et al., 2023); 0 for the plain loss. With v-prediction its weight min(SNR, g) /
    # (SNR + 1) vanishes at high noise, where the background is decided: at g = 5 the 128 px model drew the right
    # background for 0.17 of held-out captions after 500 steps, against 1.00 without it
    snr_gamma: float = 0.0
    prediction_type: str = "v_prediction"  # as SD 2.x (Salimans & Ho, 2022), or "epsilon" as SD 1.x
    offset_noise: float = 0.0  # std of a per-channel constant added to the noise (Guttenberg, 2023)
    ema_decay: float = 0.998
    eval_every: int = 500  # steps between quick quality checks (0: none)
    eval_count: int = 24
    threads: int = 2  # torch threads, and processes rendering the training set; the machines here are shared: at most 2
    # where the networks train: auto (CUDA when present, else MPS, else the CPU), cpu, cuda, cuda:N or mps. The
    # random draws stay on the CPU, so every device sees the same batches, noise and timesteps
    device: str = "auto"
    half_precision_storage: bool = True  # store VAE and UNet as float16 (diffusers loads them as float32)
    model: TinySDConfig = field(default_factory=TinySDConfig)


Log = Callable[[str], None]


def render_scenes(seed: int, resolution: int, start: int, stop: int,
                  split: str = "train") -> tuple[np.ndarray, list[str]]:
    """Images (n, R, R, 3) uint8 and captions of the split's samples start..stop-1."""
    world = ShapesWorld(seed=seed, resolution=resolution)
    specs = [world.spec(index, split) for index in range(start, stop)]
    return np.stack([np.asarray(render_image(spec, resolution)) for spec in specs]), [s.caption() for s in specs]


def render_training_set(count: int, seed: int, resolution: int,
                        workers: int = 1) -> tuple[torch.Tensor, list[str]]:
    """Images (n, 3, R, R) uint8 and captions of the first `count` train samples, drawn by `workers` processes
    (each scene depends on its index alone, so the set is the same for any number of workers)."""
    bounds = np.linspace(0, count, max(1, min(workers, count)) + 1).astype(int)
    if len(bounds) == 2:
        parts = [render_scenes(seed, resolution, 0, count)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"  # fork: no re-import
        with ProcessPoolExecutor(len(bounds) - 1, mp_context=multiprocessing.get_context(method)) as pool:
            parts = list(pool.map(render_scenes, *zip(*[(seed, resolution, int(a), int(b))
                                                        for a, b in zip(bounds[:-1], bounds[1:])])))
    images = np.concatenate([images for images, _ in parts])
    captions = [caption for _, part in parts for caption in part]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (b, 3, h, w) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def cosine_schedule(optimizer, total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then half a cosine down to zero at `total` (diffusers' "cosine")."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total)


def train_vae(vae, images: torch.Tensor, config: BaseTrainingConfig, log: Log = print) -> None:
    """Reconstruction (L1 + L2) plus kl_weight * KL(q(z|x) || N(0, I)) per latent element, on the VAE's device."""
    device = vae.device
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, config.vae_steps, config.warmup_steps)
    vae.train()
    started = time.time()
    for step in range(config.vae_steps):
        batch = images[torch.randint(len(images), (config.vae_batch,), generator=generator)]
        if 0 < config.vae_crop < images.shape[-1]:
            top, left = torch.randint(images.shape[-1] - config.vae_crop + 1, (2,), generator=generator).tolist()
            batch = batch[..., top:top + config.vae_crop, left:left + config.vae_crop]
        pixels = to_model_range(batch.to(device))  # (b, 3, h, w)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        reconstruction = vae.decode(latents).sample  # (b, 3, h, w)
        rec_loss = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels)
        kl_loss = posterior.kl().mean() / pixels[0].numel()
        loss = rec_loss + config.kl_weight * kl_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.vae_steps - 1:
            log(f"vae step {step:5d}  rec {rec_loss.item():.4f}  kl {kl_loss.item():.3f}  {time.time() - started:.0f}s")
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, each (n, c, h, w), on the CPU (the VAE may run elsewhere)."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        posterior = vae.encode(to_model_range(images[start:start + batch].to(vae.device))).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(means: torch.Tensor, stds: torch.Tensor) -> float:
    """1 / std of posterior samples, so diffusion sees latents of unit variance (as SD's 0.18215 was found)."""
    second_moment = (means.pow(2) + stds.pow(2)).mean()
    return float(1.0 / torch.sqrt(second_moment - means.mean().pow(2)))


@torch.no_grad()
def check_reconstruction(vae, count: int = 64, world_seed: int = 0) -> dict[str, float]:
    """Mean absolute error (0-255 scale), edge F1 at 1 pixel against the scenes' canny maps and shape scores of
    the autoencoder's reconstructions of test images."""
    resolution = vae.config.sample_size
    specs = [ShapesWorld(seed=world_seed).spec(index, "test") for index in range(count)]
    images = torch.from_numpy(render_scenes(world_seed, resolution, 0, count, "test")[0]).permute(0, 3, 1, 2)
    decoded = vae.decode(vae.encode(to_model_range(images.to(vae.device))).latent_dist.mean).sample  # (n, 3, h, w)
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    error = (decoded.float() - images.float()).abs().mean().item()
    pictures = list(decoded.permute(0, 2, 3, 1).numpy())
    edges = np.mean([edge_f1(render_condition(spec, "canny", resolution), picture)
                     for spec, picture in zip(specs, pictures)])
    return {"mean_abs_error": error, "edge_f1": float(edges), **mean_shape_scores(pictures, specs)}


def moving_average(modules: list[torch.nn.Module], decay: float):
    """diffusers' EMA of the modules' parameters: theta_ema <- d_n theta_ema + (1 - d_n) theta, with the warm-up
    d_n = min(decay, (1 + n) / (10 + n)) so that early weights fade fast (the first update copies the weights)."""
    from diffusers.training_utils import EMAModel

    return EMAModel([p for module in modules for p in module.parameters()], decay=decay)


class DenoiserOptimisation:
    """What every step of a base model's denoiser training does after its loss: AdamW on the modules' weights
    (gradients clipped to norm 1) under the warm-up-then-cosine schedule, their moving average (EMA), and the
    running loss logged every 100 steps."""

    def __init__(self, modules: list[torch.nn.Module], lr: float, steps: int, warmup: int, ema_decay: float,
                 label: str, log: Log = print):
        self.modules, self.steps, self.label, self.log = modules, steps, label, log
        self.parameters = [p for module in modules for p in module.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.01)
        self.schedule = cosine_schedule(self.optimizer, steps, warmup)
        self.ema = moving_average(modules, ema_decay)
        self.started, self.running = time.time(), []

    def step(self, step: int, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.ema.step(self.parameters)
        self.running.append(loss.item())
        if step % 100 == 0 or step == self.steps - 1:
            seconds = time.time() - self.started
            self.log(f"{self.label} step {step:5d}  loss {np.mean(self.running):.4f}  {seconds:.0f}s")
            self.running = []

    def averaged(self) -> list[torch.nn.Module]:
        """Copies of the modules holding the moving averages of their weights."""
        return averaged_copies(self.ema, self.modules)


def averaged_copies(ema, modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Copies of `modules` holding the moving averages of their weights (the modules keep their own)."""
    copies = [copy.deepcopy(module).requires_grad_(False).eval() for module in modules]
    ema.copy_to([p for module in copies for p in module.parameters()])
    return copies


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma weights, min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v (Hang et al., 2023, Eq. 9)."""
    if not gamma:
        return torch.ones(len(timesteps), device=timesteps.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)  # (b,) alpha_t^2 / sigma_t^2
    return snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids  # (b, max_tokens)


def train_denoiser(unet, text_encoder, tokenizer, scheduler, means: torch.Tensor, stds: torch.Tensor,
                   captions: list[str], scaling_factor: float, config: BaseTrainingConfig,
                   evaluate: Callable[[int, list], None] | None = None, log: Log = print) -> list[torch.nn.Module]:
    """Train UNet and text encoder together on the diffusion loss; return copies holding their moving averages.

    Runs on the UNet's device; the batches are drawn on the CPU with one generator, whatever the device."""
    device = unet.device
    generator = torch.Generator().manual_seed(config.seed + 1)
    token_ids = tokenize(tokenizer, captions)  # (n, max_tokens)
    empty_ids = tokenize(tokenizer, [""])  # (1, max_tokens)
    unet.train()
    text_encoder.train()
    optimisation = DenoiserOptimisation([unet, text_encoder], config.unet_lr, config.unet_steps, config.warmup_steps,
                                        config.ema_decay, "unet", log)
    for step in range(config.unet_steps):
        chosen = torch.randint(len(means), (config.unet_batch,), generator=generator)
        posterior_noise = torch.randn(means[chosen].shape, generator=generator)
        latents = (means[chosen] + stds[chosen] * posterior_noise) * scaling_factor  # (b, c, h, w)
        ids = token_ids[chosen].clone()
        dropped = torch.rand(config.unet_batch, generator=generator) < config.empty_caption_rate
        ids[dropped] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        if config.offset_noise:
            noise = noise + config.offset_noise * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (config.unet_batch,), generator=generator)
        latents, ids, noise, timesteps = (t.to(device) for t in (latents, ids, noise, timesteps))
        noisy = scheduler.add_noise(latents, noise, timesteps)  # (b, c, h, w)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample  # (b, c, h, w)
        target = noise if config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        weights = snr_weights(scheduler, timesteps, config.snr_gamma, config.prediction_type)  # (b,)
        optimisation.step(step, (weights * (prediction - target).pow(2).mean((1, 2, 3))).mean())
        if evaluate and config.eval_every and (step + 1) % config.eval_every == 0:
            evaluate(step + 1, optimisation.averaged())
    unet.eval()
    text_encoder.eval()
    return optimisation.averaged()


def load_trained_weights(folder: Path, text_encoder, unet) -> None:
    """Copy a trained pipeline folder's text encoder and UNet weights into the freshly built modules (same sizes)."""
    from safetensors.torch import load_file

    from ..errors import ControlNextError

    for module, file in ((text_encoder, folder / "text_encoder" / "model.safetensors"),
                         (unet, folder / "unet" / "diffusion_pytorch_model.safetensors")):
        if not file.is_file():
            raise ControlNextError(f"{file} is missing: --init-from takes a folder written by this script")
        weights = {key: value.float() for key, value in load_file(file).items()}
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise ControlNextError(f"{file} does not fit the model sizes given ({first}); pass the sizes it was "
                                   "trained with (its training_config.json)") from None


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def evaluate_base(pipeline, count: int = 100, seed: int = 0, steps: int = 20, guidance: float = 5.0,
                  batch: int = 25, world_seed: int = 0, split: str = "test",
                  **call_options) -> tuple[dict[str, float], list]:
    """Generate from the first `count` held-out ("test", or `split`) captions; return mean shape scores and the images.

    Works for a UNet or a transformer pipeline; `call_options` go to the pipeline call. Each batch is seeded with
    `seed` + its first index, as scripts/quality.py seeds the base model's images, so both give the same figures."""
    world = ShapesWorld(seed=world_seed)
    specs = [world.spec(index, split) for index in range(count)]
    resolution = pipeline_denoiser(pipeline).config.sample_size * pipeline.vae_scale_factor
    images = []
    for start in range(0, count, batch):
        captions = [spec.caption() for spec in specs[start:start + batch]]
        images += pipeline(captions, height=resolution, width=resolution, num_inference_steps=steps,
                           guidance_scale=guidance, generator=torch.Generator().manual_seed(seed + start),
                           **call_options).images
    return mean_shape_scores(images, specs), images


def save_pipeline(pipeline, output: Path, tokenizer_files: Path, half_precision: bool,
                  tokenizers: tuple[str, ...] = ("tokenizer",)) -> None:
    """Write the diffusers folder (safetensors); each tokenizer's vocab.json and merges.txt go beside tokenizer.json."""
    if output.exists():
        shutil.rmtree(output)
    if half_precision:  # the text encoders stay float32: transformers would load them as stored
        pipeline = copy.deepcopy(pipeline)
        pipeline.vae.to(torch.float16)
        pipeline_denoiser(pipeline).to(torch.float16)
    pipeline.save_pretrained(str(output), safe_serialization=True)
    for folder in tokenizers:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer_files / name, output / folder / name)


@contextmanager
def torch_threads(count: int):
    """Run the block on `count` torch threads (the same seed and threads give the same weights), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_base_model(output: str | Path, config: BaseTrainingConfig = BaseTrainingConfig(), log: Log = print) -> Path:
    """Train all parts from scratch and save a StableDiffusionPipeline folder; same seed and threads, same weights."""
    with torch_threads(config.threads):
        return _train_base_model(Path(output), config, log)


def _train_base_model(output: Path, config: BaseTrainingConfig, log: Log) -> Path:
    device = resolve_device(config.device)
    work = output.with_name(output.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    torch.manual_seed(config.seed)
    images, captions = render_training_set(config.train_images, config.seed, config.model.resolution,
                                           workers=config.threads)
    log(f"rendered {len(images)} training images in {time.time() - started:.0f}s")

    tokenizer = build_tokenizer(work / "tokenizer", config.model)
    vae_from = config.vae_from or config.init_from
    if vae_from:
        from diffusers import AutoencoderKL

        source = Path(vae_from)
        source = source / "vae" if (source / "vae").is_dir() else source
        vae = AutoencoderKL.from_pretrained(str(source), dtype=torch.float32).eval().to(device)
        log(f"reusing the autoencoder in {source}")
    else:
        vae = build_vae(config.model).to(device)
        train_vae(vae, images, config, log)
    log("vae on held-out images: " + "  ".join(f"{k} {v:.3f}" for k, v in check_reconstruction(vae).items()))
    means, stds = encode_latents(vae, images)  # (n, c, h, w) each
    scaling_factor = latent_scaling_factor(means, stds)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(str(work / "vae"))  # kept if a later stage fails, for --vae-from
    log(f"latents {tuple(means.shape[1:])}, scaling factor {scaling_factor:.4f}")

    torch.manual_seed(config.seed + 1)
    text_encoder = build_text_encoder(tokenizer, config.model)
    unet = build_unet(config.model)
    if config.init_from:
        load_trained_weights(Path(config.init_from), text_encoder, unet)
        log(f"starting the text encoder and UNet from {config.init_from}")
    text_encoder.to(device)
    unet.to(device)
    log(f"training on {device}")
    scheduler = build_scheduler(config.prediction_type)
    history = []

    def evaluate(step: int, averaged: list) -> None:
        pipeline = assemble_pipeline(vae, averaged[1], tokenizer, averaged[0], scheduler)
        scores, _ = evaluate_base(pipeline, count=config.eval_count, world_seed=config.seed)
        history.append({"step": step, **scores})
        log(f"eval at step {step}: " + "  ".join(f"{key} {value:.3f}" for key, value in scores.items()
                                                 if key not in IN_PLACE_SCORES))

    unet, text_encoder = train_denoiser(unet, text_encoder, tokenizer, scheduler, means, stds, captions, scaling_factor,
                                        config, evaluate, log)
    pipeline = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    save_pipeline(pipeline, output, work / "tokenizer", config.half_precision_storage)
    minutes = (time.time() - started) / 60
    (output / "training_config.json").write_text(json.dumps(
        {"config": asdict(config), "minutes": round(minutes, 1), "history": history}, indent=2))
    shutil.rmtree(work)
    log(f"saved {output} after {minutes:.1f} min")
    return output
