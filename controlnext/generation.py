"""Running one `GenerationRequest`: the code path of `controlnext generate` and of the web app alike.

    from controlnext.generation import generate
    from controlnext.request import ControlSettings, GenerationRequest

    result = generate(GenerationRequest("a red circle", controls=[ControlSettings("canny", "edges.png")]))
    result.images[0], result.parameters[0]  # the image and the values it was made with
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from .advice import condition_note, prompt_note, size_note
from .devices import default_dtype, resolve_device
from .errors import ControlNextError
from .images import load_image, to_rgb
from .pipelines import ControlledPipeline
from .pipelines.base import resolve_dtype
from .request import GenerationRequest, describe_image, recommended_guidance, resolve_control

Progress = Callable[[int, int], None]  # (steps done, total steps)
Loader = Callable[[GenerationRequest], ControlledPipeline]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    parameters: list[dict]  # per image, what its PNG stores: the values used (image k: seed + k)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user was told (see `note` of generate)


def settle(request: GenerationRequest) -> GenerationRequest:
    """The request with what it leaves open decided: the device (one rule for `auto`), dtype and seed."""
    device = resolve_device(request.device)
    dtype = request.dtype or default_dtype(device)
    resolve_dtype(dtype, device)  # refuses fp16 on a CPU
    seed = request.seed if request.seed is not None else random.randrange(2**32)
    return dataclasses.replace(request, device=device, dtype=dtype, seed=seed)


def pipeline_key(request: GenerationRequest) -> tuple:
    """What `load_pipeline` reads from a settled request: requests with equal keys can share a pipeline."""
    return (request.base, request.base_config, tuple((c.control, c.unet_weights) for c in request.controls),
            request.variant, request.task, tuple((x.lora, x.weight) for x in request.loras), request.device,
            request.dtype, request.allow_pickle, request.allow_download, request.cache_dir, request.without_t5,
            request.offload)


def load_pipeline(request: GenerationRequest) -> ControlledPipeline:
    """The base model, LoRAs and controls of a settled request, on its device in its dtype."""
    return ControlledPipeline.from_pretrained(
        request.base, [resolve_control(c.control) for c in request.controls], task=request.task,
        device=request.device, dtype=resolve_dtype(request.dtype, request.device),
        loras=[(x.lora, x.weight) for x in request.loras], allow_pickle=request.allow_pickle,
        allow_download=request.allow_download, base_config=request.base_config, cache_dir=request.cache_dir,
        variant=request.variant, unet_weights=[c.unet_weights for c in request.controls], offload=request.offload,
        without_t5=request.without_t5,
    )


def annotate_condition(
    name: str,
    image: Image.Image,
    options: dict | None = None,
    size: tuple[int, int] | None = None,
    resize_mode: str = "crop_and_resize",
) -> Image.Image:
    """The condition image an annotator makes from `image` ('none': the image itself, in RGB).

    With `size` (a generation's width, height) it is annotated at that size, as the control sees it.
    """
    if name == "none":
        if options:
            raise ControlNextError("annotator 'none' takes no options")
        return to_rgb(image)
    try:
        from .annotators import annotate, annotate_at_size
    except ImportError:
        raise ControlNextError(f"annotator {name!r} is not available: this installation has no annotators") from None
    if size is not None:
        return annotate_at_size(name, image, size, resize_mode=resize_mode, **(options or {}))
    return to_rgb(annotate(name, image, **(options or {})))


def check_annotators(request: GenerationRequest) -> None:
    """Refuse an unknown annotator or option before a pipeline loads."""
    named = [c for c in request.controls if c.annotator != "none" or c.annotator_options]
    if not named:
        return
    try:
        from .annotators import check_annotator
    except ImportError:
        raise ControlNextError("annotators are not available: this installation has no annotators") from None
    for control in named:
        check_annotator(control.annotator, control.annotator_options)


def generate(
    request: GenerationRequest,
    *,
    load: Loader = load_pipeline,
    progress: Progress | None = None,
    note: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Run a request: its images first, then its pipeline (`load` may keep one cached), then its conditions,
    annotated at the generation size.

    `progress` hears of every denoising step; `note` of things worth telling the user.
    """
    request = settle(request.check())
    check_annotators(request)
    notes = []

    def tell(text: str | None) -> None:
        if text:
            notes.append(text)
            if note is not None:
                note(text)

    tell(prompt_note(request.prompt, request.base))
    tell(size_note(request.width, request.height, request.base))
    sources = []
    for control in request.controls:
        image = _open(control.image)
        if "A" in image.getbands() or "transparency" in image.info:
            tell(f"{describe_image(control.image)} has transparency; transparent pixels count as black")
        tell(condition_note(resolve_control(control.control), control.annotator, image))
        sources.append(image)
    pipe = load(request)
    scheduler = pipe.use_scheduler(request.scheduler)

    scales = [c.scale if c.scale is not None else loaded.scale for c, loaded in zip(request.controls, pipe.controls)]
    guidance = request.guidance
    if guidance is None:
        guidance = recommended_guidance(c.guidance for c in pipe.controls)
    kwargs = dict(
        negative_prompt=request.negative_prompt or None, num_inference_steps=request.steps,
        guidance_scale=guidance, num_images_per_prompt=request.num_images,
        generator=[torch.Generator("cpu").manual_seed(request.seed + k) for k in range(request.num_images)],
    )
    if request.width:
        kwargs["width"] = request.width
    if request.height:
        kwargs["height"] = request.height
    if request.task != "txt2img":
        kwargs.update(image=to_rgb(_open(request.init_image)), strength=request.strength)
        if request.task == "inpaint":
            kwargs["mask_image"] = to_rgb(_open(request.mask))
    if progress is not None:
        kwargs["callback_on_step_end"] = _step_callback(progress, request.steps)
    size = pipe.generation_size(kwargs)  # conditions are annotated at the size they are used at
    conditions = [
        annotate_condition(c.annotator, image, c.annotator_options, size, request.resize_mode)
        for c, image in zip(request.controls, sources)
    ]
    images = pipe(
        request.prompt, control_images=conditions, control_scales=scales,
        control_starts=[c.start for c in request.controls], control_ends=[c.end for c in request.controls],
        apply_to=request.apply_to, resize_mode=request.resize_mode,
        control_modes=[c.control_mode for c in request.controls], **kwargs,
    ).images

    controls = [dataclasses.replace(c, scale=scale) for c, scale in zip(request.controls, scales)]
    used = dataclasses.replace(request, scheduler=scheduler, controls=controls, guidance=guidance)
    parameters = [
        dataclasses.replace(used, seed=request.seed + k, width=image.width, height=image.height).parameters()
        for k, image in enumerate(images)
    ]
    return GenerationResult(images, parameters, notes)


def _open(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else load_image(image)


def _step_callback(progress: Progress, steps: int):
    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        progress(step + 1, getattr(pipe, "num_timesteps", None) or steps)
        return callback_kwargs

    return on_step_end
