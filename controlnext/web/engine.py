"""What the web app runs: cached pipelines, annotators and generation for a validated `GenerateRequest`."""

from __future__ import annotations

import gc
import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from .. import __version__
from ..errors import ControlNextError
from ..images import to_rgb
from ..pipelines import ControlledPipeline, set_scheduler
from ..pipelines.base import DTYPES
from .catalog import ModelCatalog, ModelEntry
from .schemas import GenerateRequest

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
Progress = Callable[[int, int], None]  # (steps done, total steps)


def available_annotators() -> list[str]:
    """'none' and every registered annotator; only 'none' while the annotators package is missing."""
    try:
        from ..annotators import list_annotators
    except ImportError:
        return ["none"]
    return ["none", *list_annotators()]


def annotate_condition(name: str, image: Image.Image, options: dict | None = None) -> Image.Image:
    """The condition image an annotator makes from `image` ('none': the image itself, in RGB)."""
    if name == "none":
        if options:
            raise ControlNextError("annotator 'none' takes no options")
        return to_rgb(image)
    try:
        from ..annotators import annotate
    except ImportError:
        raise ControlNextError(f"annotator {name!r} is not available: this installation has no annotators") from None
    return to_rgb(annotate(name, image, **(options or {})))


@dataclass
class Generated:
    image: Image.Image
    seed: int
    parameters: dict


class Engine:
    """Loads pipelines on demand, keeps the last `cache_size` of them, and generates images.

    Not thread-safe by design: the web app calls it from one worker thread only (see ModelWorker).
    """

    def __init__(self, catalog: ModelCatalog, device: str = "cpu", dtype: torch.dtype = torch.float32, cache_size: int = 2):
        self.catalog = catalog
        self.device = device
        self.dtype = dtype
        self.cache_size = max(1, cache_size)
        self._pipelines: OrderedDict[tuple, ControlledPipeline] = OrderedDict()
        self._schedulers: dict[tuple, object] = {}

    @property
    def loaded(self) -> int:
        return len(self._pipelines)

    def pipeline(self, base: ModelEntry, controls: list[ModelEntry], task: str, loras: list[tuple[str, float]],
                 unet_weights: list[str] | None = None):
        """The pipeline for this combination, loaded once and kept in an LRU cache."""
        unet_weights = unet_weights or ["auto"] * len(controls)
        key = (base.path, tuple(c.path for c in controls), task, tuple(loras), tuple(unet_weights))
        if key in self._pipelines:
            self._pipelines.move_to_end(key)
            return self._pipelines[key], key
        while len(self._pipelines) >= self.cache_size:
            old_key, _ = self._pipelines.popitem(last=False)
            self._schedulers.pop(old_key, None)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        pipe = ControlledPipeline.from_pretrained(
            None if base.source == "embedded" else base.path, [c.path for c in controls], task=task,
            device=self.device, dtype=self.dtype, loras=loras, unet_weights=unet_weights,
        )
        self._pipelines[key] = pipe
        self._schedulers[key] = pipe.pipe.scheduler  # each request's scheduler is built from this one's config
        return pipe, key

    def annotate(self, name: str, image: Image.Image, options: dict | None = None) -> Image.Image:
        return annotate_condition(name, image, options)

    def generate(self, request: GenerateRequest, progress: Progress | None = None) -> list[Generated]:
        """Run one validated request; image k uses seed + k, as `controlnext generate` does."""
        base = self.catalog.find("base", request.base)
        controls = [self.catalog.find("control", c.control) for c in request.controls]
        loras = [(self.catalog.find("lora", x.lora).path, x.weight) for x in request.loras]
        conditions = [annotate_condition(c.annotator, c.image, c.annotator_options) for c in request.controls]
        pipe, key = self.pipeline(base, controls, request.task, loras, [c.unet_weights for c in request.controls])
        pipe.pipe.scheduler = self._schedulers[key]
        set_scheduler(pipe.pipe, request.scheduler)

        seed = request.seed if request.seed is not None else random.randrange(2**32)
        scales = [c.scale if c.scale is not None else loaded.scale for c, loaded in zip(request.controls, pipe.controls)]
        kwargs = dict(
            negative_prompt=request.negative_prompt or None, num_inference_steps=request.steps,
            guidance_scale=request.guidance, num_images_per_prompt=request.num_images,
            generator=[torch.Generator("cpu").manual_seed(seed + k) for k in range(request.num_images)],
        )
        if request.width:
            kwargs["width"] = request.width
        if request.height:
            kwargs["height"] = request.height
        if request.task != "txt2img":
            kwargs.update(image=to_rgb(request.init_image), strength=request.strength)
            if request.task == "inpaint":
                kwargs["mask_image"] = to_rgb(request.mask)
        if progress is not None:
            kwargs["callback_on_step_end"] = _step_callback(progress, request.steps)
        result = pipe(
            request.prompt, control_images=conditions, control_scales=scales,
            control_starts=[c.start for c in request.controls], control_ends=[c.end for c in request.controls],
            apply_to=request.apply_to, resize_mode=request.resize_mode, **kwargs,
        )
        return [
            Generated(image, seed + k, self.parameters(request, base, controls, scales, seed + k, image.size))
            for k, image in enumerate(result.images)
        ]

    def parameters(self, request: GenerateRequest, base: ModelEntry, controls: list[ModelEntry], scales: list[float],
                   seed: int, size: tuple[int, int]) -> dict:
        """The same keys `controlnext generate` stores; uploaded images are identified by their SHA-256."""
        return {
            "version": __version__, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "base": "embedded" if base.source == "embedded" else base.path, "task": request.task,
            "init_image": _fingerprint(request.init_image), "mask": _fingerprint(request.mask),
            "strength": request.strength if request.task != "txt2img" else None,
            "controls": [
                {"control": entry.path, "image": _fingerprint(c.image), "annotator": c.annotator,
                 "annotator_options": c.annotator_options, "scale": scale, "start": c.start, "end": c.end,
                 "unet_weights": c.unet_weights}
                for c, entry, scale in zip(request.controls, controls, scales)
            ],
            "apply_to": request.apply_to, "resize_mode": request.resize_mode,
            "loras": [f"{self.catalog.find('lora', x.lora).path}:{x.weight}" for x in request.loras],
            "steps": request.steps, "guidance": request.guidance, "scheduler": request.scheduler, "seed": seed,
            "width": size[0], "height": size[1], "dtype": DTYPE_NAMES.get(self.dtype),
        }


def _fingerprint(image: Image.Image | None) -> str | None:
    if image is None:
        return None
    return "sha256:" + hashlib.sha256(image.tobytes()).hexdigest()[:16]


def _step_callback(progress: Progress, steps: int):
    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        progress(step + 1, getattr(pipe, "num_timesteps", None) or steps)
        return callback_kwargs

    return on_step_end

