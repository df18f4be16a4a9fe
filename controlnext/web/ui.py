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

from ..advice import condition_note, prompt_note, size_note, trained_vocabulary
from ..control.loading import recommendations
from ..errors import ControlNextError
from ..metadata import save_with_parameters
from ..request import (CONTROL_MODES, DEFAULT_BASE, OFFLOADS, RESIZE_MODES, SCHEDULER_NAMES,
                       UNET_WEIGHTS, ControlSettings, GenerationRequest, LoraSettings, configured_size,
                       recommended_guidance, settings)
from .catalog import ModelCatalog
from .engine import Engine, available_annotators
from .schemas import GenerateRequest, describe_errors
from .worker import ModelWorker, QueueFull

NONE = "none"
LORA_SLOTS = 2
CANVAS = 512
HISTORY = 48  # images kept in a session's gallery
PREVIEW_HEIGHT = 300
# scenes of the shapes world's test split, and their control
EXAMPLES = ((4, "canny"), (5, "mask"), (9, "skeleton"), (7, "canny"))
CSS = """
.pixelated img { image-rendering: pixelated; object-fit: contain; width: 100%; height: 100%; }
#examples img { image-rendering: pixelated; }
#prompt-notes p, .condition-notes p { color: var(--color-accent); margin: 0; }
"""
FIELDS = settings(GenerationRequest)  # the defaults and limits of the sliders below
CONTROL_FIELDS = settings(ControlSettings)
LORA_FIELDS = settings(LoraSettings)


@dataclass
class UnitInputs:
    """The components of one control unit in the UI."""

    control: gr.Dropdown
    upload: gr.Image
    sketch: gr.ImageEditor
    annotator: gr.Dropdown
    preview: gr.Image
    notes: gr.Markdown
    scale: gr.Slider
    start: gr.Slider
    end: gr.Slider
    unet_weights: gr.Dropdown
    control_mode: gr.Dropdown

    def image(self, values: dict) -> Image.Image | None:
        """The unit's condition: the uploaded image if there is one, else the drawing unless the canvas is blank."""
        if values[self.upload] is not None:
            return values[self.upload]
        drawing = editor_image(values[self.sketch])
        return None if drawing is None or not drawing.convert("L").getbbox() else drawing


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
        control = gr.Dropdown(controls, value=default, label="Control", elem_id=f"control-{index}", min_width=140)
        annotator = gr.Dropdown(annotators, value=NONE, label="Annotator", elem_id=f"annotator-{index}", min_width=140)
        control_mode = gr.Dropdown(list(CONTROL_MODES), value=CONTROL_FIELDS["control_mode"].default,
                                   label="Control mode", elem_id=f"control-mode-{index}",
                                   min_width=140)
    with gr.Row(equal_height=True):
        with gr.Column(min_width=240):
            with gr.Tabs():
                with gr.Tab("Upload"):
                    upload = gr.Image(type="pil", sources=["upload", "clipboard"], label="Condition image",
                                      height=PREVIEW_HEIGHT, elem_id=f"control-image-{index}",
                                      elem_classes="pixelated")
                with gr.Tab("Draw"):
                    sketch = gr.ImageEditor(
                        value=Image.new("RGB", (CANVAS, CANVAS)), type="pil", label="Scribble: white lines on black",
                        sources=[], brush=gr.Brush(colors=["#ffffff", "#000000"], default_color="#ffffff"),
                        canvas_size=(CANVAS, CANVAS), height=PREVIEW_HEIGHT, elem_id=f"control-sketch-{index}",
                    )
        preview = gr.Image(label="What the control sees", interactive=False,
                           height=PREVIEW_HEIGHT + 44, elem_id=f"preview-{index}", elem_classes="pixelated", format="png",
                           min_width=240)
    notes = gr.Markdown(elem_classes="condition-notes", elem_id=f"condition-notes-{index}")
    with gr.Row():
        scale = slider(CONTROL_FIELDS["scale"], 0.05, "Scale", f"scale-{index}",  # a slider has no 'default'
                       value=recommended_scale(catalog, default))
        start = slider(CONTROL_FIELDS["start"], 0.05, "Start", f"start-{index}")
        end = slider(CONTROL_FIELDS["end"], 0.05, "End", f"end-{index}")
        unet_weights = gr.Dropdown(list(UNET_WEIGHTS), value=CONTROL_FIELDS["unet_weights"].default,
                                   label="UNet weights", info="auto: read from the file", elem_id=f"unet-weights-{index}",
                                   min_width=140)
    return UnitInputs(control, upload, sketch, annotator, preview, notes, scale, start, end, unet_weights, control_mode)


def control_recommendations(catalog: ModelCatalog, name: str | None) -> dict[str, float]:
    """The scale and guidance the control called `name` recommends (its control.json), {} for none or unreadable."""
    if name in (None, NONE):
        return {}
    try:
        return recommendations(catalog.find("control", name).path)
    except ControlNextError:  # generating with it says what is wrong
        return {}


def guidance_for_controls(catalog: ModelCatalog, names: list[str | None]) -> float:
    """The guidance `generate` would choose for these controls (request.recommended_guidance)."""
    return recommended_guidance(control_recommendations(catalog, n).get("guidance") for n in names)


def recommended_scale(catalog: ModelCatalog, name: str | None) -> float:
    return control_recommendations(catalog, name).get("scale", 1.0)


def slider(spec, step: float, label: str, elem_id: str | None = None, **overrides) -> gr.Slider:
    """A slider over a request field's web limits, starting at its default."""
    limits = spec.web_limits()
    options = dict(minimum=limits.get("ge", limits.get("gt", 0)), maximum=limits["le"], value=spec.default, step=step,
                   label=label, elem_id=elem_id, min_width=160)
    return gr.Slider(**{**options, **overrides})


PAGE = dict(css=CSS)  # what `gr.mount_gradio_app` adds to the page (Gradio 6 takes it there)


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
    embedded = any(e.source == "embedded" for e in catalog.bases)
    with gr.Blocks(title="controlnext", analytics_enabled=False) as ui:
        gr.Markdown("## controlnext: controllable image generation\nThe HTTP API is described at [/docs](/docs).")
        if not bases:
            gr.Markdown("**No base model found.** Start the server with `--models-dir`, `--base` or `--tiny-demo`.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3, min_width=320):
                if embedded:
                    gr.Markdown(embedded_model_help(), elem_id="embedded-help")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="a red circle on a blue background" if embedded else "")
                prompt_notes = gr.Markdown(elem_id="prompt-notes")
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
                                                elem_id="scheduler", min_width=160)
                        steps = slider(FIELDS["steps"], 1, "Steps", "steps")
                        guidance = slider(FIELDS["guidance"], 0.5, "Guidance", "guidance",  # follows the controls
                                          value=guidance_for_controls(catalog, [u.control.value for u in unit_inputs]))
                    with gr.Row():
                        seed = gr.Number(-1, precision=0, label="Seed", info="-1: random", elem_id="seed",
                                         min_width=160)
                        count = slider(FIELDS["num_images"], 1, "Images", "num-images")
                        offload = gr.Dropdown(["none", *OFFLOADS], value="none", label="CPU offload",
                                              info="weights in CPU memory until used", elem_id="offload", min_width=160)
                    with gr.Row():
                        size = FIELDS["width"].limits["multiple_of"]
                        width = slider(FIELDS["width"], size, "Width", "width", minimum=0, value=0,
                                       info="0: the model's own size")
                        height = slider(FIELDS["height"], size, "Height", "height", minimum=0, value=0,
                                        info="0: the model's own size")
                    resize_mode = gr.Dropdown(list(RESIZE_MODES), value=FIELDS["resize_mode"].default,
                                              label="Condition resize", info="just_resize: as the official pipelines",
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
            with gr.Column(scale=2, min_width=320):
                gallery = gr.Gallery(label="Images", columns=2, format="png", buttons=["download"], elem_id="gallery",
                                     elem_classes="pixelated", height=420)
                if embedded and unit_inputs:
                    unit = unit_inputs[0]
                    gr.Examples(embedded_examples(output_dir / "examples"), inputs=[prompt, unit.upload, unit.control],
                                label="Examples for the built-in model: click one, then Generate", elem_id="examples")
                details = gr.JSON(label="Parameters of the selected image", elem_id="parameters")

        def size_of(values: dict) -> tuple[int, int] | None:
            model = engine.default_size(values[base])
            if model is None:
                return None
            return int(values[width]) or model[0], int(values[height]) or model[1]

        def request_from(values: dict) -> GenerateRequest:
            controls = []
            for k, unit in enumerate(unit_inputs):
                if values[unit.control] in (None, NONE):
                    continue
                image = unit.image(values)
                if image is None:
                    raise gr.Error(f"Control {k + 1}: upload a condition image or draw one (the canvas is blank)")
                controls.append(dict(
                    control=values[unit.control], image=image, annotator=values[unit.annotator] or NONE,
                    scale=values[unit.scale], start=values[unit.start], end=values[unit.end],
                    unet_weights=values[unit.unet_weights] or CONTROL_FIELDS["unet_weights"].default,
                    control_mode=values[unit.control_mode] or CONTROL_FIELDS["control_mode"].default,
                ))
            seed_value = values[seed]
            try:
                return GenerateRequest(
                    prompt=values[prompt] or "", negative_prompt=values[negative] or "", base=values[base],
                    controls=controls, steps=int(values[steps]), guidance=values[guidance],
                    scheduler=values[scheduler], seed=None if seed_value is None or seed_value < 0 else int(seed_value),
                    width=int(values[width]) or None, height=int(values[height]) or None, num_images=int(values[count]),
                    resize_mode=values[resize_mode] or FIELDS["resize_mode"].default,
                    offload=None if values[offload] in (None, NONE) else values[offload],
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
            for text in generated.notes:
                gr.Warning(text)
            new = []
            for image, parameters in zip(generated.images, generated.parameters):
                path = output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{parameters['seed']}-{uuid.uuid4().hex[:6]}.png"
                save_with_parameters(image, path, parameters)
                new.append({"path": str(path), "caption": caption(parameters), "parameters": parameters})
            items = (new + values[history])[:HISTORY]
            return items, [(x["path"], x["caption"]) for x in items], new[0]["parameters"]

        inputs = {prompt, negative, base, scheduler, steps, guidance, seed, width, height, count, resize_mode, offload,
                  history}
        for unit in unit_inputs:
            inputs |= {unit.control, unit.upload, unit.sketch, unit.annotator, unit.scale, unit.start, unit.end,
                       unit.unet_weights, unit.control_mode}
        inputs |= {c for pair in loras for c in pair}
        run.click(on_generate, inputs=inputs, outputs=[history, gallery, details])
        prompt.submit(on_generate, inputs=inputs, outputs=[history, gallery, details])

        def on_select(items: list, event: gr.SelectData):
            return items[event.index]["parameters"] if 0 <= event.index < len(items) else None

        gallery.select(on_select, inputs=history, outputs=details)

        def on_prompt(values: dict):
            name = engine.catalog.find("base", values[base]) if values[base] else None
            path = None if name is None or name.source == "embedded" else name.path
            notes = [prompt_note(values[prompt] or "", path),
                     size_note(int(values[width]) or None, int(values[height]) or None, path)]
            return "\n\n".join(f"⚠ {text}" for text in notes if text)

        for trigger in (prompt.change, base.change, width.change, height.change):
            trigger(on_prompt, inputs={prompt, base, width, height}, outputs=prompt_notes, queue=False)

        def preview_for(unit: UnitInputs):
            def on_preview(values: dict):
                image = unit.image(values)
                if image is None or values[unit.control] in (None, NONE) and values[unit.annotator] in (None, NONE):
                    return (None if image is None else image), ""
                annotator = values[unit.annotator] or NONE
                condition = wait_for(submit(worker, engine.condition, annotator, image, size_of(values),
                                            values[resize_mode] or FIELDS["resize_mode"].default))
                control = values[unit.control]
                note = None
                if control not in (None, NONE):
                    note = condition_note(engine.catalog.find("control", control).path, annotator, image)
                return condition, f"⚠ {note}" if note else ""

            return on_preview

        # A control's control.json may recommend a scale and a guidance: choosing the control sets them.
        def on_control(values: dict):
            changes = {guidance: guidance_for_controls(catalog, [values[u.control] for u in unit_inputs])}
            for unit in unit_inputs:
                changes[unit.scale] = recommended_scale(catalog, values[unit.control])
            return changes

        for unit in unit_inputs:
            unit.control.change(on_control, inputs={u.control for u in unit_inputs},
                                outputs=[guidance, *(u.scale for u in unit_inputs)], queue=False)

        # An upload still in flight is awaited by the browser before it sends an event (Generate included), and the
        # drawing canvas counts only once something is drawn, so no condition is ever taken half-uploaded or blank.
        for unit in unit_inputs:
            preview_inputs = {unit.upload, unit.sketch, unit.annotator, unit.control, base, width, height, resize_mode}
            for trigger in (unit.upload.change, unit.sketch.apply, unit.annotator.change, unit.control.change,
                            base.change, width.release, height.release, resize_mode.change):
                trigger(preview_for(unit), inputs=preview_inputs, outputs=[unit.preview, unit.notes],
                        trigger_mode="always_last")
    return ui


def embedded_model_help() -> str:
    """What the built-in shapes model knows: its whole vocabulary and its one size."""
    from ..data.shapes import PALETTE, SHAPE_KINDS

    words = trained_vocabulary(None) or frozenset()
    colours = [c for c in PALETTE if c in words]
    side = (configured_size(DEFAULT_BASE) or (0, 0))[0]
    return (
        "**The built-in model** is tiny: it draws one to three **" + ", ".join(s for s in SHAPE_KINDS if s in words)
        + "** shapes in **" + ", ".join(colours)
        + f"** on a background of one of those colours, at **{side} x {side} px**, "
        "and knows no other words. Write prompts as *a red circle on a blue background* or *a green square and a "
        "yellow triangle on a white background*; its controls are **canny** (white outlines on black), **mask** "
        "(white shapes on black) and **skeleton** (coloured limbs from each shape's centre to its corners, like a "
        "pose map). Or click an example below."
    )


def embedded_examples(folder: Path) -> list[list]:
    """Prompt, condition image and control for a few scenes of the shapes world the built-in model learnt."""
    from ..data.shapes import make_sample

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    side = (configured_size(DEFAULT_BASE) or (64, 64))[0]
    for index, kind in EXAMPLES:
        sample = make_sample(index, split="test", resolution=side)
        path = folder / f"{kind}-{index}-{side}.png"
        if not path.is_file():
            sample.conditions[kind].save(path)
        rows.append([sample.caption, str(path), kind])
    return rows


def caption(parameters: dict) -> str:
    controls = ", ".join(f"{Path(c['control']).name}×{c['scale']:g}" for c in parameters["controls"]) or "no control"
    return (f"seed {parameters['seed']} · {parameters['steps']} steps · {parameters['scheduler']} · "
            f"guidance {parameters['guidance']:g} · {controls}")
