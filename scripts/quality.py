"""Quality of the embedded default model and its controls on held-out scenes of the shapes world.

Prints, for the base model, how often it draws the background colour, shape colours and kinds its
captions ask for (over all scenes and per number of shapes); for each control, its fidelity (edge F1 at 1
pixel, mask IoU) between the condition and the generated image, with the control and without it (the base
model's images above: same prompts and seeds), next to the real scenes' score, the in-place scores (the
right kind and colour at each shape's position) with and without it, also per number of shapes, and the
speckle inside the drawn shapes (`interior_noise`, 0 for flat shapes). Ends with the targets the default
model is held to, each marked met, missed or not measured. `--split validation` judges other scenes, for
choosing among trained controls (a run's checkpoints: `--no-base --controls
canny=RUN/checkpoints/checkpoint-000400/control`).
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
from controlnext.data.shapes import SPLITS, ShapesWorld  # noqa: E402
from controlnext.denoisers import pipeline_denoiser  # noqa: E402
from controlnext.devices import resolve_device  # noqa: E402
from controlnext.errors import ControlNextError  # noqa: E402
from controlnext.evaluation import (CONTROL_METRICS, check_targets, evaluate_control, grouped_shape_scores,  # noqa: E402
                                   uncontrolled_images)
from controlnext.metrics import IN_PLACE_SCORES  # noqa: E402
from controlnext.pipelines import ControlledPipeline  # noqa: E402
from controlnext.pipelines.base import BUNDLED_CONTROLS  # noqa: E402
from controlnext.request import SCHEDULER_NAMES, recommended_guidance  # noqa: E402

BASE_GUIDANCE = 5.0  # the base model's figures, and a control's that recommends none


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default=None, help="base model folder (default: the embedded default model; "
                        "controlnext/assets/sd3-base for the shapes-world SD3)")
    parser.add_argument("--controls", nargs="*", default=None,
                        help=f"KIND=FOLDER pairs, or KIND alone for the shipped control; KIND one of "
                        f"{', '.join(CONTROL_METRICS)} (default: every shipped control)")
    parser.add_argument("--count", type=int, default=200, help="held-out scenes (default: 200)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    parser.add_argument("--guidance", type=float, default=None,
                        help=f"classifier-free guidance of every image (default: {BASE_GUIDANCE:g} for the base model "
                        f"alone; for a control, its recommended guidance as `generate` uses it, else {BASE_GUIDANCE:g}, "
                        "for its images with and without it)")
    parser.add_argument("--scale", type=float, default=None,
                        help="strength of every control (default: each control's recommended scale)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default: 0)")
    parser.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES,
                        help="sampler of every image, as `generate --scheduler` names it (default: the base's own, "
                        "DDIM for the embedded default, which `generate`'s auto keeps too)")
    parser.add_argument("--split", default="test", choices=sorted(set(SPLITS) - {"train"}),
                        help="scenes judged: test (the figures to report) or validation (to choose among trained "
                        "controls, e.g. a run's checkpoints, without looking at the test scenes) (default: test)")
    parser.add_argument("--strength", type=float, default=None,
                        help="start every image from its real scene noised to this strength (img2img, in (0, 1]) "
                        "instead of from noise: what the model loses over the last part of the schedule alone")
    parser.add_argument("--no-base", action="store_true", help="only the controls (comparing controls)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:N or mps; "
                        "a GPU's figures differ from a CPU's in the last bits of the arithmetic (default: auto)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # default: the controls shipped beside the base (assets/base -> assets/controls, sd3-base -> sd3-controls)
    shipped = BUNDLED_CONTROLS if args.base is None else Path(args.base).with_name(
        Path(args.base).name.replace("base", "controls"))
    if args.controls is None:
        controls = {kind: str(shipped / kind) for kind in CONTROL_METRICS if (shipped / kind).is_dir()}
    else:
        pairs = [item.split("=", 1) if "=" in item else (item, str(shipped / item)) for item in args.controls]
        controls = dict(pairs)
        unknown = sorted(set(controls) - set(CONTROL_METRICS))
        if unknown:
            parser.exit(2, f"{parser.prog}: error: --controls {unknown[0]}: unknown kind; use one of "
                        f"{', '.join(CONTROL_METRICS)}, as KIND or KIND=FOLDER\n")
    started = time.time()
    try:
        device = resolve_device(args.device)
    except ControlNextError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.strength is not None and not 0 < args.strength <= 1:
        parser.exit(2, f"{parser.prog}: error: --strength {args.strength}: must be in (0, 1]\n")
    pipe = ControlledPipeline.from_pretrained(args.base, device=device,
                                              task="txt2img" if args.strength is None else "img2img")
    try:
        if args.scheduler:
            pipe.use_scheduler(args.scheduler)
    except ControlNextError as error:
        parser.exit(2, f"{parser.prog}: error: --scheduler {args.scheduler}: {error}\n")
    pipe.set_progress_bar_config(disable=True)
    report = {"device": str(pipe.pipe.device), "count": args.count, "split": args.split, "steps": args.steps,
              "scheduler": type(pipe.pipe.scheduler).__name__,  # the sampler in use, named alike either way
              "guidance": args.guidance, "scale": args.scale, "seed": args.seed, "strength": args.strength,
              "base": {}, "controls": {}}
    sampling = dict(count=args.count, seed=args.seed, steps=args.steps, split=args.split, strength=args.strength)
    floors = {}  # guidance -> the base model's images (same prompts and seeds): the floor of the controls

    def floor(guidance: float) -> list:
        if guidance not in floors:
            floors[guidance] = uncontrolled_images(pipe, guidance=guidance, **sampling)
        return floors[guidance]

    base_guidance = BASE_GUIDANCE if args.guidance is None else args.guidance
    if not args.no_base:  # the base model's images judged on their own
        report["base"] = grouped_shape_scores(floor(base_guidance),
                                              [ShapesWorld().spec(i, args.split) for i in range(args.count)])
        report["base_guidance"] = base_guidance
    for group, scores in report["base"].items():  # the in-place scores need positions, which captions do not give
        shown = {key: value for key, value in scores.items() if key not in ("scenes", *IN_PLACE_SCORES)}
        print(f"base model, guidance {base_guidance:g}, {group} ({scores['scenes']} {args.split} captions): "
              + "  ".join(f"{key} {value:.3f}" for key, value in shown.items()), flush=True)
    for kind, folder in controls.items():
        control = load_control(folder, pipeline_denoiser(pipe.pipe))
        guidance = args.guidance
        if guidance is None:  # as `generate` chooses; 5 where the control names none
            guidance = recommended_guidance([control.guidance], default=BASE_GUIDANCE)
        scores = evaluate_control(ControlledPipeline(pipe.pipe, [control]), kind, uncontrolled=floor(guidance),
                                  scale=args.scale, guidance=guidance, **sampling)
        report["controls"][kind] = {"folder": folder, "guidance": guidance, **scores}
        against = "" if scores["scored_against"] == kind else f" (against the scene's {scores['scored_against']})"
        print(f"{kind} control, guidance {guidance:g}: {scores['metric']}{against} {scores['controlled']:.3f} "
              "with control, "
              f"{scores['uncontrolled']:.3f} without, {scores['real_scenes']:.3f} for the real scenes"
              + (f"; at 2 px {scores['controlled_2px']:.3f} / {scores['uncontrolled_2px']:.3f}" if "controlled_2px"
                 in scores else "") + "; with / without control: "
              + "  ".join(f"{key} {scores['controlled_' + key]:.3f} / {scores['uncontrolled_' + key]:.3f}"
                          for key in ("kind_in_place", "colour_in_place", "kind", "colour", "count", "interior_noise")),
              flush=True)
        print(f"  {kind} control in place, by shapes per scene: " + "  ".join(
            f"{group} ({values['scenes']}) kind {values['kind_in_place']:.3f} colour {values['colour_in_place']:.3f}"
            for group, values in scores["controlled_in_place_by_count"].items()), flush=True)
    report["targets"] = check_targets(report) if args.strength is None else []  # they hold images made from noise
    for target in report["targets"]:
        value = target["value"]
        verdict = "not measured" if value is None else f"{value:.3f}, {'met' if target['met'] else 'MISSED'}"
        print(f"target {target['target']} >= {target['least']}: {verdict}")
    report["seconds"] = round(time.time() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
