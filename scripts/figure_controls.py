"""Figure of a shapes-world model with its controls: rows of held-out scenes, condition | with | without control.

    python scripts/figure_controls.py                      # the embedded default and its shipped controls
    python scripts/figure_controls.py --base controlnext/assets/sd3-base \\
        --control canny=controlnext/assets/sd3-controls/canny --rows 4 --output docs/images/sd3-canny.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from controlnext.control.loading import load_control  # noqa: E402
from controlnext.denoisers import pipeline_denoiser  # noqa: E402
from controlnext.evaluation import CONTROL_METRICS, held_out  # noqa: E402
from controlnext.pipelines import ControlledPipeline  # noqa: E402
from controlnext.pipelines.base import BUNDLED_CONTROLS, call_defaults  # noqa: E402
from controlnext.request import recommended_guidance  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model folder (default: the embedded default model)")
    parser.add_argument("--control", nargs="*", default=None,
                        help="KIND=FOLDER pairs (default: the embedded model's shipped controls)")
    parser.add_argument("--output", type=Path, default=Path("docs/images/embedded-default.png"))
    parser.add_argument("--rows", type=int, default=2, help="held-out scenes per control (default: 2)")
    parser.add_argument("--zoom", type=int, default=2, help="pixel zoom of the images (default: 2)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance of every image (default: each control's recommended guidance, "
                             "as `generate` uses it, else 5; its row's images without control use the same)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    controls = dict(item.split("=", 1) for item in args.control) if args.control is not None else {
        kind: str(BUNDLED_CONTROLS / kind) for kind in CONTROL_METRICS if (BUNDLED_CONTROLS / kind).is_dir()}
    base = ControlledPipeline.from_pretrained(args.base)
    side = base.default_size()[0]
    options = dict(num_inference_steps=20, height=side, width=side, **call_defaults(base.pipe))
    rows = []
    for number, (kind, folder) in enumerate(controls.items()):
        control = load_control(folder, pipeline_denoiser(base.pipe))
        pipe = ControlledPipeline(base.pipe, [control])
        guidance = args.guidance if args.guidance is not None else recommended_guidance([control.guidance], 5.0)
        scenes = held_out(args.rows * (number + 1), kind, side)[args.rows * number:]  # other scenes for each control
        captions, conditions = [s.caption for s in scenes], [s.conditions[kind] for s in scenes]
        controlled = pipe(captions, control_images=[conditions], generator=torch.Generator().manual_seed(0),
                          guidance_scale=guidance, **options).images
        plain = base.pipe(captions, generator=torch.Generator().manual_seed(0), guidance_scale=guidance,
                          **options).images
        rows += list(zip(conditions, controlled, plain))
        for caption in captions:
            print(f"{kind} (guidance {guidance:g}): {caption}")
    tile = side * args.zoom
    grid = Image.new("RGB", (3 * tile, len(rows) * tile), "white")
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (column * tile, row * tile))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)


if __name__ == "__main__":
    main()
