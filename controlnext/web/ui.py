"""The gradio web UI: prompt, control units, sampling and LoRAs on the left, a gallery of results on the right; a
Video tab when a video base is served."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image
from pydantic import ValidationError

from ..errors import ControlNextError
from ..metadata import save_with_parameters
from ..request import RESIZE_MODES, SCHEDULER_NAMES, UNET_WEIGHTS, ControlSettings, GenerationRequest, LoraSettings, settings
from .catalog import ModelCatalog
from .engine import Engine, available_annotators
from .schemas import GenerateRequest, describe_errors
from .worker import ModelWorker, QueueFull

NONE = "none"
LORA_SLOTS = 2
CANVAS = 512
HISTORY = 48  # images kept in a session's gallery
FIELDS = settings(GenerationRequest)  # the defaults and limits of the sliders below
CONTROL_FIELDS = settings(ControlSettings)
LORA_FIELDS = settings(LoraSettings)


@dataclass
class UnitInputs:
    """The components of one control unit in the UI."""

    control: gr.Dropdown
    image: gr.ImageEditor
    annotator: gr.Dropdown
    preview: gr.Image
    scale: gr.Slider
    start: gr.Slider
    end: gr.Slider
    unet_weights: gr.Dropdown


class StepProgress:
    """Steps done, written by the worker thread and read by the UI's thread."""

    def __init__(self):
        self.step, self.total = 0, 0

    def __call__(self, step: int, total: int) -> None:
        self.step, self.total = step, total


def editor_image(value) -> Image.Image | None:
    """The picture in an ImageEditor: the uploaded image with whatever was drawn on top."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("composite") if value.get("composite") is not None else value.get("background")
    return value


def wait_for(future, progress: gr.Progress | None = None, steps: StepProgress | None = None):
    """Block until the worker finishes `future`, reporting its steps; user errors become gr.Error."""
    while True:
        try:
            return future.result(timeout=0.2)
        except FutureTimeout:
            if progress is not None and steps is not None:
                if steps.total:
                    progress((steps.step, steps.total), desc="denoising")
                else:
                    progress(0, desc="waiting for the model (loading or queued)")
        except ControlNextError as error:
            raise gr.Error(str(error)) from None


def submit(worker: ModelWorker, fn, *args):
    try:
        return worker.submit(fn, *args)
    except QueueFull as error:
        raise gr.Error(str(error)) from None


def control_unit(index: int, catalog: ModelCatalog, annotators: list[str]) -> UnitInputs:
    controls = [NONE, *(e.name for e in catalog.controls)]
    default = controls[1] if index == 0 and len(controls) > 1 else NONE
    with gr.Row():
        control = gr.Dropdown(controls, value=default, label="Control", elem_id=f"control-{index}")
        annotator = gr.Dropdown(annotators, value=NONE, label="Annotator", elem_id=f"annotator-{index}")
    with gr.Row():
        image = gr.ImageEditor(
            value=Image.new("RGB", (CANVAS, CANVAS)), type="pil", label="Condition: upload an image or draw on the canvas",
            sources=["upload", "clipboard"], brush=gr.Brush(colors=["#ffffff", "#000000"], default_color="#ffffff"),
            canvas_size=(CANVAS, CANVAS), elem_id=f"control-image-{index}",
        )
        preview = gr.Image(label="Condition the control sees", interactive=False, elem_id=f"preview-{index}")
    with gr.Row():
        scale = slider(CONTROL_FIELDS["scale"], 0.05, "Scale", f"scale-{index}", value=1.0)  # a slider has no 'default'
        start = slider(CONTROL_FIELDS["start"], 0.05, "Start", f"start-{index}")
        end = slider(CONTROL_FIELDS["end"], 0.05, "End", f"end-{index}")
        unet_weights = gr.Dropdown(list(UNET_WEIGHTS), value=CONTROL_FIELDS["unet_weights"].default,
                                   label="UNet weights (auto: read from the file)", elem_id=f"unet-weights-{index}")
    return UnitInputs(control, image, annotator, preview, scale, start, end, unet_weights)


def slider(spec, step: float, label: str, elem_id: str | None = None, **overrides) -> gr.Slider:
    """A slider over a request field's web limits, starting at its default."""
    limits = spec.web_limits()
    options = dict(minimum=limits.get("ge", limits.get("gt", 0)), maximum=limits["le"], value=spec.default, step=step,
                   label=label, elem_id=elem_id)
    return gr.Slider(**{**options, **overrides})


def build_ui(engine: Engine, worker: ModelWorker, catalog: ModelCatalog, output_dir: Path, units: int = 2,
             video: tuple[str, list[str]] | None = None) -> gr.Blocks:
    """The web UI; every model call goes through `worker`, shared with the HTTP API. With `video` (a Stable Video
    Diffusion base and its pose controls) the images and a Video tab stand side by side."""
    images = image_ui(engine, worker, catalog, output_dir, units)
    if video is None:
        return images
    from .video_ui import video_tab

    with gr.Blocks(title="controlnext", analytics_enabled=False) as ui:
        with gr.Tab("Images", id="images"):
            images.render()
        with gr.Tab("Video", id="video"):
            video_tab(engine, worker, video[0], video[1], output_dir)
    return ui


def image_ui(engine: Engine, worker: ModelWorker, catalog: ModelCatalog, output_dir: Path, units: int = 2) -> gr.Blocks:
    """Prompt, control units, sampling and LoRAs, and the gallery of generated images."""
    annotators = available_annotators()
    bases = [e.name for e in catalog.bases]
    with gr.Blocks(title="controlnext", analytics_enabled=False) as ui:
        gr.Markdown("## controlnext: controllable image generation\nThe HTTP API is described at [/docs](/docs).")
        if not bases:
            gr.Markdown("**No base model found.** Start the server with `--models-dir`, `--base` or `--tiny-demo`.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                base = gr.Dropdown(bases, value=bases[0] if bases else None, label="Base model", elem_id="base")
                unit_inputs = []
                with gr.Tabs():
                    for i in range(units):
                        with gr.Tab(f"Control {i + 1}"):
                            unit_inputs.append(control_unit(i, catalog, annotators))
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        scheduler = gr.Dropdown(list(SCHEDULER_NAMES), value=FIELDS["scheduler"].default, label="Scheduler",
                                                elem_id="scheduler")
                        steps = slider(FIELDS["steps"], 1, "Steps", "steps")
                        guidance = slider(FIELDS["guidance"], 0.5, "Guidance", "guidance")
                    with gr.Row():
                        seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id="seed")
                        size = FIELDS["width"].limits["multiple_of"]
                        width = slider(FIELDS["width"], size, "Width (0: the model's)", "width", minimum=0, value=0)
                        height = slider(FIELDS["height"], size, "Height (0: the model's)", "height", minimum=0, value=0)
                        count = slider(FIELDS["num_images"], 1, "Images", "num-images")
                    resize_mode = gr.Dropdown(list(RESIZE_MODES), value=FIELDS["resize_mode"].default,
                                              label="Condition resize (just_resize: as the official pipelines)",
                                              elem_id="resize-mode")
                with gr.Accordion("LoRAs", open=False):
                    loras = []
                    for i in range(LORA_SLOTS):
                        with gr.Row():
                            loras.append((
                                gr.Dropdown([NONE, *(e.name for e in catalog.loras)], value=NONE, label=f"LoRA {i + 1}"),
                                slider(LORA_FIELDS["weight"], 0.05, "Weight"),
                            ))
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", columns=2, format="png", buttons=["download"], elem_id="gallery")
                details = gr.JSON(label="Parameters of the selected image", elem_id="parameters")

        def request_from(values: dict) -> GenerateRequest:
            controls = []
            for k, unit in enumerate(unit_inputs):
                if values[unit.control] in (None, NONE):
                    continue
                image = editor_image(values[unit.image])
                if image is None:
                    raise gr.Error(f"Control {k + 1}: upload or draw a condition image")
                controls.append(dict(
                    control=values[unit.control], image=image, annotator=values[unit.annotator] or NONE,
                    scale=values[unit.scale], start=values[unit.start], end=values[unit.end],
                    unet_weights=values[unit.unet_weights] or CONTROL_FIELDS["unet_weights"].default,
                ))
            seed_value = values[seed]
            try:
                return GenerateRequest(
                    prompt=values[prompt] or "", negative_prompt=values[negative] or "", base=values[base],
                    controls=controls, steps=int(values[steps]), guidance=values[guidance],
                    scheduler=values[scheduler], seed=None if seed_value is None or seed_value < 0 else int(seed_value),
                    width=int(values[width]) or None, height=int(values[height]) or None, num_images=int(values[count]),
                    resize_mode=values[resize_mode] or FIELDS["resize_mode"].default,
                    loras=[dict(lora=values[name], weight=values[weight]) for name, weight in loras
                           if values[name] not in (None, NONE)],
                )
            except ValidationError as error:
                raise gr.Error(describe_errors(error.errors())) from None

        def on_generate(values: dict, progress=gr.Progress()):
            request = request_from(values)
            steps_done = StepProgress()
            progress(0, desc="waiting for the model")
            generated = wait_for(submit(worker, engine.generate, request, steps_done), progress, steps_done)
            new = []
            for image, parameters in zip(generated.images, generated.parameters):
                path = output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{parameters['seed']}-{uuid.uuid4().hex[:6]}.png"
                save_with_parameters(image, path, parameters)
                new.append({"path": str(path), "caption": caption(parameters), "parameters": parameters})
            items = (new + values[history])[:HISTORY]
            return items, [(x["path"], x["caption"]) for x in items], new[0]["parameters"]

        inputs = {prompt, negative, base, scheduler, steps, guidance, seed, width, height, count, resize_mode, history}
        for unit in unit_inputs:
            inputs |= {unit.control, unit.image, unit.annotator, unit.scale, unit.start, unit.end, unit.unet_weights}
        inputs |= {c for pair in loras for c in pair}
        run.click(on_generate, inputs=inputs, outputs=[history, gallery, details])
        prompt.submit(on_generate, inputs=inputs, outputs=[history, gallery, details])

        def on_select(items: list, event: gr.SelectData):
            return items[event.index]["parameters"] if 0 <= event.index < len(items) else None

        gallery.select(on_select, inputs=history, outputs=details)

        def on_preview(value, annotator: str):
            image = editor_image(value)
            if image is None:
                return None
            return wait_for(submit(worker, engine.annotate, annotator or NONE, image))

        for unit in unit_inputs:
            unit.annotator.change(on_preview, inputs=[unit.image, unit.annotator], outputs=unit.preview)
            unit.image.upload(on_preview, inputs=[unit.image, unit.annotator], outputs=unit.preview)
            unit.image.apply(on_preview, inputs=[unit.image, unit.annotator], outputs=unit.preview)
    return ui


def caption(parameters: dict) -> str:
    controls = ", ".join(f"{Path(c['control']).name}×{c['scale']:g}" for c in parameters["controls"]) or "no control"
    return (f"seed {parameters['seed']} · {parameters['steps']} steps · {parameters['scheduler']} · "
            f"guidance {parameters['guidance']:g} · {controls}")
