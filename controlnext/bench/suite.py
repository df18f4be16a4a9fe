"""The whole efficiency benchmark: parameter counts, then FLOPs and CPU timing per resolution."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ControlNextError

DEFAULT_ROUNDS = {256: 6, 512: 3}  # keeps a CPU run of both under ~15 minutes


def run_benchmarks(
    resolutions: list[int] = (256,),
    rounds: int | None = None,
    warmup: int = 1,
    threads: int | None = 1,
    results_path: str | Path = "BENCHMARKS.json",
    output_path: str | Path = "BENCHMARKS.md",
    command: str = "controlnext bench",
    log=print,
) -> dict:
    """Count parameters, measure the overhead at each resolution, merge into `results_path`, write the report."""
    from .overhead import measure_overhead
    from .params import count_parameters
    from .report import machine_info, render_markdown, update_results

    for resolution in resolutions:
        if resolution <= 0 or resolution % 64:
            raise ControlNextError(f"resolution {resolution} is not a positive multiple of 64 (the SD1.5 UNet "
                                   "needs a latent divisible by 8); use e.g. 256 or 512")
    log("counting parameters (SD1.5, SDXL)")
    results = update_results(results_path, parameters=[count_parameters("sd15"), count_parameters("sdxl")])
    for resolution in resolutions:
        n = rounds or DEFAULT_ROUNDS.get(resolution, 3)
        log(f"{resolution} px: {n} rounds + {warmup} warm-up")
        machine = machine_info()
        run = measure_overhead(resolution, repeats=n, warmup=warmup, threads=threads)
        machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        machine["torch_threads"] = run["threads"]
        results = update_results(results_path, overhead={**run, "machine": machine})
        Path(output_path).write_text(render_markdown(results, command))
        for clock in ("wall", "cpu"):
            timing = run["timing"][clock]
            log(f"{resolution} px, {clock} time: ControlNeXt {timing['overhead']['controlnext']:+.1%}, ControlNet "
                f"{timing['overhead']['controlnet']:+.1%} over a base step of {timing['median']['base']:.2f} s")
    Path(output_path).write_text(render_markdown(results, command))
    return results
