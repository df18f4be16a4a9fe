"""How well the embedded default model and its controls do on held-out scenes of the shapes world.

The base model is judged on what its captions ask for (background colour, shape colours and kinds, see
`controlnext.metrics.shape_scores`); a control on how closely the generated image follows its condition
(edge F1 for edges and outlines, mask IoU for masks), against the same model, prompts and seeds without
control (the floor) and against the real scene (the ceiling: what drawing the scene exactly scores).
"""

from __future__ import annotations

import torch

from . import metrics
from .data.shapes import ShapesWorld

CONTROL_METRICS = {"canny": "edge_f1", "outline": "edge_f1", "mask": "mask_iou"}


def held_out(count: int, kind: str | None = None, resolution: int = 64, world_seed: int = 0) -> list:
    """The first `count` scenes of the world's test split (with the `kind` condition when given)."""
    world = ShapesWorld(seed=world_seed, resolution=resolution, conditions=(kind,) if kind else ("mask",))
    return [world.sample(index, "test") for index in range(count)]


@torch.no_grad()
def evaluate_control(pipe, kind: str, count: int = 100, seed: int = 0, steps: int = 20, guidance: float = 5.0,
                     batch: int = 25, scale: float | None = None) -> dict[str, float]:
    """Fidelity with the control, without it (same prompts and seeds) and of the real scenes; shape scores of both.

    `pipe` is a ControlledPipeline holding exactly one control, made for `kind` conditions.
    """
    metric = getattr(metrics, CONTROL_METRICS[kind])
    side = pipe.default_size()[0]
    samples = held_out(count, kind, side)
    controlled, uncontrolled = [], []
    from .pipelines.base import call_defaults

    options = dict(num_inference_steps=steps, guidance_scale=guidance, height=side, width=side,
                   **call_defaults(pipe.pipe))
    for start in range(0, count, batch):
        chunk = samples[start:start + batch]
        captions = [sample.caption for sample in chunk]
        conditions = [sample.conditions[kind] for sample in chunk]
        controlled += pipe(captions, control_images=[conditions], control_scales=scale,
                           generator=torch.Generator().manual_seed(seed + start), **options).images
        uncontrolled += pipe.pipe(captions, generator=torch.Generator().manual_seed(seed + start), **options).images

    def mean(images) -> float:
        return float(sum(metric(s.conditions[kind], image) for s, image in zip(samples, images)) / count)

    specs = [sample.spec for sample in samples]
    return {
        "metric": CONTROL_METRICS[kind], "count": count,
        "controlled": mean(controlled), "uncontrolled": mean(uncontrolled),
        "real_scenes": mean([sample.image for sample in samples]),
        **{f"controlled_{key}": value for key, value in metrics.mean_shape_scores(controlled, specs).items()},
        **{f"uncontrolled_{key}": value for key, value in metrics.mean_shape_scores(uncontrolled, specs).items()},
    }
