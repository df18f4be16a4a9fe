"""The web UI's Video tab: a reference image animated with the poses of a driving video (or uploaded poses)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import gradio as gr
from PIL import Image

from ..errors import ControlNextError
from ..video_generation import VideoRequest
from .engine import Engine
from .worker import ModelWorker

DEFAULTS = VideoRequest(base="", reference="")


def pose_folder(files: list | None) -> str | None:
    """Uploaded pose files (OpenPose JSON or pose images) gathered in one folder, named as uploaded."""
    if not files:
        return None
    folder = Path(tempfile.mkdtemp(prefix="controlnext-poses-"))
    for file in files:
        path = Path(file if isinstance(file, str) else file.name)
        shutil.copy(path, folder / path.name)
    return str(folder)


def video_tab(engine: Engine, worker: ModelWorker, base: str, controls: list[str], output_dir: Path) -> None:
    """The tab's components and handlers; every model call goes through `worker`, as image generation does."""
    from .ui import submit, wait_for

    names = {Path(c).name: c for c in controls}
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown(f"Base: `{Path(base).name}`. Frame 0 is the reference; frame k follows pose k.")
            with gr.Row():
                reference = gr.Image(type="pil", label="Reference image", elem_id="video-reference")
                driving = gr.Video(label="Driving video (its poses are detected and fitted to the reference)",
                                   elem_id="video-driving")
            poses = gr.File(label="...or poses: OpenPose JSON files or pose images", file_count="multiple",
                            elem_id="video-poses")
            control = gr.Dropdown(list(names), value=next(iter(names), None), label="Pose control",
                                  elem_id="video-control")
            with gr.Accordion("Frames and sampling", open=True):
                with gr.Row():
                    stride = gr.Slider(1, 8, value=DEFAULTS.stride, step=1, label="Take every k-th driving frame")
                    max_frames = gr.Number(0, precision=0, label="At most this many driving frames (0: all)")
                    window = gr.Number(0, precision=0, label="Frames per window (0: the base's)")
                    overlap = gr.Number(-1, precision=0, label="Overlap (-1: a quarter of a window)")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=DEFAULTS.steps, step=1, label="Steps")
                    scale = gr.Slider(0, 2, value=DEFAULTS.scale, step=0.05, label="Control scale")
                    min_guidance = gr.Slider(1, 10, value=DEFAULTS.min_guidance, step=0.5, label="Guidance, first frame")
                    max_guidance = gr.Slider(1, 10, value=DEFAULTS.max_guidance, step=0.5, label="Guidance, last frame")
                with gr.Row():
                    fps = gr.Slider(1, 30, value=DEFAULTS.fps, step=1, label="Frame-rate conditioning")
                    motion = gr.Slider(0, 255, value=DEFAULTS.motion_bucket, step=1, label="Motion bucket")
                    noise_aug = gr.Slider(0, 1, value=DEFAULTS.noise_aug, step=0.01, label="Noise augmentation")
                    seed = gr.Number(0, precision=0, label="Seed")
                with gr.Row():
                    width = gr.Number(0, precision=0, label="Width (0: 1024, or 576 for portrait)")
                    height = gr.Number(0, precision=0, label="Height (0: 576, or 1024 for portrait)")
            with gr.Row():
                preview_button = gr.Button("Preview poses", elem_id="video-preview-button")
                run = gr.Button("Generate video", variant="primary", elem_id="video-generate")
        with gr.Column(scale=2):
            preview = gr.Image(label="Conditions (animated)", interactive=False, elem_id="video-preview")
            result = gr.Video(label="Video", interactive=False, elem_id="video-result")
            details = gr.JSON(label="Parameters", elem_id="video-parameters")

    def request(values: dict) -> tuple[VideoRequest, Image.Image]:
        if values[reference] is None:
            raise gr.Error("upload a reference image")
        if not values[driving] and not values[poses]:
            raise gr.Error("upload a driving video or pose files")
        try:
            made = engine.video_request(
                base=base, reference="(uploaded)", control=names.get(values[control]), driving=values[driving] or None,
                poses=None if values[driving] else pose_folder(values[poses]), stride=int(values[stride]),
                max_frames=int(values[max_frames]) or None, frames_per_window=int(values[window]) or None,
                overlap=None if values[overlap] < 0 else int(values[overlap]), steps=int(values[steps]),
                scale=values[scale], min_guidance=values[min_guidance], max_guidance=values[max_guidance],
                fps=int(values[fps]), motion_bucket=int(values[motion]), noise_aug=values[noise_aug],
                seed=int(values[seed]), width=int(values[width]) or None, height=int(values[height]) or None)
        except ControlNextError as error:
            raise gr.Error(str(error)) from None
        return made, values[reference]

    def conditions_of(values: dict):
        made, image = request(values)
        return made, wait_for(submit(worker, engine.video_conditions, made, image))

    def on_preview(values: dict):
        _, prepared = conditions_of(values)
        return animation(prepared.frames, output_dir)

    def on_generate(values: dict, progress=gr.Progress()):
        made, prepared = conditions_of(values)
        progress(0, desc="generating (windows x steps)")
        generated = wait_for(submit(worker, engine.generate_video, made, prepared))
        from ..video_generation import save_video

        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{made.seed}-{uuid.uuid4().hex[:6]}"
        mp4 = save_video(generated, output_dir / f"{stem}.mp4", gif=False)[0]
        return animation(prepared.frames, output_dir), str(mp4), json.loads(json.dumps(generated.parameters))

    inputs = {reference, driving, poses, control, stride, max_frames, window, overlap, steps, scale, min_guidance,
              max_guidance, fps, motion, noise_aug, seed, width, height}
    preview_button.click(on_preview, inputs=inputs, outputs=preview)
    run.click(on_generate, inputs=inputs, outputs=[preview, result, details])


def animation(frames: list[Image.Image], folder: Path) -> str:
    """The condition frames as a looping GIF in `folder` (the browser animates it)."""
    from ..videos import write_gif

    return str(write_gif(frames, folder / f"conditions-{uuid.uuid4().hex[:8]}.gif", fps=8))
