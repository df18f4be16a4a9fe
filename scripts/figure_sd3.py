"""Figure of the shapes-world SD3 with its canny control: rows of held-out scenes, condition | with | without control."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from controlnext.control.loading import load_control  # noqa: E402
from controlnext.evaluation import held_out  # noqa: E402
from controlnext.pipelines import ControlledPipeline  # noqa: E402
from controlnext.pipelines.base import call_defaults  # noqa: E402
from controlnext.denoisers import pipeline_denoiser  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="the shapes-world SD3 folder")
    parser.add_argument("--control", required=True, help="its canny control")
    parser.add_argument("--output", type=Path, default=Path("docs/images/sd3-canny.png"))
    parser.add_argument("--rows", type=int, default=4, help="held-out scenes (default: 4)")
    parser.add_argument("--zoom", type=int, default=3, help="pixel zoom of the 64 px images (default: 3)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = ControlledPipeline.from_pretrained(args.base)
    pipe = ControlledPipeline(pipe.pipe, [load_control(args.control, pipeline_denoiser(pipe.pipe))])
    side = pipe.default_size()[0]
    scenes = held_out(args.rows, "canny", side)
    options = dict(num_inference_steps=20, guidance_scale=5.0, height=side, width=side, **call_defaults(pipe.pipe))
    captions, conditions = [s.caption for s in scenes], [s.conditions["canny"] for s in scenes]
    controlled = pipe(captions, control_images=[conditions], generator=torch.Generator().manual_seed(0),
                      **options).images
    plain = pipe.pipe(captions, generator=torch.Generator().manual_seed(0), **options).images
    tile = side * args.zoom
    grid = Image.new("RGB", (3 * tile, args.rows * tile), "white")
    for row, images in enumerate(zip(conditions, controlled, plain)):
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (column * tile, row * tile))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)
    for caption in captions:
        print(caption)


if __name__ == "__main__":
    main()
