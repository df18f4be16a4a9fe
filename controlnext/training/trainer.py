"""Training a control on a frozen base model, through the same attach code path as inference.

The control model and a selected subset of the base denoiser's weights learn the base's own objective
(DDPM, Ho et al. 2020, Eq. 14; v-prediction, Salimans & Ho 2022; SD3's rectified flow, Esser et al. 2024)
with the control attached by `attach_control(..., cfg=False)`. All randomness of a step (noise, timesteps, empty prompts, VAE
sampling) comes from a generator seeded by (seed, process, micro-step) and the data order from
(seed, stream position), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..control import ControlUnit, attach_control
from ..control.loading import load_control
from ..denoisers import describe
from ..errors import ControlNextError, MissingDependencyError
from ..methods import METHODS, ControlMethod
from ..pipelines.base import DTYPES
from . import checkpoint as ckpt
from .base import BaseModel, load_training_base
from .cache import LatentCache, data_identity, sample_latents
from .config import TrainConfig
from .data import ControlDataset, derive_seed, make_loader, open_source
from .flow_matching import FlowMatching, noisy_latents
from .monitor import TrainingLog, progress_bar
from .pixel_loss import pixel_loss
from .selection import describe_counts, resolve_patterns, select_parameters
from .validation import fidelity, generate, image_grid, resolve_metric, validation_set
from .video import VideoClips, is_video_base, validate_video, validation_clip, video_loss

LOW_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ControlledUNet(nn.Module):
    """The base denoiser (a UNet, or SD3's transformer) with one control attached (cfg=False): the module that trains."""

    def __init__(self, unet: nn.Module, control: nn.Module, scale: float = 1.0):
        super().__init__()
        self.unet, self.control, self.scale = unet, control, scale

    def forward(self, sample, timestep, encoder_hidden_states, condition, **unet_kwargs) -> torch.Tensor:
        """Latents (b, 4, h, w), timesteps, text (b, tokens, d), condition (b, 3, H, W) -> prediction (b, 4, h, w).

        A video UNet takes (b, frames, c, h, w) latents and one condition per frame, (b * frames, 3, H, W); SD3's
        transformer its pooled text as `pooled_projections` and the condition as its control reads it. The three
        named inputs go to the denoiser under its own argument names (the denoiser table)."""
        entry = describe(self.unet)
        inputs = {entry.sample: sample, entry.timestep: timestep, entry.encoder_states: encoder_hidden_states}
        unit = ControlUnit(self.control, condition, scale=self.scale, name="training")
        with attach_control(self.unet, unit, cfg=False):  # attached for this call only: the base stays unhooked
            return self.unet(**inputs, return_dict=False, **unet_kwargs)[0]


def flow_matching(config: TrainConfig) -> FlowMatching:
    """SD3's timestep density and loss weighting as the configuration names them."""
    return FlowMatching(density=config.timestep_density, logit_mean=config.logit_mean, logit_std=config.logit_std,
                        mode_scale=config.mode_scale, weighting=config.loss_weighting)


def diffusion_loss(model: nn.Module, base: BaseModel, batch: dict, config: TrainConfig,
                   generator: torch.Generator, device) -> torch.Tensor:
    """|| target - model(x_t, t, text, condition) ||^2, target = noise, velocity or latents (the scheduler's type),
    or on SD3 the flow-matching velocity noise - x_0 at sigmas drawn from SD3's density."""
    scheduler = base.noise_scheduler
    if "latent_mean" in batch:  # a --latent-cache item: its stored distribution, sampled as encoding would
        latents = sample_latents(base.vae, batch["latent_mean"].to(device), batch["latent_std"].to(device), generator)
    else:
        latents = base.encode_images(batch["pixel_values"].to(device), generator)  # (b, c, h, w)
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(device)  # (b, c, h, w)
    flow = base.prediction_type == "flow_matching"
    if flow:
        objective = flow_matching(config)
        timesteps, sigmas = (t.to(device) for t in objective.sample(scheduler, b, generator))  # (b,), (b,)
    else:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)  # (b,)
    empty = (torch.rand(b, generator=generator) < config.empty_prompt_ratio).tolist()
    captions = ["" if drop else caption for drop, caption in zip(empty, batch["caption"])]
    hidden, pooled = base.encode_prompts(captions, device)  # (b, tokens, d)
    condition = base.prepare_condition(getattr(model, "module", model).control, batch["conditioning"].to(device))
    if flow:
        prediction = model(noisy_latents(latents, noise, sigmas), timesteps, hidden, condition,
                           pooled_projections=pooled)  # (b, c, h, w)
        return objective.loss(prediction, latents, noise, sigmas)
    added = base.added_conditions(pooled, batch["original_size"], batch["crop_top_left"], config.resolution)
    noisy = scheduler.add_noise(latents, noise, timesteps)  # x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
    if base.prediction_type == "epsilon":
        target = noise
    elif base.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif base.prediction_type == "sample":
        target = latents
    else:
        raise ControlNextError(f"the base scheduler predicts {base.prediction_type!r}, which training does not support")
    prediction = model(noisy, timesteps, hidden, condition, added_cond_kwargs=added)
    loss = F.mse_loss(prediction.float(), target.float())
    if config.pixel_loss_weight:
        loss = loss + config.pixel_loss_weight * pixel_loss(base.vae, scheduler, batch, noisy, prediction, timesteps,
                                                            base.prediction_type, config.pixel_loss_max_timestep)
    return loss


def make_optimizer(control: nn.Module, unet_parameters: list[nn.Parameter], config: TrainConfig):
    """AdamW (or 8-bit AdamW) with its own learning rate for the module and for the base weights."""
    groups = [{"params": list(control.parameters()), "lr": config.module_lr}]
    if unet_parameters:
        groups.append({"params": unet_parameters, "lr": config.learning_rate})
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError:
            raise MissingDependencyError("bitsandbytes", "train-8bit") from None
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def train(config: TrainConfig, examples=None) -> Path:
    """Train a control as `config` says; returns the output folder, which `load_control` reads directly.

    `examples` optionally gives the data in Python: a sequence of (image, condition, caption) triples or a
    callable(index) -> triple (with `config.generated_examples` as its length).
    """
    return Trainer(config, examples).run()


class Trainer:
    """One training run: set up from the config (fresh or from a checkpoint), then `run()`."""

    def __init__(self, config: TrainConfig, examples=None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        self.config = config.validate(needs_data=examples is None)
        self.video = is_video_base(config.base)  # Stable Video Diffusion: video clips, the release's objective
        self.metric = resolve_metric(config.validation_metric) if config.validation_every and not self.video else None
        if config.method not in METHODS:
            raise ControlNextError(f"unknown --method {config.method!r}; known: {', '.join(METHODS)}")
        self.method: ControlMethod = METHODS[config.method]
        self.save_options = {} if config.save_precision == "fp32" else {"dtype": DTYPES[config.save_precision]}
        if self.save_options and "dtype" not in inspect.signature(self.method.save).parameters:
            raise ControlNextError(f"--save-precision {config.save_precision}: the {config.method} method saves its "
                                   "weights in fp32 only; leave --save-precision at fp32")
        self.output = Path(config.output_dir)
        AcceleratorState._reset_state()  # accelerate keeps one precision per process; each run sets its own
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=_use_cpu(config),
                                       gradient_accumulation_steps=config.gradient_accumulation_steps)
        acc = self.accelerator
        if acc.device.type == "cpu" and config.mixed_precision == "fp16":
            raise ControlNextError("--mixed-precision fp16 needs a GPU; use bf16 on the CPU")
        self.sharded = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        self.resume_from = ckpt.resolve_resume(self.output, config.resume)
        if config.resume == "latest" and self.resume_from is None:
            acc.print(f"no checkpoint in {self.output}: starting a new run")

        if self.video:
            if examples is not None:
                raise ControlNextError("a video base trains on a folder of videos (--data); examples in Python are "
                                       "images")
            self.dataset = VideoClips(config)
        else:
            self.dataset = ControlDataset(open_source(config, examples), config.resolution, config.annotator)
        self.loss = video_loss if self.video else diffusion_loss
        self.base = load_training_base(config.base)
        if config.pixel_loss_weight and (self.video or self.base.prediction_type == "flow_matching"):
            raise ControlNextError("--pixel-loss-weight works for image bases with a noise, velocity or sample "
                                   "prediction (SD1.5, SD2, SDXL); drop it for this base")
        if config.latent_cache:
            if self.video:
                raise ControlNextError("--latent-cache works for image bases; a video base encodes its clips each step")
            self.dataset = LatentCache(self.dataset, config.latent_cache, self.base.vae, data_identity(config),
                                       workers=config.num_workers)
        self.control, init_weights = self._build_control()
        self._select_trainable(init_weights)
        acc.print(describe_counts(self.control, self.base.unet, self.selected))

        self.model = ControlledUNet(self.base.unet, self.control, config.control_scale)
        if config.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
        params = dict(self.base.unet.named_parameters())
        self.optimizer = make_optimizer(self.control, [params[n] for n in self.selected], config)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer, num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=config.max_steps)
        self.step, self.examples_seen = 0, 0
        if self.resume_from is not None:
            self._resume_before_prepare()
        self._place_frozen()
        if acc.distributed_type == DistributedType.DEEPSPEED:
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        self.model.train()
        self.prepared, self.optimizer = acc.prepare(self.model, self.optimizer)
        if self.sharded:
            acc.register_for_checkpointing(self.lr_scheduler)  # saved by accelerator.save_state
        if self.resume_from is not None:
            self._resume_after_prepare()
        self.trainable = [p for p in self.prepared.parameters() if p.requires_grad]

    # -- set-up ------------------------------------------------------------------------------------------

    def _build_control(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """A fresh control model for this base, or the one in --init-control with the base weights it changed."""
        config = self.config
        if not config.init_control:
            with torch.random.fork_rng(devices=[]):  # the initial weights follow --seed, whatever ran before
                torch.manual_seed(derive_seed(config.seed, 0x1417))
                factor = 2 ** (len(self.base.vae.config.block_out_channels) - 1)  # image side / latent side
                return self.method.build(self.base.unet, config, vae_scale_factor=factor), {}
        loaded = load_control(config.init_control, self.base.unet)
        if loaded.method != config.method:
            raise ControlNextError(f"--init-control {config.init_control} holds a {loaded.method} control; "
                                   f"pass --method {loaded.method}")
        return loaded.model, dict(loaded.unet_weights or {})

    def _select_trainable(self, init_weights: dict[str, torch.Tensor]) -> None:
        """Freeze the base but the selected weights; remember the original values of every weight that changes."""
        unet, config = self.base.unet, self.config
        self.patterns = resolve_patterns(unet, config.trainable, is_sdxl=self.base.family == "sdxl",
                                         spaced_every=config.spaced_every, auto=self.method.trainable(self.base.family))
        self.selected = select_parameters(unet, self.patterns)
        params = dict(unet.named_parameters())
        self.changed = sorted(set(self.selected) | set(init_weights), key=list(params).index)
        self.original = {name: params[name].detach().float().cpu().clone() for name in self.changed}
        with torch.no_grad():
            for name, value in init_weights.items():
                params[name].copy_(value)
        unet.requires_grad_(False)
        for name in self.selected:
            params[name].requires_grad_(True)
        self.control.requires_grad_(True).train()

    def _place_frozen(self) -> None:
        """Frozen parts in the compute precision on the device; trainable weights stay fp32."""
        dtype, device = LOW_PRECISION[self.config.mixed_precision], self.accelerator.device
        for encoder in self.base.text_encoders:
            encoder.to(device, dtype)
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # fp16 VAEs overflow
        self.base.vae.to(device) if vae_dtype == torch.float32 else self.base.vae.to(device, vae_dtype)
        for param in self.base.unet.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)

    def _state(self) -> dict:
        return {
            "step": self.step,
            "examples_seen": self.examples_seen,
            "num_examples": len(self.dataset),
            "num_processes": self.accelerator.num_processes,
            "method": self.config.method,
            "config": self.config.resume_fields(),
            "base_fingerprint": self.base.fingerprint(),
            "trainable_names": self.selected,
        }

    def _resume_before_prepare(self) -> None:
        folder = self.resume_from
        state = ckpt.read_trainer_state(folder)
        ckpt.check_resumable(state, self.config.resume_fields(), self.base.fingerprint(), self.selected,
                             len(self.dataset), folder)
        if not self.sharded:
            ckpt.load_training_state(folder, self.model, self.optimizer, self.lr_scheduler)
        self.step, self.examples_seen = state["step"], state["examples_seen"]
        if state["num_processes"] != self.accelerator.num_processes:
            self.accelerator.print(f"note: {folder} was made with {state['num_processes']} processes, this run has "
                                   f"{self.accelerator.num_processes}; the data order continues, the noise differs")
        self.accelerator.print(f"resuming from {folder} at step {self.step}")

    def _resume_after_prepare(self) -> None:
        if self.sharded:
            self.accelerator.load_state(str(self.resume_from / "accelerate"))
        else:
            ckpt.load_scaler_state(self.resume_from, self.accelerator.scaler)
        ckpt.load_rng_states(self.resume_from, self.accelerator.process_index)

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> Path:
        config, acc = self.config, self.accelerator
        main = acc.is_main_process
        if main:
            self.output.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.output)
            (self.output / "train_config.json").write_text(config.to_json())
        metric = self.metric
        log = TrainingLog(self.output, metric[0] if metric else None, self.step if self.resume_from else None,
                          config.tensorboard, enabled=main)
        validation = None
        if config.validation_every:
            validation = validation_clip(self.dataset) if self.video else validation_set(config, self.dataset)
        loader = make_loader(self.dataset, config, acc.process_index, acc.num_processes, self.examples_seen,
                             pin_memory=acc.device.type == "cuda")
        batches = iter(loader)
        per_step = config.batch_size * acc.num_processes * config.gradient_accumulation_steps
        if validation is not None and self.resume_from is None:  # the starting point of the fidelity curve
            score = self._validate(validation, metric, log)
            log.write(0, {"epoch": 0.0, **({log.columns[-1]: score} if metric else {})})
        bar = progress_bar(config.max_steps, self.step, main and config.progress_bar)
        last_saved = self.step if self.resume_from else None
        while self.step < config.max_steps:
            clock = time.perf_counter()
            loss, grad_norm = self._optimizer_step(batches)
            speed = 1.0 / max(time.perf_counter() - clock, 1e-9)  # steps per second, data loading included
            self.step += 1
            self.examples_seen += per_step
            score = self._validate(validation, metric, log) if _due(self.step, config.validation_every) else None
            lrs = self.lr_scheduler.get_last_lr()
            log.write(self.step, {"epoch": self.examples_seen / len(self.dataset), "loss": loss, "lr": lrs[-1],
                                  "module_lr": lrs[0], "grad_norm": grad_norm, "steps_per_second": speed,
                                  **({log.columns[-1]: score} if metric else {})})
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if _due(self.step, config.checkpoint_every):
                self.save_checkpoint()
                last_saved = self.step
        bar.close()
        if last_saved != self.step:
            self.save_checkpoint()
        self.export_final()
        log.close()
        acc.wait_for_everyone()
        acc.end_training()
        return self.output

    def _optimizer_step(self, batches) -> tuple[float, float | None]:
        """Gradient accumulation over micro-batches, clipping, one optimizer and LR-scheduler step."""
        config, acc = self.config, self.accelerator
        total, grad_norm = torch.zeros((), device=acc.device), None
        for micro in range(config.gradient_accumulation_steps):
            batch = next(batches)
            micro_step = self.step * config.gradient_accumulation_steps + micro
            generator = torch.Generator().manual_seed(derive_seed(config.seed, acc.process_index, micro_step))
            with acc.accumulate(self.prepared):
                loss = self.loss(self.prepared, self.base, batch, config, generator, acc.device)
                acc.backward(loss)
                if acc.sync_gradients and config.max_grad_norm > 0:
                    norm = acc.clip_grad_norm_(self.trainable, config.max_grad_norm)  # None under DeepSpeed
                    grad_norm = None if norm is None else float(norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        self.lr_scheduler.step()
        mean = acc.reduce(total / config.gradient_accumulation_steps, reduction="mean")
        return float(mean), grad_norm

    def _validate(self, validation, metric, log: TrainingLog) -> float | None:
        """Sample the validation conditions, save the grid, return the fidelity score (main process)."""
        acc = self.accelerator
        if not (acc.is_main_process or self.sharded):
            return None
        model = acc.unwrap_model(self.prepared)
        model.eval()
        if self.video:  # a short video of the first clip's reference and poses; no fidelity metric for video yet
            with acc.autocast():
                validate_video(self.base, model.control, validation, self.output / "validation", self.step,
                               steps=self.config.validation_sampling_steps, seed=self.config.sampling_seed,
                               scale=model.scale)
            model.train()
            return None
        with acc.autocast():
            images = generate(self.base, model.control, validation.conditions, validation.prompts,
                              steps=self.config.validation_sampling_steps, guidance_scale=self.config.guidance_scale,
                              seed=self.config.sampling_seed, scale=model.scale)
        model.train()
        if not acc.is_main_process:
            return None
        grid = image_grid(validation.conditions, images)
        folder = self.output / "validation"
        folder.mkdir(exist_ok=True)
        grid.save(folder / f"step-{self.step:06d}.png")
        log.image("validation", grid, self.step)
        return fidelity(metric, validation.conditions, images)

    # -- saving --------------------------------------------------------------------------------------------

    def _trained_parts(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The control model and the changed base tensors, whole (gathered when the weights are sharded)."""
        if not self.sharded:
            params = dict(self.base.unet.named_parameters())
            return self.control, {name: params[name] for name in self.changed}
        state = self.accelerator.get_state_dict(self.prepared)  # a collective: full tensors on the main process
        if not self.accelerator.is_main_process:
            return self.control, {}
        module = type(self.control).from_config(self.control.config)
        module.load_state_dict({k.removeprefix("control."): v for k, v in state.items() if k.startswith("control.")})
        return module, {name: state[f"unet.{name}"] for name in self.changed}

    def _export(self, folder: Path, module: nn.Module, unet_weights: dict) -> None:
        metadata = {
            "base": str(self.config.base), "base_fingerprint": self.base.fingerprint(), "trainable": self.patterns,
            "steps": self.step, "resolution": self.config.resolution, "annotator": self.config.annotator,
            "scale": self.config.control_scale, "guidance": self.config.guidance_scale,
            "prediction_type": self.base.prediction_type,
        }
        self.method.save(folder, module, unet_weights, original_weights=self.original,
                         increments=self.config.save_increments, metadata=metadata, **self.save_options)

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        module, unet_weights = self._trained_parts()

        def write_each(folder: Path) -> None:
            ckpt.save_rng_states(folder, acc.process_index)
            if self.sharded:
                acc.save_state(str(folder / "accelerate"))

        def write_main(folder: Path) -> None:
            if self.sharded:
                ckpt.write_json(folder / ckpt.STATE_FILE, self._state())
            else:
                trainable = {n: p for n, p in acc.unwrap_model(self.prepared).named_parameters() if p.requires_grad}
                ckpt.save_training_state(folder, trainable, self.optimizer, self.lr_scheduler, acc.scaler,
                                         self._state())
            self._export(folder / "control", module, unet_weights)

        path = ckpt.write_atomically(acc, self.output, self.step, write_main, write_each)
        if acc.is_main_process:
            ckpt.prune(self.output, self.config.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    def export_final(self) -> None:
        """The trained control in the output folder itself, files moved in only once complete."""
        module, unet_weights = self._trained_parts()
        if not self.accelerator.is_main_process:
            return
        partial = self.output / f"{ckpt.PARTIAL_PREFIX}final"
        shutil.rmtree(partial, ignore_errors=True)
        self._export(partial, module, unet_weights)
        ckpt.fsync_tree(partial)
        names = sorted(p.name for p in partial.iterdir())
        for name in sorted(names, key=lambda n: n == "control.json"):  # control.json last: it marks the export
            os.replace(partial / name, self.output / name)
        partial.rmdir()
        ckpt.fsync_path(self.output)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _use_cpu(config: TrainConfig) -> bool:
    """Train on the CPU when asked or when there is no accelerator (accelerate then uses gloo across processes)."""
    if config.cpu:
        return True
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or torch.backends.mps.is_available() or has_xpu)
