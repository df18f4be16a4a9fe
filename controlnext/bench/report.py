"""Benchmark results as JSON (accumulated across runs) and as the tables of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

# The papers' figures, for the tables' last column.
PAPER = {
    ("sd15", "controlnext"): "~30M", ("sd15", "controlnet"): "361M",
    ("sdxl", "controlnext"): "~108M", ("sdxl", "controlnet"): "1.251B",
}
METHODS = {"controlnext": "ControlNeXt", "controlnext_first_step": "ControlNeXt, first step", "controlnet": "ControlNet"}
METHOD_NAMES = {"controlnext": "ControlNeXt", "controlnet": "ControlNet"}


def machine_info() -> dict:
    """What the timings ran on: CPU, threads, load, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = {}
    for package in ("torch", "diffusers", "transformers", "controlnext"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def update_results(path: str | Path, parameters: list[dict] | None = None, overhead: dict | None = None,
                   training_cost: dict | None = None, convergence: dict | None = None,
                   generation: dict | None = None, gpu: dict | None = None, video: dict | None = None,
                   sd3: list[dict] | None = None, sd3_cpu: dict | None = None,
                   convergence_study: dict | None = None) -> dict:
    """Merge new results into the JSON file at `path` and return all.

    One overhead entry per resolution, one training-cost entry per architecture and resolution, one
    convergence entry per condition kind, one convergence study per recipes and steps (`study_label`); a new
    entry replaces the old one of the same key. A convergence study replaces the single comparisons on the UNet
    base (`drop_unet_comparisons`), which it supersedes.
    """
    path = Path(path)
    results = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("parameters", "overhead", "training_cost", "convergence"):
        results.setdefault(key, {})
    for entry in parameters or []:
        results["parameters"][entry["architecture"]] = entry
    if overhead is not None:
        results["overhead"][str(overhead["resolution"])] = overhead
    if training_cost is not None:
        results["training_cost"][f"{training_cost['architecture']}-{training_cost['resolution']}"] = training_cost
    if convergence is not None:
        setup = convergence["setup"]
        results["convergence"][setup.get("label", setup["kind"])] = convergence
    if generation is not None:
        results["generation"] = generation
    if gpu is not None:
        results["gpu"] = gpu
    if video is not None:
        results["video"] = video
    for entry in sd3 or []:
        results.setdefault("sd3", {})[entry["architecture"]] = entry
    if sd3_cpu is not None:
        results["sd3_cpu"] = sd3_cpu
    studies = results.setdefault("convergence_studies", {})
    if "convergence_study" in results:  # a file written before studies were kept side by side
        former = results.pop("convergence_study")
        studies[study_label(former)] = former
    if convergence_study is not None:
        studies[study_label(convergence_study)] = convergence_study
        drop_unet_comparisons(results)
    path.write_text(json.dumps(results, indent=1))
    return results


def study_label(study: dict) -> str:
    """A convergence study's name in the results and its plots' file names: its recipes and steps ("paper-600")."""
    return f"{'-'.join(study['recipes'])}-{study['setup']['steps']}"


def study_plot_name(study: dict, kind: str) -> str:
    """The file name of a study's plot for one condition kind, in the plots folder beside the report."""
    return f"convergence-study-{study_label(study)}-{kind}.png"


def drop_unet_comparisons(results: dict) -> list[str]:
    """Remove the single convergence comparisons on the UNet base (every label but "sd3-*"); returns their labels."""
    entries = results.get("convergence", {})
    dropped = [label for label in entries if not label.startswith("sd3-")]
    for label in dropped:
        del entries[label]
    return dropped


def render_markdown(results: dict) -> str:
    """BENCHMARKS.md from accumulated results."""
    lines = ["# Benchmarks", "",
             "Produced by `controlnext bench` and its modes (library: `controlnext.bench`). Random weights: these are",
             "architecture costs, the same for any checkpoint of that architecture.", ""]
    if results.get("parameters"):
        lines += ["## Parameters", "",
                  "Built from the public UNet configs on the meta device. ControlNeXt trains its module plus the "
                  "selected base weights (which replace base weights, adding nothing at inference); ControlNet "
                  "trains and adds a copy of the encoder (`ControlNetModel.from_unet`).", "",
                  "| base | method | trainable | added at inference | total at inference | paper (trainable) |",
                  "|---|---|---|---|---|---|"]
        for name, entry in results["parameters"].items():
            lines.append(f"| {name} | (base UNet) | - | - | {_m(entry['base_unet'])} | - |")
            cnx, cn = entry["controlnext"], entry["controlnet"]
            lines.append(f"| {name} | ControlNeXt: module {_m(cnx['module'])} + UNet `{cnx['trained_unet_pattern']}` "
                         f"{_m(cnx['trained_unet'])} | {_m(cnx['trainable'])} | {_m(cnx['added'])} | "
                         f"{_m(cnx['total'])} | {PAPER[(name, 'controlnext')]} |")
            lines.append(f"| {name} | ControlNet | {_m(cn['trainable'])} | {_m(cn['added'])} | {_m(cn['total'])} | "
                         f"{PAPER[(name, 'controlnet')]} |")
        lines.append("")
    runs = [results["overhead"][key] for key in sorted(results.get("overhead", {}), key=int)]
    if runs:
        lines += _overhead_tables(runs)
    if results.get("generation"):
        lines += _generation_table(results["generation"])
    if results.get("video"):
        lines += _video_tables(results["video"])
    if results.get("training_cost"):
        lines += _training_cost_table(list(results["training_cost"].values()))
    for study in results.get("convergence_studies", {}).values():
        lines += _study_tables(study)
    if results.get("convergence"):
        lines += _convergence_tables(results["convergence"])
    if results.get("sd3"):
        lines += _sd3_tables(results["sd3"], results.get("sd3_cpu"))
    lines += _gpu_tables(results.get("gpu"))
    return "\n".join(lines) + "\n"


def _gpu_tables(entry: dict | None) -> list[str]:
    lines = ["## On a GPU", ""]
    if not entry:
        return lines + ["Not measured yet: `bash scripts/gpu_check.sh` on a CUDA machine takes these figures "
                        "(half-precision checks, step and training cost, whole generation against diffusers' "
                        "ControlNet pipelines, `torch.compile`, for SD1.5, SDXL, SD3 and SVD) and adds them here.", ""]
    machine = entry["machine"]
    lines += [f"`python -m controlnext.bench.gpu` on {machine.get('gpu', entry['device'])}, {entry['dtype']}, random "
              f"weights; wall-clock medians; '-' where a measure does not apply. {_versions(machine)}.", "",
              "| base | size | finite (base / ControlNeXt / ControlNet / blank condition) | ControlNeXt scale 0 = base "
              "| step overhead ControlNeXt / ControlNet | whole generation: base / ControlNeXt / diffusers ControlNet "
              "| training step ControlNeXt / ControlNet (peak memory) | torch.compile speed-up (recompiles) |",
              "|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "NO", None: "-"}
    for name, arch in entry["architectures"].items():
        check, generation = arch["generation_check"], arch["generation"]
        finite = " / ".join(yes[check.get(k)] for k in (
            "base_finite", "controlnext_finite", "controlnet_finite", "controlnext_blank_condition_finite"))
        step = arch.get("step", {}).get("overhead")
        step = f"{step['controlnext']:+.1%} / {step['controlnet']:+.1%}" if step else "-"
        median, overhead = generation["median"], generation["overhead"]
        whole = " / ".join([f"{median['base']:.2f} s"] + [
            f"{median[k]:.2f} s ({overhead[k]:+.1%})" if k in median else "-"
            for k in ("controlnext", "diffusers_controlnet")]) + f", {generation['steps']} steps"
        training = "-"
        if arch.get("training"):
            methods = arch["training"]["methods"]
            training = " / ".join(f"{methods[m]['median']:.3f} s ({methods[m]['peak_bytes'] / 2**30:.1f} GiB)"
                                  for m in ("controlnext", "controlnet"))
        compiled = arch.get("compile")
        compiled = (f"x{compiled['speedup']:.2f} ({compiled['graphs_compiled_after_first_generation']})"
                    if compiled else "-")
        width, height = arch["size"]
        size = f"{width}x{height} px" + (f", {arch['frames']} frames" if arch.get("frames") else "")
        lines.append(f"| {name} | {size} | {finite} | {yes[check['controlnext_scale0_equals_base']]} | {step} | {whole} "
                     f"| {training} | {compiled} |")
    return lines + [""]


def _versions(machine: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in machine["versions"].items())


def _generation_table(entry: dict) -> list[str]:
    timing = entry["timing"]
    lines = ["## Whole generation on the embedded default model", "",
             f"`ControlledPipeline` on the shipped base model, {entry['resolution']} px, {entry['steps']} DDIM steps, "
             f"guidance {entry['guidance_scale']}, {entry['threads']} torch thread(s), {entry['repeats']} interleaved "
             f"rounds after {entry['warmup']} warm-up; wall-clock seconds, median (IQR).", "",
             "| configuration | seconds | overhead |", "|---|---|---|"]
    for name, label in (("base", "no control"), ("controlnext", "ControlNeXt (shipped canny control)")):
        overhead = "-" if name == "base" else f"{timing['overhead'][name]:+.1%} (IQR {timing['overhead_iqr'][name]:.1%})"
        lines.append(f"| {label} | {timing['median'][name]:.3f} ({timing['iqr'][name]:.3f}) | {overhead} |")
    machine = entry["machine"]
    return lines + ["", f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, load average "
                    f"{machine['load_average']}; {_versions(machine)}.", ""]


def _video_tables(entry: dict) -> list[str]:
    flops, timing, small = entry["flops"], entry["timing"], entry["time_flops"]
    (height, width), (time_height, time_width) = entry["size"], entry["time_size"]
    lines = ["## Pose control on a video denoising step (Stable Video Diffusion)", "",
             f"SVD-XT UNet (`UNetSpatioTemporalConditionModel`, the public config), one window of {entry['frames']} "
             "frames under classifier-free guidance (2 x frames rows), with the SVD-v2 release module attached as "
             "`controlnext video` attaches it: once per window for the frames (both halves see the same poses; the "
             "unconditional half gets scale 0), its timestep-free stem computed once per condition. The official "
             "pipeline runs the module on both halves (last column). With several windows the module keeps one "
             "condition's stem, so each window call pays the first-step figure. `controlnext bench --video`.", "",
             "| size | base step | with control | first step | module (once) | stem (once) | module on both halves |",
             "|---|---|---|---|---|---|---|"]
    for (h, w), f in (((height, width), flops), ((time_height, time_width), small)):
        lines.append(f"| {h}x{w}, {entry['frames'] if f is flops else entry['time_frames']} frames | "
                     f"{f['base'] / 1e12:.2f} TFLOP | {f['overhead']:+.2%} | {f['overhead_first_step']:+.2%} | "
                     f"{f['module'] / 1e9:.1f} GFLOP | {f['module_stem'] / 1e9:.1f} GFLOP | "
                     f"{f['overhead_both_halves']:+.2%} |")
    machine = entry["machine"]
    rounds = f"{timing['repeats']} rounds after {timing['warmup']} warm-up"
    lines += ["", f"CPU time (this process, random fp32 weights, {timing['threads']} torch thread(s), {rounds}) at "
              f"{time_height}x{time_width}, {entry['time_frames']} frames, medians:", "",
              "| base step | module call | module / base step | step with control |", "|---|---|---|---|",
              f"| {timing['median']['base']:.2f} s | {timing['median']['module']:.3f} s | {timing['module_share']:.2%} | "
              f"{timing['step_overhead']:+.2%} |", "",
              f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, load average {machine['load_average']}; "
              f"{_versions(machine)}.", ""]
    return lines


def _training_cost_table(entries: list[dict]) -> list[str]:
    lines = ["## Training cost", "",
             "One optimizer step (forward, backward, AdamW) of each method's recipe on the random-weight UNet, same "
             "batch, resolution and seed; each method in a fresh process. Memory: on a GPU torch's peak allocation; "
             "on a CPU the process's peak resident set, and beyond the built models (activations, gradients, "
             "optimizer state).", "",
             "| architecture | size | device | method | trainable | step, median (IQR) | peak memory | beyond the "
             "built models |", "|---|---|---|---|---|---|---|---|"]
    for entry in entries:
        for method, run in entry["methods"].items():
            lines.append(f"| {entry['architecture']} | {entry['resolution']} px, batch {entry['batch']} | "
                         f"{entry['device']} ({entry['threads']} thread(s)) | {METHOD_NAMES.get(method, method)} | "
                         f"{_m(run['trainable'])} | {run['median']:.2f} s ({run['iqr']:.2f}) | "
                         f"{run['peak_bytes'] / 2**30:.2f} GiB | {(run['peak_bytes'] - run['built_bytes']) / 2**30:.2f} "
                         "GiB |")
        if "time_ratio" in entry:
            lines.append(f"| | | | ControlNeXt / ControlNet | | {entry['time_ratio']:.0%} of the step time | | "
                         f"{entry['training_memory_ratio']:.0%} of the training memory |")
    machine_lines = [f"- {e['architecture']} {e['resolution']} px: {e['machine']['cpu']}, {e['machine']['cpu_count']} "
                     f"cores, load average {e['machine']['load_average']}; {e['steps']} timed steps after "
                     f"{e['warmup']} warm-up; {_versions(e['machine'])}." for e in entries if "machine" in e]
    return lines + ["", *machine_lines, ""]


def _convergence_tables(entries: dict) -> list[str]:
    from .convergence import MIN_GAIN

    lines = ["## Convergence on the shapes world", "",
             "Both methods trained by `controlnext train` on the embedded default model (entries named sd3-*: on "
             "the shapes-world SD3, the diffusion transformer) with the same data, batch, seed and number of steps; "
             "control fidelity measured at each validation on held-out scenes (the world's test split), sampled "
             "alike (same seeds, sampler steps and guidance). \"90% step\": the first "
             "validation at 90% of the final fidelity (mean of the last three validations). Plateau and rise: steps "
             "to 10% of the gain over the start, then from 10% to 90% of it; \"sudden\" when the plateau lasts at "
             "least twice the rise and more than one validation interval (ControlNet's sudden convergence); \"-\": the run "
             f"did not rise by {MIN_GAIN} over its start.", "",
             "| condition | metric | no control | method | trainable | start | final | 90% step | plateau | rise "
             "| sudden | steps/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, entry in entries.items():
        setup = entry["setup"]
        for method, run in entry["methods"].items():
            trainable = _m(run["trainable"]) if run.get("trainable") else "-"
            lines.append(f"| {label} | {setup['metric']} | {entry['uncontrolled']:.3f} | "
                         f"{METHOD_NAMES.get(method, method)} | {trainable} | {run['start']:.3f} | {run['final']:.3f} | "
                         + " | ".join("-" if run[key] is None else str(run[key])
                                      for key in ("steps_to_90", "plateau_steps", "rise_steps")) + " | "
                         f"{'yes' if run['sudden'] else 'no'} | {run['steps_per_second']:.2f} |")
    lines.append("")
    for label, entry in entries.items():
        setup, speedup = entry["setup"], entry.get("speedup_to_90")
        sd3 = label.startswith("sd3-")  # the transformer's weights, sampled with its flow-matching Euler
        verdict = ("target (at least 5x sooner) met" if speedup >= 5 else "target (at least 5x sooner) missed"
                   ) if speedup else "no speed-up could be computed"
        bar = entry.get("common_bar")
        reached = {m: run.get("steps_to_common_bar") for m, run in entry["methods"].items()}
        common = ("Common bar (90% of the better final fidelity, " + f"{bar:.3f}): " + ", ".join(
            f"{METHOD_NAMES.get(m, m)} at step {s}" if s is not None else
            f"{METHOD_NAMES.get(m, m)} not within {setup['steps']} steps" for m, s in reached.items()) + "."
                  ) if bar is not None else ""
        lines += [f"### {label}", "",
                  f"![fidelity against steps, {label}](benchmarks/convergence-{label}.png)", "",
                  "ControlNeXt reaches 90% of its final fidelity "
                  + (f"{speedup:.1f}x sooner than ControlNet: {verdict}." if speedup else f"- {verdict}.")
                  + (f" {common}" if common else ""),
                  f"Setup: {setup['steps']} steps of batch {setup['batch_size']} at {setup['resolution']} px; learning "
                  f"rate {setup['learning_rate']:g} (ControlNet, ControlNeXt's {'transformer' if sd3 else 'UNet'} "
                  "weights) and "
                  f"{setup['module_learning_rate']:g} (ControlNeXt's module); validation every "
                  f"{setup['validate_every']} steps on {setup['validation_count']} held-out scenes, "
                  f"{setup['sampling_steps']} {'Euler' if sd3 else 'DDIM'} steps, guidance {setup['guidance_scale']}, "
                  f"seed {setup['seed']}.",
                  "", "| step | " + " | ".join(METHOD_NAMES.get(m, m) for m in entry["methods"]) + " |",
                  "|---|" + "---|" * len(entry["methods"])]
        curves = {m: dict(run["curve"]) for m, run in entry["methods"].items()}
        for step in sorted(set().union(*curves.values())):
            lines.append(f"| {step} | " + " | ".join(f"{c[step]:.3f}" if step in c else "" for c in curves.values())
                         + " |")
        machine = entry["machine"]
        lines += ["", f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, {machine['date']}; "
                  f"{_versions(machine)}. Minutes: " + ", ".join(
                      f"{METHOD_NAMES.get(m, m)} {run['minutes']:.1f}" for m, run in entry["methods"].items()) + ".",
                  ""]
    return lines


def steps_text(value: float | None, steps: int) -> str:
    """A step count, or "not within N steps" for a mark not reached."""
    return f"not within {steps} steps" if value is None else f"{value:g}"


def ratio_text(ratio: dict | None) -> str:
    """A ratio of steps: "3.0x", "more than 3.0x" (a lower bound), or "no ratio"."""
    if ratio is None:
        return "no ratio"
    return ("more than " if ratio["lower_bound"] else "") + f"{ratio['value']:.1f}x"


def spread_text(spread: dict, steps: int | None = None) -> str:
    """Median and range over seeds: "150 (100-200)", steps not reached as "not within N steps"; fidelities
    (`steps` None) to three decimals."""
    def one(value):
        return f"{value:.3f}" if steps is None else steps_text(value, steps)

    if spread["min"] is None:
        return f"{one(None)} (all {spread['count']})"
    median = "not reached" if spread["median"] is None else one(spread["median"])
    if spread["count"] == 1:
        return median
    separator = " to " if spread["max"] is None else "-"
    return f"{median} ({one(spread['min'])}{separator}{one(spread['max'])})"


def _study_tables(entry: dict) -> list[str]:
    setup, machine = entry["setup"], entry["machine"]
    steps = setup["steps"]
    base = f"`{setup['base']}`" if setup["base"] else "the embedded default model"
    lines = [f"## Convergence study on the shapes world: {' and '.join(entry['recipes'])} recipes, {steps} steps", "",
             "Both methods trained by `controlnext train` under each recipe, with several training seeds (data order, "
             "noise, initial weights), on each condition kind; every run of a kind is validated on the same held-out "
             "scenes with the same sampling seed. Per run: the final fidelity (mean of the last three validations), "
             "the onset (the first validation at 10% of the run's final gain over its step-0 value), the 90% step "
             "(the first validation at 90% of its final fidelity) and whether the rise was sudden (the onset lasts "
             "more than one validation interval and at least twice the rise to 90% of the gain). Cells: the median "
             f"over the seeds (range); a seed that never reaches a mark counts as later than every step (\"not "
             f"within {steps} steps\"), so the median is \"not reached\" when more than half the seeds miss it (half "
             "of an even count). Common bar: 90% of the better method's median final fidelity. Ratios: ControlNet's "
             "median steps over ControlNeXt's, \"more than\" when ControlNet's median is not reached (a lower bound). "
             f"The claim \"ControlNeXt converges at least {entry['target_speedup']}x sooner\" is judged at the common "
             "bar, which a run that never rises cannot pass.", "",
             f"Setup: {steps} steps of batch {setup['batch_size']} at {setup['resolution']} px on {base}; validation "
             f"every {setup['validate_every']} steps on {setup['validation_count']} held-out scenes, "
             f"{setup['sampling_steps']} DDIM steps, guidance {setup['guidance_scale']}, sampling seed "
             f"{setup['validation_seed']}; training seeds {', '.join(map(str, setup['seeds']))}; "
             f"{setup['jobs']} run(s) at once, {setup['threads'] or 'default'} torch thread(s) each. Machine: "
             f"{machine['cpu']}, {machine['cpu_count']} cores, {machine['date']}; {_versions(machine)}.", "",
             "Recipes (AdamW):", ""]
    lines += [f"- `{name}`: {description}." for name, description in entry["recipes"].items()]
    for kind, data in entry["kinds"].items():
        lines += ["", f"### {kind} ({data['metric']}; no control {data['uncontrolled']:.3f})", "",
                  "| recipe | method | trainable | final, median (range) | onset, median (range) "
                  "| 90% step, median (range) | sudden | steps/s |", "|---|---|---|---|---|---|---|---|"]
        for recipe, compared in data["recipes"].items():
            for method, run in compared["methods"].items():
                lines.append(f"| {recipe} | {METHOD_NAMES.get(method, method)} | {_m(run['trainable'])} | "
                             f"{spread_text(run['final'])} | {spread_text(run['onset'], steps)} | "
                             f"{spread_text(run['steps_to_90'], steps)} | {run['sudden']} of {len(run['runs'])} | "
                             f"{run['steps_per_second']:.2f} |")
        lines.append("")
        for recipe, compared in data["recipes"].items():
            bar = ", ".join(f"{METHOD_NAMES.get(m, m)} {spread_text(run['steps_to_common_bar'], steps)}"
                            for m, run in compared["methods"].items())
            ratios = "; ".join(f"{ratio_text(compared[f'ratio_{mark}'])} to {what}" for mark, what in (
                ("steps_to_90", "90% of the own final"), ("onset", "the onset"),
                ("steps_to_common_bar", "the common bar")) if f"ratio_{mark}" in compared)
            lines += [f"- `{recipe}`: " + (f"ControlNet's median steps over ControlNeXt's: {ratios}. " if ratios
                                           else "") + f"Steps to the common bar ({compared['common_bar']:.3f}): {bar}.",
                      f"  {compared['sentence']}"]
        lines += ["", f"![fidelity against steps, {kind}, every seed](benchmarks/{study_plot_name(entry, kind)})"]
    return lines + [""]


def _summary(runs: list[dict]) -> list[str]:
    """One row per resolution: each method's overhead by FLOPs, by CPU time of the step, and of its model alone."""
    lines = ["| resolution | ControlNeXt: FLOPs | step (CPU time) | module alone | ControlNet: FLOPs | step (CPU time) "
             "| model alone |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        timing = run["timing"]["cpu"]
        cells = []
        for method in ("controlnext", "controlnet"):
            cells += [f"+{run['overhead'][method]:.1%}", f"{timing['overhead'][method]:+.1%}",
                      f"+{timing['overhead'][method + '_module']:.1%}"]
        lines.append(f"| {run['resolution']} px | " + " | ".join(cells) + " |")
    return lines + ["", "Papers (GPU, SD1.5): ControlNet +41.9%, ControlNeXt +10.4% (run on both CFG halves). "
                    "Target here: ControlNeXt at most +5% at 512 px under CFG.", ""]


def _overhead_tables(runs: list[dict]) -> list[str]:
    lines = ["## Inference overhead of one denoising step", "",
             "SD1.5 UNet architecture, classifier-free guidance (UNet batch 2, one condition image), "
             "`torch.inference_mode`. ControlNeXt (the SD1.5 release layout, added after `down_blocks[0]`) runs "
             "once per condition for both CFG halves; its timestep-free stem is computed on a generation's first "
             "step and reused after (\"first step\" drops that cache before the step). ControlNet runs on both "
             "halves, as diffusers' pipelines do. Details of each measure below.", "",
             *_summary(runs),
             "### FLOPs (torch.utils.flop_counter, independent of the machine)", "",
             "| resolution | base | " + " | ".join(METHODS.values()) + " | ControlNeXt stem (once) |",
             "|---|---|" + "---|" * len(METHODS) + "---|"]
    for run in runs:
        flops = run["flops"]
        cells = [f"{flops[m] / 1e9:.1f} G (+{run['overhead'][m]:.1%})" for m in METHODS]
        lines.append(f"| {run['resolution']} px (latent {run['latent']}) | {flops['base'] / 1e9:.1f} G | "
                     + " | ".join(cells) + f" | {flops['controlnext_precompute'] / 1e9:.1f} G |")
    lines += ["", "### Time on CPU", "",
              "Configurations timed interleaved in each round (base, ControlNeXt, ControlNeXt first step, "
              "ControlNet, base, ...). Overhead: the median over rounds of (step / base step of the same round) - 1, "
              "its interquartile range (IQR), and the fastest step over the fastest base step. Wall-clock time "
              "includes waiting for a core on this shared machine; CPU time (this process's) counts only the "
              "step's own work.", "",
              "| resolution | clock | threads | rounds (+warm-up) | base step, median (IQR) | "
              + " | ".join(f"{label} overhead" for label in METHODS.values()) + " | ControlNeXt stem (once) |",
              "|---|---|---|---|---|" + "---|" * len(METHODS) + "---|"]
    for run in runs:
        for clock, timing in run["timing"].items():
            cells = [f"{timing['overhead'][m]:+.1%} (IQR {timing['overhead_iqr'][m]:.1%}; fastest "
                     f"{timing['fastest_overhead'][m]:+.1%})" for m in METHODS]
            lines.append(
                f"| {run['resolution']} px | {clock} | {run['threads']} | {run['repeats']} (+{run['warmup']}) | "
                f"{timing['median']['base']:.2f} s ({timing['iqr']['base']:.2f}) | " + " | ".join(cells)
                + f" | {timing['precompute']:.2f} s |")
    lines += ["", "### The control models alone", "",
              "Each round also times the control model's own call as the attachment makes it (ControlNeXt once per "
              "condition with its stem cached, ControlNet on the CFG batch): a share of the base step that the "
              "UNet's run-to-run noise does not blur.", "",
              "| resolution | clock | ControlNeXt module, median (IQR) | share of a base step | ControlNet, median (IQR) "
              "| share of a base step |", "|---|---|---|---|---|---|"]
    for run in runs:
        for clock, timing in run["timing"].items():
            cells = [f"{timing['median'][m]:.3f} s ({timing['iqr'][m]:.3f}) | {timing['overhead'][m]:.1%} "
                     f"(IQR {timing['overhead_iqr'][m]:.1%})" for m in ("controlnext_module", "controlnet_module")]
            lines.append(f"| {run['resolution']} px | {clock} | " + " | ".join(cells) + " |")
    lines += ["", "### Machines", ""]
    for run in runs:
        machine = run["machine"]
        versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        lines.append(f"- {run['resolution']} px, {machine['date']}: {machine['cpu']}, {machine['cpu_count']} cores, "
                     f"{run['threads']} torch threads, load average {machine['load_average']} at the start and "
                     f"{machine.get('load_average_after', '?')} at the end (the machine is shared with other work); "
                     f"Python {machine['python']}, {versions}.")
    return lines + [""]


def _sd3_tables(entries: dict, cpu: dict | None) -> list[str]:
    lines = ["## SD3: the diffusion transformer", "",
             "Built from the published transformer configs on the meta device (`controlnext.bench.sd3`). "
             "ControlNeXt: the v2-layout module with its output at the transformer's width, added to the image "
             "tokens after the patch embedding, plus the `sd3` preset of the transformer's weights (every joint "
             "block's attention output projections `attn.to_out.0` and `attn.to_add_out`), which replace base "
             "weights. ControlNet: diffusers' `SD3ControlNetModel` copying half the joint blocks (diffusers' default "
             "for SD3-medium), its residuals passed through `block_controlnet_hidden_states`.", "",
             "| base | method | trainable | added at inference |", "|---|---|---|---|"]
    for name, entry in entries.items():
        cnx, cn = entry["controlnext"], entry["controlnet"]
        pattern = cnx["trained_pattern"].replace("|", "\\|")  # a table cell
        lines.append(f"| {name} | (the base transformer has {_m(entry['base_transformer'])}) | - | - |")
        lines.append(f"| {name} | ControlNeXt: module {_m(cnx['module'])} + transformer `{pattern}` "
                     f"{_m(cnx['trained_transformer'])} | {_m(cnx['trainable'])} "
                     f"({cnx['trainable'] / cn['trainable']:.1%} of ControlNet's) | {_m(cnx['added'])} |")
        lines.append(f"| {name} | ControlNet ({cn['layers']} blocks) | {_m(cn['trainable'])} | {_m(cn['added'])} |")
    lines += ["", "FLOPs of one denoising step under classifier-free guidance (torch's flop counter: matrix "
              "products and convolutions), one image, both CLIPs' and T5's 333 text tokens. ControlNeXt's module "
              "runs once per condition (both guidance halves see the same condition) and its timestep-free part "
              "once per generation; ControlNet reads the prompt, so it runs on both halves.", "",
              "| base | px | base step | ControlNeXt | ControlNeXt, first step | ControlNet |", "|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        over = entry["overhead"]
        lines.append(f"| {name} | {entry['resolution']} | {entry['flops']['base'] / 1e12:.1f} TFLOP | "
                     f"{over['controlnext']:+.2%} | {over['controlnext_first_step']:+.2%} | {over['controlnet']:+.1%} |")
    if cpu:
        share, full = cpu["share"], cpu["share_full_depth"]
        lines += ["", f"CPU time of the models alone ({cpu['architecture']}'s width with its first {cpu['layers']} of "
                  f"{cpu['full_layers']} joint blocks, the ControlNet copying half of them; random {cpu['dtype']} "
                  f"weights, {cpu['resolution']} px, {cpu['text_tokens']} text tokens (no T5), one image under CFG, "
                  f"{cpu['threads']} thread, CPU seconds, medians of {len(cpu['seconds']['base'])} interleaved rounds): "
                  f"a base step {cpu['median']['base']:.2f} s; the ControlNeXt module "
                  f"{cpu['median']['controlnext_module']:.3f} s ({share['controlnext']:.1%} of it); the ControlNet "
                  f"{cpu['median']['controlnet_model']:.2f} s ({share['controlnet']:.1%}). At the full depth (the "
                  f"transformer and the ControlNet scaled by their blocks): ControlNeXt {full['controlnext']:.2%}, "
                  f"ControlNet {full['controlnet']:.1%} of a base step."]
    return lines + [""]


def _m(count: int) -> str:
    return f"{count / 1e6:.2f}M"
