"""Whole-generation time of the embedded default model, with its shipped canny control and without."""

from __future__ import annotations

import time

from .overhead import median_iqr


def measure_generation(resolution: int | None = None, steps: int = 20, guidance_scale: float = 5.0, repeats: int = 5,
                       warmup: int = 1, threads: int | None = 1, log=print) -> dict | None:
    """Interleaved rounds of one generation without control and one with (at the model's own size when
    `resolution` is None); None when the model is not shipped."""
    import torch

    from ..data.shapes import ShapesWorld
    from ..pipelines import ControlledPipeline
    from ..pipelines.base import BUNDLED_CONTROLS, DEFAULT_BASE
    from ..request import configured_size

    control = BUNDLED_CONTROLS / "canny"
    if not (DEFAULT_BASE / "model_index.json").is_file() or not control.is_dir():
        log("generation: the embedded default model or its canny control is not shipped here; skipped")
        return None
    if threads:
        torch.set_num_threads(threads)
    resolution = resolution or configured_size(DEFAULT_BASE)[0]
    sample = ShapesWorld(resolution=resolution, conditions=("canny",)).sample(0, "test")
    pipe = ControlledPipeline.from_pretrained(None, [control])
    pipe.set_progress_bar_config(disable=True)
    options = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution, width=resolution)

    def run(name: str) -> float:
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        if name == "base":
            pipe.pipe(sample.caption, generator=generator, **options)
        else:
            pipe(sample.caption, control_images=[sample.conditions["canny"]], generator=generator, **options)
        return time.perf_counter() - started

    times = {"base": [], "controlnext": []}
    log(f"generation: {repeats} rounds + {warmup} warm-up of the embedded default, {steps} steps")
    for round_ in range(warmup + repeats):
        for name in times:
            seconds = run(name)
            if round_ >= warmup:
                times[name].append(seconds)
    timing = generation_timing(times)
    log(f"generation: {timing['median']['base']:.3f} s without control, {timing['median']['controlnext']:.3f} s with "
        f"({timing['overhead']['controlnext']:+.1%})")
    return {"resolution": resolution, "steps": steps, "guidance_scale": guidance_scale, "repeats": repeats,
            "warmup": warmup, "threads": torch.get_num_threads(), "timing": timing}


def generation_timing(times: dict[str, list[float]]) -> dict:
    """Medians and IQRs of each configuration's seconds, and of the per-round overhead of control."""
    ratios = [c / b - 1 for b, c in zip(times["base"], times["controlnext"])]
    spread = {name: median_iqr(values) for name, values in times.items()}
    overhead, overhead_iqr = median_iqr(ratios)
    return {"median": {k: v[0] for k, v in spread.items()}, "iqr": {k: v[1] for k, v in spread.items()},
            "overhead": {"controlnext": overhead}, "overhead_iqr": {"controlnext": overhead_iqr}, "seconds": times}
