"""Quality of the embedded default model and its controls on held-out scenes of the shapes world.

Prints, for the base model, how often it draws the background colour, shape colours and kinds its
captions ask for; for each control, edge F1 or mask IoU between the condition and the generated image,
with the control and without it (same prompts and seeds), next to the real scenes' score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from controlnext.control.loading import load_control  # noqa: E402
from controlnext.evaluation import CONTROL_METRICS, evaluate_control  # noqa: E402
from controlnext.pipelines import ControlledPipeline  # noqa: E402
from controlnext.pipelines.base import BUNDLED_CONTROLS, call_defaults  # noqa: E402
from controlnext.denoisers import pipeline_denoiser  # noqa: E402
from controlnext.training.base_model import evaluate_base  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default=None, help="base model folder (default: the embedded default model; "
                        "controlnext/assets/sd3-base for the shapes-world SD3)")
    parser.add_argument("--controls", nargs="*", default=None,
                        help="KIND=FOLDER pairs, KIND one of canny, mask, outline (default: the shipped controls)")
    parser.add_argument("--count", type=int, default=100, help="held-out scenes (default: 100)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default: 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # default: the controls shipped beside the base (assets/base -> assets/controls, sd3-base -> sd3-controls)
    shipped = BUNDLED_CONTROLS if args.base is None else Path(args.base).with_name(
        Path(args.base).name.replace("base", "controls"))
    controls = dict(item.split("=", 1) for item in args.controls) if args.controls is not None else {
        kind: str(shipped / kind) for kind in CONTROL_METRICS if (shipped / kind).is_dir()}
    started = time.time()
    pipe = ControlledPipeline.from_pretrained(args.base)
    pipe.set_progress_bar_config(disable=True)
    base_scores, _ = evaluate_base(pipe.pipe, count=args.count, seed=args.seed, steps=args.steps,
                                   guidance=args.guidance, **call_defaults(pipe.pipe))
    report = {"count": args.count, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
              "base": base_scores, "controls": {}}
    print(f"base model, {args.count} held-out captions: "
          + "  ".join(f"{key} {value:.3f}" for key, value in base_scores.items()), flush=True)
    for kind, folder in controls.items():
        controlled = ControlledPipeline(pipe.pipe, [load_control(folder, pipeline_denoiser(pipe.pipe))])
        scores = evaluate_control(controlled, kind, count=args.count, seed=args.seed, steps=args.steps,
                                  guidance=args.guidance)
        report["controls"][kind] = {"folder": folder, **scores}
        print(f"{kind} control: {scores['metric']} {scores['controlled']:.3f} with control, "
              f"{scores['uncontrolled']:.3f} without, {scores['real_scenes']:.3f} for the real scenes; shapes drawn "
              f"with control: colour {scores['controlled_colour']:.3f} kind {scores['controlled_kind']:.3f} "
              f"count {scores['controlled_count']:.3f}", flush=True)
    report["seconds"] = round(time.time() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
