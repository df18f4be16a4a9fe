"""The three control modes on the embedded default model: docs/images/control-modes.png and their measured effect.

The figure: an outline of a circle as the canny condition, under a prompt that agrees with it and two that do not
(a square, a triangle), in each mode. The figures: over held-out scenes of the shapes world, the edge F1 of the
image against its condition (how closely the control is followed) and the colour and kind accuracy of the shapes
drawn (how closely the caption is followed), per mode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlnext.data.shapes import Shape, ShapesSpec, make_sample, render_condition  # noqa: E402
from controlnext.metrics import edge_f1, mean_shape_scores  # noqa: E402
from controlnext.pipelines import ControlledPipeline  # noqa: E402
from controlnext.request import CONTROL_MODES  # noqa: E402

FIGURE = Path(__file__).resolve().parent.parent / "docs" / "images" / "control-modes.png"
CIRCLE = ShapesSpec("blue", (Shape("circle", "red", (0.5, 0.5), 0.28),))
PROMPTS = ("a red circle on a blue background", "a red square on a blue background",
           "a yellow triangle on a green background")
CELL, LABEL = 128, 16


def generate(pipe, prompts: list[str], conditions: list[Image.Image], mode: str, steps: int, guidance: float):
    return pipe(prompts, control_images=[conditions], control_modes=mode, num_inference_steps=steps,
                guidance_scale=guidance, generator=[torch.Generator().manual_seed(k) for k in range(len(prompts))]).images


def figure(pipe, steps: int, guidance: float) -> Image.Image:
    condition = render_condition(CIRCLE, "canny", pipe.default_size()[0])  # at the model's own size
    columns = ["condition", *CONTROL_MODES]
    sheet = Image.new("RGB", (CELL * len(columns), (CELL + LABEL) * len(PROMPTS) + LABEL), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((c * CELL + 4, 2), name, fill="black")
    by_mode = {mode: generate(pipe, list(PROMPTS), [condition] * len(PROMPTS), mode, steps, guidance)
               for mode in CONTROL_MODES}
    for r, prompt in enumerate(PROMPTS):
        top = LABEL + r * (CELL + LABEL)
        draw.text((4, top + 1), prompt, fill="black")
        cells = [condition, *(by_mode[mode][r] for mode in CONTROL_MODES)]
        for c, image in enumerate(cells):
            sheet.paste(image.resize((CELL, CELL), Image.NEAREST), (c * CELL, top + LABEL))
    return sheet


def measure(pipe, count: int, steps: int, guidance: float) -> None:
    samples = [make_sample(index, split="test", resolution=pipe.default_size()[0]) for index in range(count)]
    prompts, conditions = [s.caption for s in samples], [s.conditions["canny"] for s in samples]
    for mode in CONTROL_MODES:
        images = generate(pipe, prompts, conditions, mode, steps, guidance)
        f1 = sum(edge_f1(c, image) for c, image in zip(conditions, images)) / count
        shapes = mean_shape_scores(images, [s.spec for s in samples])
        print(f"{mode:9s} edge F1 {f1:.3f}  colour {shapes['colour']:.3f}  kind {shapes['kind']:.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=48, help="held-out scenes measured (default: 48)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default: 5)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = ControlledPipeline.from_pretrained(None, ["controlnext/assets/controls/canny"], scheduler="ddim")
    figure(pipe, args.steps, args.guidance).save(FIGURE, optimize=True)
    print(f"wrote {FIGURE}")
    measure(pipe, args.count, args.steps, args.guidance)


if __name__ == "__main__":
    main()
