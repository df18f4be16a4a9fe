"""A diffusers pipeline with controls attached: called the way diffusers users call a pipeline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..control import ControlUnit, attach_control
from ..control.loading import LoadedControl, load_control
from ..denoisers import pipeline_denoiser
from ..errors import ControlNextError
from ..images import check_size, load_image, prepare_condition
from ..request import OFFLOADS, SIZE_MULTIPLE
from .base import call_defaults, load_base, load_loras, set_scheduler


class ControlledPipeline:
    """Wraps any SD1.x/2.x/SDXL/SD3 diffusers pipeline (txt2img, img2img, inpaint) and its controls.

    `pipe(prompt, control_images=[...], ...)` attaches the controls for the call and detaches them after,
    so `self.pipe` stays the unmodified diffusers pipeline. Other keyword arguments go to diffusers.
    """

    def __init__(self, pipe, controls: Sequence[LoadedControl] = (), device: str | torch.device | None = None):
        """`device`: where the controls run (default: the pipeline's device; under CPU offload, where it computes)."""
        self.pipe = pipe
        self.controls = list(controls)
        self.loaded_scheduler = pipe.scheduler  # every `use_scheduler` starts from its config
        self.denoiser = pipeline_denoiser(pipe)
        for control in self.controls:
            if control.model.dtype != self.denoiser.dtype:
                control.model.to(self.denoiser.dtype)
            control.model.to(device or pipe._execution_device)

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path | None = None,
        controls: Sequence[str | Path | LoadedControl] = (),
        *,
        task: str = "txt2img",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        scheduler: str | None = None,
        loras: Sequence[tuple[str, float]] = (),
        allow_pickle: bool = False,
        allow_download: bool = False,
        base_config: str | None = None,
        cache_dir: str | None = None,
        unet_weights: str | Sequence[str] = "auto",
        offload: str | None = None,
        without_t5: bool = False,
        **control_options,
    ) -> "ControlledPipeline":
        """Load a base model (None: the embedded default) and controls (paths or loaded) onto `device`.

        `unet_weights` ("auto", "absolute" or "increments"; one, or one per control) says how each control's
        trained UNet tensors are stored; "auto" reads it from the tensors against this base. `offload` ("model"
        or "sequential") keeps the base model's weights in CPU memory and moves them to `device` as they run
        (diffusers' `enable_model_cpu_offload` / `enable_sequential_cpu_offload`: bases larger than the GPU's
        memory); the controls stay on `device`. `without_t5` leaves out SD3's third text encoder.
        """
        if offload not in (None, *OFFLOADS):
            raise ControlNextError(f"unknown offload {offload!r}; choose one of {', '.join(OFFLOADS)}")
        if offload == "sequential" and torch.device(device).type == "cpu":
            # diffusers offloads to "cpu:0", where accelerate 1.15 cannot move weights back to "meta"
            raise ControlNextError("sequential offload needs a GPU device (the weights already are in CPU memory); "
                                   "drop the offload on a CPU")
        pipe = load_base(base, task=task, device="cpu" if offload else device, dtype=dtype, config=base_config,
                         allow_download=allow_download, cache_dir=cache_dir, without_t5=without_t5)
        load_loras(pipe, list(loras))
        modes = [unet_weights] * len(controls) if isinstance(unet_weights, str) else list(unet_weights)
        if len(modes) == 1:
            modes *= len(controls)
        if len(modes) != len(controls):
            raise ControlNextError(f"{len(modes)} unet_weights values for {len(controls)} controls; "
                                   "give one, or one per control")
        denoiser = pipeline_denoiser(pipe)
        loaded = [
            c if isinstance(c, LoadedControl)
            else load_control(c, denoiser, allow_pickle=allow_pickle, **_unless_auto(unet_weights=mode), **control_options)
            for c, mode in zip(controls, modes)
        ]
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        controlled = cls(pipe, loaded, device=device)
        if scheduler:
            controlled.use_scheduler(scheduler)
        return controlled

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["pipe"], name)

    def use_scheduler(self, name: str) -> str:
        """Sample with scheduler `name`, built from the config of the one the pipeline was loaded with.

        Returns the name of the scheduler in use ("auto" resolved)."""
        self.pipe.scheduler = self.loaded_scheduler
        return set_scheduler(self.pipe, name)

    def default_size(self) -> tuple[int, int]:
        side = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        control_images: Sequence[Image.Image | str | Path | torch.Tensor | Sequence] | None = None,
        control_scales: Sequence[float] | float | None = None,
        control_starts: Sequence[float] | float = 0.0,
        control_ends: Sequence[float] | float = 1.0,
        apply_to: str = "both",
        resize_mode: str = "crop_and_resize",
        control_modes: Sequence[str] | str = "balanced",
        **kwargs,
    ):
        """Generate; condition images are brought to the image size with `resize_mode` (see prepare_condition).

        `control_modes` (one, or one per control): "balanced", "prompt" or "control" (is more important), as
        A1111 names them; see `controlnext.control.attach.soft_weights` and `schedule_weight`.
        """
        n = len(self.controls)
        images = list(control_images or [])
        if len(images) != n:
            raise ControlNextError(f"{n} control(s) loaded but {len(images)} condition image(s) given; give one per control")
        scales = _per_control(control_scales, [c.scale for c in self.controls], n, "scale")
        starts = _per_control(control_starts, None, n, "start")
        ends = _per_control(control_ends, None, n, "end")
        modes = [control_modes] * n if isinstance(control_modes, str) else list(control_modes)
        if len(modes) == 1:
            modes *= n
        if len(modes) != n:
            raise ControlNextError(f"{len(modes)} control modes for {n} controls; give one, or one per control")
        for start, end in zip(starts, ends):
            if not 0 <= start <= end <= 1:
                raise ControlNextError(f"control window start={start}, end={end}: need 0 <= start <= end <= 1")

        width, height = self.generation_size(kwargs)
        check_size(width, height, math.lcm(SIZE_MULTIPLE, self.pipe.vae_scale_factor), "generation")
        if "image" not in kwargs or "mask_image" in kwargs:  # txt2img and inpaint take the size
            kwargs.setdefault("width", width)
            kwargs.setdefault("height", height)
        units = [
            ControlUnit(control.model, self._condition_batch(image, width, height, control.model, resize_mode), scale,
                        start, end, name=Path(control.source).name, unet_weights=control.unet_weights, mode=mode)
            for control, image, scale, start, end, mode in zip(self.controls, images, scales, starts, ends, modes)
        ]
        kwargs = {**call_defaults(self.pipe), **kwargs}
        guidance = kwargs.get("guidance_scale", getattr(self.pipe, "_guidance_scale", 7.5))
        cfg = guidance > 1 and self.denoiser.config.get("time_cond_proj_dim") is None
        prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
        for unit in units:
            if unit.condition.shape[0] not in (1, len(prompts)):
                raise ControlNextError(
                    f"{unit.condition.shape[0]} condition images for {len(prompts)} prompts; give one or one per prompt"
                )
        with attach_control(self.denoiser, units, scheduler=self.pipe.scheduler, apply_to=apply_to, cfg=cfg):
            return self.pipe(prompt=prompt, **kwargs)

    def generation_size(self, kwargs: dict) -> tuple[int, int]:
        """The (width, height) a call with these keyword arguments generates at: the size conditions are used at."""
        init = kwargs.get("image")
        if init is not None and "mask_image" not in kwargs and isinstance(init, Image.Image):
            return init.size
        default_w, default_h = self.default_size()
        if init is not None and isinstance(init, Image.Image):
            default_w, default_h = init.size
        return kwargs.get("width") or default_w, kwargs.get("height") or default_h

    def _condition_batch(self, image, width: int, height: int, model, resize_mode: str) -> torch.Tensor:
        """One condition image (or a list, one per prompt) -> (b, 3, height, width) in [0, 1]."""
        items = image if isinstance(image, (list, tuple)) else [image]
        tensors = []
        for item in items:
            if isinstance(item, (str, Path)):
                item = load_image(item)
            if isinstance(item, torch.Tensor):
                tensors.append(item if item.ndim == 4 else item[None])
            else:
                tensors.append(prepare_condition(item, width, height, resize_mode)[None])
        condition = torch.cat(tensors)  # (b, 3, H, W)
        if hasattr(model, "prepare_condition"):  # controls that read the condition in latent space (SD3 ControlNet)
            return model.prepare_condition(condition.to(self.pipe._execution_device), self.pipe.vae)
        return condition.to(device=model.device, dtype=model.dtype)


def _unless_auto(**options) -> dict:
    """Options given a value other than "auto" (left at "auto", a method's loader keeps its own default)."""
    return {name: value for name, value in options.items() if value != "auto"}


def _per_control(value, defaults, n: int, what: str) -> list[float]:
    if value is None:
        return list(defaults)
    if isinstance(value, (int, float)):
        return [float(value)] * n
    value = [float(v) for v in value]
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ControlNextError(f"{len(value)} {what} values for {n} controls; give one, or one per control")
    return value
