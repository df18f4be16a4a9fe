"""The benchmarks as runs: efficiency (parameters, inference overhead, training cost, whole generation) and
convergence (its own, longer run), each merged into the results JSON and rendered into the report."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ControlNextError

DEFAULT_ROUNDS = {256: 6, 512: 3}  # keeps a CPU run of both under ~15 minutes


def _check_resolution(resolution: int, what: str) -> None:
    if resolution <= 0 or resolution % 64:
        raise ControlNextError(f"{what} {resolution} is not a positive multiple of 64 (the SD1.5 UNet needs a latent "
                               "divisible by 8); use e.g. 256 or 512")


def record(results_path: str | Path, output_path: str | Path, **entries) -> dict:
    """Merge `entries` (`update_results`' keywords) into the results JSON, render all of it into the report at
    `output_path` and return it."""
    from .report import render_markdown, update_results

    results = update_results(results_path, **entries)
    Path(output_path).write_text(render_markdown(results))
    return results


def run_benchmarks(
    resolutions: list[int] = (256,),
    rounds: int | None = None,
    warmup: int = 1,
    threads: int | None = 1,
    results_path: str | Path = "BENCHMARKS.json",
    output_path: str | Path = "BENCHMARKS.md",
    training_resolution: int = 256,
    training_steps: int = 3,
    generation: bool = True,
    log=print,
) -> dict:
    """Count parameters, measure the overhead at each resolution, the training cost and the embedded default's
    generation time; merge into `results_path` and write the report."""
    from .overhead import measure_overhead
    from .params import count_parameters
    from .report import machine_info

    for resolution in resolutions:
        _check_resolution(resolution, "resolution")
    if training_resolution:
        _check_resolution(training_resolution, "training resolution")
    from .sd3 import SD3_TRANSFORMERS, count_sd3

    log("counting parameters (SD1.5, SDXL) and SD3's parameters and FLOPs (SD3-medium, SD3.5-large)")
    record(results_path, output_path, parameters=[count_parameters("sd15"), count_parameters("sdxl")],
           sd3=[count_sd3(name) for name in SD3_TRANSFORMERS])
    for resolution in resolutions:
        n = rounds or DEFAULT_ROUNDS.get(resolution, 3)
        log(f"{resolution} px: {n} rounds + {warmup} warm-up")
        machine = machine_info()
        run = measure_overhead(resolution, repeats=n, warmup=warmup, threads=threads)
        machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        machine["torch_threads"] = run["threads"]
        record(results_path, output_path, overhead={**run, "machine": machine})
        for clock in ("wall", "cpu"):
            timing = run["timing"][clock]
            log(f"{resolution} px, {clock} time: ControlNeXt {timing['overhead']['controlnext']:+.1%}, ControlNet "
                f"{timing['overhead']['controlnet']:+.1%} over a base step of {timing['median']['base']:.2f} s")
    if training_resolution:
        from .training_cost import measure_training_cost

        machine = machine_info()
        cost = measure_training_cost("sd15", training_resolution, steps=training_steps, warmup=1, threads=threads,
                                     log=log)
        record(results_path, output_path, training_cost={**cost, "machine": machine})
        log(f"training step at {training_resolution} px: ControlNeXt {cost['time_ratio']:.0%} of ControlNet's time, "
            f"{cost['training_memory_ratio']:.0%} of its training memory")
    entries = {}
    if generation:
        from .generation import measure_generation

        entry = measure_generation(threads=threads, log=log)
        if entry is not None:
            entries["generation"] = {**entry, "machine": machine_info()}
    return record(results_path, output_path, **entries)


def run_video_benchmark(frames: int = 14, time_size: tuple[int, int] = (64, 112), rounds: int = 2,
                        threads: int | None = 1, results_path: str | Path = "BENCHMARKS.json",
                        output_path: str | Path = "BENCHMARKS.md", log=print) -> dict:
    """The cost of pose control on an SVD-XT step: printed, merged into `results_path`, rendered into the report."""
    from .report import machine_info
    from .video import measure_video

    machine = machine_info()
    entry = measure_video(frames=frames, time_size=time_size, time_frames=frames, repeats=rounds, threads=threads,
                          log=log)
    return record(results_path, output_path, video={**entry, "machine": machine})


def run_convergence_benchmark(setup, work_dir: str | Path = "runs/convergence",
                              results_path: str | Path = "BENCHMARKS.json", output_path: str | Path = "BENCHMARKS.md",
                              plots_dir: str | Path | None = None, log=print) -> dict:
    """Train both methods on the shapes world (`ConvergenceSetup`), plot the curves, merge and write the report."""
    from .convergence import plot_curves, run_convergence

    result = run_convergence(setup, work_dir, log=log)
    plots = Path(plots_dir) if plots_dir else Path(output_path).resolve().parent / "benchmarks"
    plot_curves(result, plots / f"convergence-{setup.label}.png")
    record(results_path, output_path, convergence=result)
    return result


def run_convergence_study_benchmark(study, work_dir: str | Path = "runs/convergence-study",
                                    results_path: str | Path = "BENCHMARKS.json",
                                    output_path: str | Path = "BENCHMARKS.md", plots_dir: str | Path | None = None,
                                    log=print) -> dict:
    """Run the convergence study (`ConvergenceStudy`; finished runs are kept), plot each kind's curves, merge the
    study into `results_path` (beside studies of other recipes or steps, in place of the single UNet comparisons)
    and write the report."""
    from .convergence import plot_study, run_study
    from .report import study_plot_name

    result = run_study(study, work_dir, log=log)
    plots = Path(plots_dir) if plots_dir else Path(output_path).resolve().parent / "benchmarks"
    for kind in result["kinds"]:
        plot_study(result, kind, plots / study_plot_name(result, kind))
    record(results_path, output_path, convergence_study=result)
    return result


def run_sd3_cpu_benchmark(results_path: str | Path = "BENCHMARKS.json", output_path: str | Path = "BENCHMARKS.md",
                          resolution: int = 256, repeats: int = 3, threads: int = 1, log=print) -> dict:
    """CPU seconds of a transformer step and of each control model alone at SD3-medium's width (6 joint blocks, bf16)."""
    from .sd3 import measure_cpu

    entry = measure_cpu("sd3-medium", resolution=resolution, repeats=repeats, threads=threads, log=log)
    record(results_path, output_path, sd3_cpu=entry)
    return entry
