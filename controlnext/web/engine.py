"""What the web app runs: a validated `GenerateRequest` as a library `GenerationRequest`, on cached pipelines."""

from __future__ import annotations

import gc
from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

from ..images import prepare_condition, tensor_to_pil
from ..generation import GenerationResult, Progress, annotate_condition, generate, load_pipeline, pipeline_key
from ..pipelines import ControlledPipeline
from ..request import ControlSettings, GenerationRequest, LoraSettings, configured_size, resolve_control
from ..video_generation import (VideoConditions, VideoRequest, VideoResult, conditions, generate_video,
                                load_video_pipeline)
from .catalog import ModelCatalog
from .schemas import GenerateRequest


def available_annotators() -> list[str]:
    """'none' and every registered annotator; only 'none' while the annotators package is missing."""
    try:
        from ..annotators import list_annotators
    except ImportError:
        return ["none"]
    return ["none", *list_annotators()]


def control_reference(entry) -> str:
    """How a request names a catalog control: a bundled one by its name, any other by its path."""
    return entry.name if entry.source == "bundled" and resolve_control(entry.name) == entry.path else entry.path


class Engine:
    """Loads pipelines on demand, keeps the last `cache_size` of them, and generates images.

    Not thread-safe by design: the web app calls it from one worker thread only (see ModelWorker).
    """

    def __init__(self, catalog: ModelCatalog, device: str = "cpu", dtype: str = "fp32", cache_size: int = 2):
        self.catalog = catalog
        self.device = device
        self.dtype = dtype
        self.cache_size = max(1, cache_size)
        self._pipelines: OrderedDict[tuple, ControlledPipeline] = OrderedDict()
        self._video = None  # (base, control), the loaded ControlledVideoPipeline

    @property
    def loaded(self) -> int:
        return len(self._pipelines)

    def request(self, web: GenerateRequest) -> GenerationRequest:
        """The library request for a web request: catalog names become paths (a bundled control keeps its name, as
        `controlnext generate --control canny` names it); the server's device and dtype."""
        base = self.catalog.find("base", web.base)
        controls = [
            ControlSettings(**{**c.model_dump(exclude={"image"}), "control": control_reference(
                self.catalog.find("control", c.control)), "image": c.image})
            for c in web.controls
        ]
        loras = [LoraSettings(self.catalog.find("lora", x.lora).path, x.weight) for x in web.loras]
        fields = web.model_dump(exclude={"base", "controls", "loras", "init_image", "mask"})
        return GenerationRequest(
            **fields, base=None if base.source == "embedded" else base.path, controls=controls, loras=loras,
            init_image=web.init_image, mask=web.mask, device=self.device, dtype=self.dtype,
        )

    def pipeline(self, request: GenerationRequest) -> ControlledPipeline:
        """The pipeline for this request's models, loaded once and kept in an LRU cache."""
        key = pipeline_key(request)
        if key in self._pipelines:
            self._pipelines.move_to_end(key)
            return self._pipelines[key]
        while len(self._pipelines) >= self.cache_size:
            self._pipelines.popitem(last=False)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._pipelines[key] = load_pipeline(request)
        return self._pipelines[key]

    def annotate(self, name: str, image: Image.Image, options: dict | None = None) -> Image.Image:
        return annotate_condition(name, image, options)

    def video_request(self, **values) -> VideoRequest:
        """A video request on the server's device and dtype, checked."""
        return VideoRequest(**values, device=self.device, dtype=self.dtype).check()

    def video_conditions(self, request: VideoRequest, reference: Image.Image | None = None) -> VideoConditions:
        """The reference (uploaded, else the request's file) at the video size and the condition frames: poses
        detected and retargeted, or given."""
        return conditions(request, reference)

    def generate_video(self, request: VideoRequest, prepared: VideoConditions | None = None) -> VideoResult:
        """One video; the last video pipeline stays loaded (video models are large: one at a time)."""
        def load(request: VideoRequest):
            key = (request.base, request.control)
            if self._video is None or self._video[0] != key:
                self._video = None
                gc.collect()
                self._video = (key, load_video_pipeline(request))
            return self._video[1]

        return generate_video(request, prepared, load=load)

    def default_size(self, base: str | None) -> tuple[int, int] | None:
        """The size a base generates at when the request names none, read from its configs (None: not a folder)."""
        return configured_size(Path(self.catalog.find("base", base).path))

    def condition(self, annotator: str, image: Image.Image, size: tuple[int, int] | None,
                  resize_mode: str = "crop_and_resize") -> Image.Image:
        """Exactly what the control gets from `image`: annotated at the generation size, then brought to it, as
        `generate` and `ControlledPipeline` do (`size` None: annotated at the image's own size)."""
        condition = annotate_condition(annotator, image, None, size, resize_mode)
        if size is None:
            return condition
        return tensor_to_pil(prepare_condition(condition, *size, resize_mode))

    def generate(self, request: GenerateRequest, progress: Progress | None = None) -> GenerationResult:
        """Run one validated web request; image k uses seed + k, as `controlnext generate` does."""
        return generate(self.request(request), load=self.pipeline, progress=progress)

