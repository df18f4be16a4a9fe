"""Measure how well a base model draws held-out shapes-world captions: background, colour and kind accuracy."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from controlnext.models.tiny_sd import BASE_MODEL_DIR, load_base_pipeline  # noqa: E402
from controlnext.training.base_model import evaluate_base  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=BASE_MODEL_DIR, help="diffusers folder of the base model")
    parser.add_argument("--count", type=int, default=100, help="held-out captions to draw")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--sampler", choices=["ddim", "unipc"], default="ddim")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", type=Path, help="save the first 25 images as a 5 x 5 grid PNG here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipeline = load_base_pipeline(args.model)
    pipeline.set_progress_bar_config(disable=True)
    if args.sampler == "unipc":
        from diffusers import UniPCMultistepScheduler

        pipeline.scheduler = UniPCMultistepScheduler.from_config(pipeline.scheduler.config)
    started = time.time()
    scores, images = evaluate_base(pipeline, count=args.count, seed=args.seed, steps=args.steps,
                                   guidance=args.guidance)
    print(json.dumps({"model": str(args.model), "samples": args.count, "steps": args.steps, "guidance": args.guidance,
                      "sampler": args.sampler, "seconds": round(time.time() - started, 1),
                      **{key: round(value, 3) for key, value in scores.items()}}, indent=2))
    if args.grid:
        from PIL import Image

        side = images[0].width
        grid = Image.new("RGB", (5 * side, 5 * side))
        for index, image in enumerate(images[:25]):
            grid.paste(image, ((index % 5) * side, (index // 5) * side))
        grid.save(args.grid)


if __name__ == "__main__":
    main()
