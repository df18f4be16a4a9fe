"""Convergence: train ControlNeXt and ControlNet on the shapes world with the same budget, data and seed,
and follow control fidelity on held-out conditions against steps.

Both runs go through `controlnext.training.train`, the same loop users run; fidelity is measured at
every validation on the first `validation_count` scenes of the world's test split (edge F1 for edges
and outlines, mask IoU for masks), sampled with the same seed, sampler and guidance for both methods.
The uncontrolled floor is the same base model sampling the same prompts without any control.

One comparison (`run_convergence`) trains each method once, with one seed and one pair of learning rates.
The study (`run_study`) repeats it under several recipes (`RECIPES`), training seeds and condition kinds,
each run in its own folder with its own result file, and reports medians and ranges over the seeds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from ..errors import ControlNextError
from ..evaluation import CONTROL_METRICS, SCORED_AGAINST, held_out

METHODS = ("controlnext", "controlnet")
# condition kinds that training's validation can score: against the condition itself
KINDS = tuple(kind for kind in CONTROL_METRICS if kind not in SCORED_AGAINST)


@dataclass
class ConvergenceSetup:
    """One comparison: both methods trained alike on one condition kind of the shapes world."""

    base: str | None = None  # None: the embedded default model
    kind: str = "canny"
    steps: int = 600
    validate_every: int = 25
    batch_size: int = 16
    resolution: int = 64
    learning_rate: float = 1e-4  # ControlNet's weights and ControlNeXt's selected UNet weights
    module_learning_rate: float = 1e-3  # ControlNeXt's module (its recipe: 10x the base rate)
    module_config: str | None = None  # ControlNeXt module sizes (JSON); None: the trainer's default
    validation_count: int = 16
    sampling_steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    validation_seed: int | None = None  # the validation images' initial noise; None: `seed`
    methods: tuple[str, ...] = METHODS
    extra: dict = field(default_factory=dict)  # further TrainConfig fields for both runs

    @property
    def label(self) -> str:
        """The kind, after "sd3-" on an SD3 base and before the learning rates where they are not the defaults:
        one results entry per label."""
        default = ConvergenceSetup()
        rates = (self.learning_rate, self.module_learning_rate)
        label = f"sd3-{self.kind}" if _is_sd3_folder(self.base) else self.kind
        if rates == (default.learning_rate, default.module_learning_rate):
            return label
        return f"{label}-lr{self.learning_rate:g}-{self.module_learning_rate:g}"

    @property
    def sampling_seed(self) -> int:
        """The seed of the validation images' initial noise, the floor's included."""
        return self.seed if self.validation_seed is None else self.validation_seed

    @property
    def metric(self) -> str:
        if self.kind not in KINDS:
            raise ControlNextError(f"unknown condition kind {self.kind!r}; pick one of {', '.join(KINDS)}")
        return CONTROL_METRICS[self.kind]


def _is_sd3_folder(base: str | None) -> bool:
    index = Path(base) / "model_index.json" if base else None
    return bool(index and index.is_file() and "StableDiffusion3" in json.loads(index.read_text()).get("_class_name", ""))


def write_validation_conditions(folder: Path, kind: str, count: int, resolution: int) -> tuple[list[str], list[str]]:
    """The first `count` held-out scenes' conditions as PNG files, and their captions."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, prompts = [], []
    for index, sample in enumerate(held_out(count, kind, resolution)):
        path = folder / f"{kind}-{index:03d}.png"
        sample.conditions[kind].save(path)
        paths.append(str(path))
        prompts.append(sample.caption)
    return paths, prompts


def training_config(setup: ConvergenceSetup, method: str, output: Path, images: list[str], prompts: list[str]):
    """The TrainConfig of one method's run: everything but the method's own recipe is shared."""
    from ..training.config import TrainConfig

    recipe = {
        "controlnext": dict(trainable=["auto"], learning_rate=setup.learning_rate,
                            module_learning_rate=setup.module_learning_rate, module_config=setup.module_config),
        "controlnet": dict(trainable=["none"], module_learning_rate=setup.learning_rate),
    }
    if method not in recipe:
        raise ControlNextError(f"unknown method {method!r}; pick from {', '.join(recipe)}")
    return TrainConfig(
        base=setup.base or "", method=method, data=f"shapes-{setup.kind}", resolution=setup.resolution,
        max_steps=setup.steps, batch_size=setup.batch_size, seed=setup.seed, validation_seed=setup.sampling_seed,
        output_dir=str(output),
        checkpoint_every=0, keep_checkpoints=1, validation_every=setup.validate_every, validation_images=images,
        validation_prompts=prompts, validation_sampling_steps=setup.sampling_steps,
        guidance_scale=setup.guidance_scale, validation_metric=setup.metric, tensorboard=False,
        progress_bar=False, **recipe[method], **setup.extra,
    )


def read_curve(log_path: Path, metric: str) -> tuple[list[tuple[int, float]], float]:
    """(step, fidelity) at each validation, and the median training speed in steps per second."""
    curve, speeds = [], []
    with open(log_path, newline="") as file:
        for row in csv.DictReader(file):
            if row.get(f"fidelity_{metric}"):
                curve.append((int(row["step"]), float(row[f"fidelity_{metric}"])))
            if row.get("steps_per_second"):
                speeds.append(float(row["steps_per_second"]))
    speeds.sort()
    return curve, speeds[len(speeds) // 2] if speeds else 0.0


def first_step(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """The first validation step at which fidelity reaches `threshold` (None: not within the curve)."""
    return next((step for step, value in curve if value >= threshold), None)


MIN_GAIN = 0.02  # a run whose final fidelity is less than this above its start did not rise (validation noise)


def summarize(curve: list[tuple[int, float]], tail: int = 3, min_gain: float = MIN_GAIN) -> dict:
    """Final fidelity (mean of the last `tail` validations), steps to 90% of it, and how sudden the rise was.

    The rise is measured on the gain over the step-0 value: "plateau" is the step where 10% of the final
    gain is first reached, "rise" the steps from there to 90% of the gain. A curve is called sudden
    (ControlNet's "sudden convergence", Zhang et al., Sec. 4.1) when its plateau outlasts the first
    validation interval and lasts at least twice as long as its rise (a rise within one interval counting
    as one interval). A run that gained less than `min_gain` did not rise: it has no plateau, no 90% step (it
    would sit at 90% of its own flat final from step 0) and no sudden rise.
    """
    if not curve:
        raise ControlNextError("no validation points to summarize; validate more often than the run is long")
    steps = [step for step, _ in curve]
    values = [value for _, value in curve]
    final = sum(values[-tail:]) / len(values[-tail:])
    start = values[0]

    to_90 = first_step(curve, 0.9 * final)
    gain = final - start
    above = [(step, value) for step, value in curve if value > start]  # a gain, whatever the rounding of `final`
    plateau = first_step(above, start + 0.1 * gain) if gain > 0 else None
    gain_90 = first_step(above, start + 0.9 * gain) if gain > 0 else None
    rise = gain_90 - plateau if plateau is not None and gain_90 is not None else None
    interval = steps[1] - steps[0] if len(steps) > 1 else 1
    sudden = bool(plateau is not None and rise is not None and plateau > interval and plateau >= 2 * max(rise, interval))
    if gain < min_gain:
        to_90 = plateau = rise = None
        sudden = False
    return {"start": start, "final": final, "steps_to_90": to_90, "plateau_steps": plateau, "rise_steps": rise,
            "sudden": sudden, "last_step": steps[-1]}


@torch.no_grad()
def uncontrolled_fidelity(setup: ConvergenceSetup, images: list[str], prompts: list[str]) -> float:
    """The floor: the base model alone, same prompts, seed, sampler and guidance, scored against the conditions."""
    from ..images import load_image, prepare_condition
    from ..training.base import load_training_base
    from ..training.validation import fidelity, generate, resolve_metric

    base = load_training_base(setup.base)
    conditions = torch.stack([prepare_condition(load_image(p), setup.resolution, setup.resolution) for p in images])
    generated = generate(base, None, conditions, prompts, steps=setup.sampling_steps,
                         guidance_scale=setup.guidance_scale, seed=setup.sampling_seed)
    return fidelity(resolve_metric(setup.metric), conditions, generated)


def train_method(setup: ConvergenceSetup, method: str, output: Path, images: list[str], prompts: list[str]) -> dict:
    """Train one method afresh into `output` (this process): its fidelity curve, speed, minutes and trainable
    parameters."""
    from ..training.trainer import Trainer

    shutil.rmtree(output, ignore_errors=True)  # a benchmark run starts afresh; the folder is its own
    started = time.time()
    trainer = Trainer(training_config(setup, method, output, images, prompts))
    trainable = sum(parameter.numel() for parameter in trainer.trainable)
    trainer.run()
    curve, speed = read_curve(output / "log.csv", setup.metric)
    return {"curve": curve, "steps_per_second": speed, "minutes": (time.time() - started) / 60,
            "trainable": trainable, "output": str(output)}


def run_convergence(setup: ConvergenceSetup, work_dir: str | Path, log=print) -> dict:
    """Train each method, read its fidelity curve, and compare; the trained controls stay in `work_dir`."""
    from .report import machine_info

    work_dir = Path(work_dir)
    images, prompts = write_validation_conditions(work_dir / "validation_conditions", setup.kind,
                                                  setup.validation_count, setup.resolution)
    result = {"setup": {**asdict(setup), "metric": setup.metric, "label": setup.label}, "machine": machine_info(), "methods": {}}
    result["uncontrolled"] = uncontrolled_fidelity(setup, images, prompts)
    log(f"{setup.kind}: uncontrolled {setup.metric} {result['uncontrolled']:.3f}")
    for method in setup.methods:
        output = work_dir / f"{setup.label}-{method}"
        log(f"{setup.kind}: training {method} for {setup.steps} steps into {output}")
        run = train_method(setup, method, output, images, prompts)
        summary = summarize(run["curve"])
        result["methods"][method] = {**run, **summary}
        rose = (f"90% of it at step {summary['steps_to_90']}" if summary["steps_to_90"] is not None
                else f"not rising by {MIN_GAIN} over its start")
        log(f"{setup.kind}: {method} final {setup.metric} {summary['final']:.3f}, {rose}, sudden: {summary['sudden']}")
    return compare(result)


def compare(result: dict) -> dict:
    """Add the comparisons of both methods to a convergence result (from its curves alone).

    speedup_to_90: ControlNet's steps to 90% of its own final fidelity over ControlNeXt's. A run that has
    not converged within the budget has a low "final" value, which flatters it, so a common bar is also
    reported: 90% of the better final fidelity, and the steps each method needs to reach it (None: not
    within the budget).
    """
    methods = result["methods"]
    if {"controlnext", "controlnet"} <= set(methods):
        fast, slow = methods["controlnext"]["steps_to_90"], methods["controlnet"]["steps_to_90"]
        result["speedup_to_90"] = (slow / max(fast, 1)) if fast is not None and slow is not None else None
    bar = 0.9 * max(run["final"] for run in methods.values())
    result["common_bar"] = bar
    for run in methods.values():
        run["steps_to_common_bar"] = first_step(run["curve"], bar)
    return result


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", "bench") from None
    return plt


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    _pyplot().close(figure)
    return path


def plot_curves(result: dict, path: str | Path) -> Path:
    """Fidelity against steps for each method, with the uncontrolled floor, as a PNG."""
    from .report import METHOD_NAMES

    plt = _pyplot()

    setup = result["setup"]
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=110)
    for method, entry in result["methods"].items():
        steps, values = zip(*entry["curve"])
        axes.plot(steps, values, marker="o", markersize=3, label=METHOD_NAMES.get(method, method))
        if entry["steps_to_90"] is not None:
            axes.axvline(entry["steps_to_90"], linestyle=":", color=axes.lines[-1].get_color(), linewidth=1)
    axes.axhline(result["uncontrolled"], color="grey", linestyle="--", linewidth=1, label="no control")
    axes.set_xlabel("training steps (batch %d)" % setup["batch_size"])
    axes.set_ylabel(setup["metric"].replace("_", " "))
    axes.set_title(f"shapes world, {setup['kind']} condition, {setup['validation_count']} held-out scenes")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _save(figure, path)


# -- the study: both methods under several recipes, training seeds and condition kinds ----------------------------

TARGET_SPEEDUP = 5  # the claim put to the test: ControlNeXt converges at least 5x sooner than ControlNet
RESULT_FILE = "result.json"  # a finished run's result, written last into its folder
LARGE_FILE = 64 * 2**20  # weight files of at least this many bytes are deleted once a run is finished


@dataclass(frozen=True)
class Recipe:
    """A training recipe's AdamW rates: `learning_rate` for ControlNet's copy and ControlNeXt's selected UNet
    weights, `module_learning_rate` for ControlNeXt's module."""

    learning_rate: float
    module_learning_rate: float
    description: str


RECIPES = {
    "paper": Recipe(1e-5, 1e-4, "each paper's own: ControlNet 1e-5 on its copy (zero convolutions); ControlNeXt 1e-5 "
                    "on its selected UNet weights and 1e-4 on its module"),
    "common": Recipe(1e-3, 1e-3, "one common rate for every trainable weight: 1e-3 on ControlNet's copy, ControlNeXt's "
                     "module and its UNet weights alike"),
}


@dataclass
class ConvergenceStudy:
    """Both methods under several recipes (`RECIPES`), training seeds and condition kinds of the shapes world.

    Every run of a kind validates on the same held-out scenes with the same sampling seed, so that runs differ
    by recipe, method and training seed alone."""

    base: str | None = None  # None: the embedded default model
    kinds: tuple[str, ...] = ("canny", "mask")
    recipes: tuple[str, ...] = ("paper", "common")
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds: data order, noise, initial weights
    methods: tuple[str, ...] = METHODS
    steps: int = 600
    batch_size: int = 16
    validate_every: int = 25
    validation_count: int = 16
    sampling_steps: int = 20
    guidance_scale: float = 5.0
    resolution: int | None = None  # None: the base's own size
    validation_seed: int = 0
    module_config: str | None = None  # ControlNeXt module sizes (JSON); None: the trainer's default
    jobs: int = 1  # runs trained at once, each in its own process
    threads: int | None = 1  # torch threads of each run (None: torch's default)
    examples: int = 4000  # training scenes: the first N of the world's train split, drawn from by every run
    latent_cache: bool = True  # encode each scene once for all runs (work_dir/latent-cache; same draws as encoding)
    extra: dict = field(default_factory=dict)  # further TrainConfig fields for every run

    def check(self) -> ConvergenceStudy:
        """Raise a one-line ControlNextError for values that cannot work."""
        for name in ("steps", "batch_size", "validate_every", "validation_count", "sampling_steps", "jobs", "examples"):
            if getattr(self, name) <= 0:
                raise ControlNextError(f"--{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        if self.threads is not None and self.threads <= 0:
            raise ControlNextError(f"--threads must be positive, not {self.threads}")
        known = {"kinds": KINDS, "recipes": tuple(RECIPES), "methods": METHODS}
        for name, choices in known.items():
            for value in getattr(self, name):
                if value not in choices:
                    raise ControlNextError(f"unknown {name[:-1]} {value!r}; pick from {', '.join(choices)}")
        for name in ("kinds", "recipes", "seeds", "methods"):
            values = list(getattr(self, name))
            if not values or len(set(values)) != len(values):
                raise ControlNextError(f"the study's {name} must be at least one, each named once, not {values}")
        return self

    def sharing(self, work_dir: Path) -> ConvergenceStudy:
        """The study with what every run shares among the TrainConfig fields: its training scenes and, when on,
        the latent cache in `work_dir`."""
        shared = {"generated_examples": self.examples,
                  **({"latent_cache": str(Path(work_dir) / "latent-cache")} if self.latent_cache else {})}
        return replace(self, extra={**shared, **self.extra})

    def setup(self, kind: str, recipe: str, seed: int, resolution: int) -> ConvergenceSetup:
        """The setup each method of one (kind, recipe, seed) trains with, as a single comparison would."""
        rates = RECIPES[recipe]
        return ConvergenceSetup(
            base=self.base, kind=kind, steps=self.steps, validate_every=self.validate_every,
            batch_size=self.batch_size, resolution=resolution, learning_rate=rates.learning_rate,
            module_learning_rate=rates.module_learning_rate, module_config=self.module_config,
            validation_count=self.validation_count, sampling_steps=self.sampling_steps,
            guidance_scale=self.guidance_scale, seed=seed, validation_seed=self.validation_seed, methods=self.methods,
            extra=dict(self.extra))


@dataclass
class StudyRun:
    """One run of the study: a method trained under a recipe with a training seed on a condition kind."""

    kind: str
    recipe: str
    method: str
    seed: int
    setup: ConvergenceSetup
    output: str
    images: list[str]
    prompts: list[str]
    base_digest: str
    threads: int | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.recipe}/{self.method}/seed {self.seed}"

    def key(self) -> dict:
        """What the run's result depends on: its training configuration (but where it is written and where the
        validation conditions lie) and the base model's files."""
        config = asdict(training_config(self.setup, self.method, Path(self.output), self.images, self.prompts))
        for name in ("output_dir", "validation_images"):
            config.pop(name)
        key = {**config, "validation_conditions": [Path(path).name for path in self.images],
               "base_digest": self.base_digest}
        return json.loads(json.dumps(key))  # as a result file stores it


def base_resolution(base: str | None) -> int:
    """The image size a base model generates at: its denoiser's sample size times the VAE's scale factor."""
    from ..training.base import load_training_base

    model = load_training_base(base)
    return model.unet.config.sample_size * model.pipe.vae_scale_factor


def base_digest(base: str | None) -> str:
    """A hash of the base model's files (the embedded default's for None; a model id in the cache: its name), so
    that finished runs count only for the same weights."""
    from ..request import DEFAULT_BASE

    path = Path(base) if base else DEFAULT_BASE
    if not path.exists():
        return str(base)
    root = path if path.is_dir() else path.parent
    digest = hashlib.sha256()
    for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def run_summary(curve: list[tuple[int, float]], min_gain: float = MIN_GAIN) -> dict:
    """`summarize` with its plateau named "onset": the first validation at 10% of the run's final gain over its
    step-0 value, where fidelity has risen above the noise between the floor and the start (None: the run did
    not rise by `min_gain`)."""
    summary = summarize(curve, min_gain=min_gain)
    summary["onset"] = summary.pop("plateau_steps")
    return summary


def delete_large_files(folder: Path, limit: int = LARGE_FILE) -> list[str]:
    """Delete the weight files of at least `limit` bytes under `folder` (the trained control, its checkpoint);
    the log and the small files stay. Returns the deleted files, relative to `folder`."""
    from ..control.loading import PICKLE_SUFFIXES

    deleted = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", *PICKLE_SUFFIXES) and path.stat().st_size >= limit:
            path.unlink()
            deleted.append(str(path.relative_to(folder)))
    return deleted


def train_run(run: StudyRun) -> dict:
    """Train one run in this process with `run.threads` torch threads, delete its large weight files and write its
    result file (curve, speed, minutes, trainable parameters, summary) last into its folder."""
    if run.threads:
        torch.set_num_threads(run.threads)
    output = Path(run.output)
    trained = train_method(run.setup, run.method, output, run.images, run.prompts)
    result = {"key": run.key(), "kind": run.kind, "recipe": run.recipe, "method": run.method, "seed": run.seed,
              **trained, "summary": run_summary(trained["curve"]), "deleted": delete_large_files(output)}
    text = json.dumps(result, indent=1)
    partial = output / f"{RESULT_FILE}.partial"
    partial.write_text(text)
    os.replace(partial, output / RESULT_FILE)
    return json.loads(text)  # as a rerun reads it


def finished_result(run: StudyRun) -> dict | None:
    """The run's result file if it exists and was made with the run's configuration, else None."""
    try:
        result = json.loads((Path(run.output) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if result.get("key") != run.key():
        return None
    return {**result, "summary": run_summary([tuple(point) for point in result["curve"]])}  # today's rules


def train_runs(runs: list[StudyRun], jobs: int, log=print) -> list[dict]:
    """Each run's result, in order: a finished run's from its result file, the others trained, `jobs` at once in
    their own (spawned) processes. When a run fails the runs under way finish, the queued ones are dropped, and
    the error is raised: a rerun continues from the finished runs."""
    results = [finished_result(run) for run in runs]
    pending = [index for index, result in enumerate(results) if result is None]
    for run, result in zip(runs, results):
        if result is not None:
            log(f"{run.name}: finished before with this configuration ({Path(run.output) / RESULT_FILE}), skipped")

    def finish(index: int, result: dict) -> None:
        results[index], summary = result, result["summary"]
        log(f"{runs[index].name}: final {summary['final']:.3f}, onset {summary['onset']}, 90% at "
            f"{summary['steps_to_90']}, sudden: {summary['sudden']} ({result['minutes']:.1f} min; "
            f"{sum(r is not None for r in results)} of {len(runs)} runs done)")

    if jobs == 1:
        for index in pending:
            log(f"{runs[index].name}: training {runs[index].setup.steps} steps into {runs[index].output}")
            finish(index, train_run(runs[index]))
        return results
    if pending:
        log(f"training {len(pending)} runs, {jobs} at once")
        with ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(train_run, runs[index]): index for index in pending}
            try:
                for future in as_completed(futures):
                    if future.exception() is not None:
                        log(f"{runs[futures[future]].name}: failed; the runs under way finish first")
                    finish(futures[future], future.result())
            except BaseException:  # a failed run or an interruption: the queued runs are dropped
                pool.shutdown(cancel_futures=True)
                raise
    return results


def kind_floor(study: ConvergenceStudy, kind: str, resolution: int, digest: str, images: list[str],
               prompts: list[str], folder: Path) -> float:
    """The uncontrolled floor of one kind: computed once, kept in `folder` for reruns of the same validation."""
    setup = study.setup(kind, study.recipes[0], study.seeds[0], resolution)
    key = {"base_digest": digest, "kind": kind, "resolution": resolution, "prompts": prompts,
           "sampling_steps": study.sampling_steps, "guidance_scale": study.guidance_scale,
           "validation_seed": study.validation_seed}
    path = folder / "uncontrolled.json"
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return stored["uncontrolled"]
    except (OSError, ValueError, KeyError):
        pass
    floor = uncontrolled_fidelity(setup, images, prompts)
    path.write_text(json.dumps({"key": key, "uncontrolled": floor}))
    return floor


def plan_runs(study: ConvergenceStudy, kind: str, resolution: int, digest: str, images: list[str],
              prompts: list[str], folder: Path) -> list[StudyRun]:
    """Every (recipe, method, seed) run of one kind, each in its own folder under `folder` (named by the recipe and
    the steps too, so that studies of other lengths in the same work folder keep their runs)."""
    return [StudyRun(kind, recipe, method, seed, study.setup(kind, recipe, seed, resolution),
                     str(folder / f"{recipe}-{study.steps}" / f"{method}-seed{seed}"), images, prompts, digest,
                     study.threads)
            for recipe in study.recipes for method in study.methods for seed in study.seeds]


def run_study(study: ConvergenceStudy, work_dir: str | Path, log=print) -> dict:
    """Train every (kind, recipe, method, seed) run not finished before into `work_dir` and aggregate over the
    seeds (`aggregate_recipe`)."""
    from .report import machine_info

    study.check()
    work_dir = Path(work_dir)
    study = study.sharing(work_dir)
    resolution = study.resolution or base_resolution(study.base)
    digest = base_digest(study.base)
    floors, runs = {}, []
    for kind in study.kinds:
        images, prompts = write_validation_conditions(work_dir / kind / "validation_conditions", kind,
                                                      study.validation_count, resolution)
        floors[kind] = kind_floor(study, kind, resolution, digest, images, prompts, work_dir / kind)
        log(f"{kind}: uncontrolled {CONTROL_METRICS[kind]} {floors[kind]:.3f}")
        runs += plan_runs(study, kind, resolution, digest, images, prompts, work_dir / kind)
    results = train_runs(runs, study.jobs, log)
    result = {"setup": {**asdict(study), "resolution": resolution, "base_digest": digest},
              "recipes": {name: RECIPES[name].description for name in study.recipes}, "target_speedup": TARGET_SPEEDUP,
              "machine": {**machine_info(), "jobs": study.jobs, "threads": study.threads}, "kinds": {}}
    for kind in study.kinds:
        result["kinds"][kind] = {"metric": CONTROL_METRICS[kind], "uncontrolled": floors[kind], "recipes": {
            recipe: aggregate_recipe(kind, recipe, {method: [r for r in results if (r["kind"], r["recipe"], r["method"])
                                                             == (kind, recipe, method)] for method in study.methods},
                                     study.steps, floors[kind])
            for recipe in study.recipes}}
    return result


# -- aggregation over the seeds -------------------------------------------------------------------------------------

def spread(values: list[float | None]) -> dict:
    """Median, least and greatest of per-seed values. None (a mark never reached within the run) counts as later
    than any step, so the median is None ("not reached") when it falls on such values: more than half of an odd
    count, half or more of an even one."""
    missing = sum(value is None for value in values)
    ordered = sorted(value for value in values if value is not None) + [None] * missing
    count = len(ordered)
    middle = (ordered[(count - 1) // 2], ordered[count // 2])
    median = None if None in middle else (middle[0] + middle[1]) / 2
    return {"median": median, "min": ordered[0], "max": ordered[-1], "not_reached": missing, "count": count}


def aggregate_method(runs: list[dict]) -> dict:
    """One method's runs (one per seed) under one recipe: median and range of the final fidelity, onset and 90%
    step, the count of sudden runs, the median speed; the runs' curves and summaries."""
    summaries = [run["summary"] for run in runs]
    return {
        "seeds": [run["seed"] for run in runs], "trainable": runs[0]["trainable"],
        "final": spread([s["final"] for s in summaries]), "onset": spread([s["onset"] for s in summaries]),
        "steps_to_90": spread([s["steps_to_90"] for s in summaries]), "sudden": sum(s["sudden"] for s in summaries),
        "steps_per_second": spread([run["steps_per_second"] for run in runs])["median"],
        "minutes": sum(run["minutes"] for run in runs),
        "runs": [{"seed": run["seed"], "curve": run["curve"], "steps_per_second": run["steps_per_second"],
                  "minutes": run["minutes"], **run["summary"]} for run in runs],
    }


def step_ratio(slow: float | None, fast: float | None, steps: int) -> dict | None:
    """ControlNet's median steps over ControlNeXt's: exact when both reach the mark; a lower bound when only
    ControlNeXt does (ControlNet's lies beyond the last step); None when ControlNeXt does not."""
    if fast is None:
        return None
    return {"value": (steps if slow is None else slow) / max(fast, 1), "lower_bound": slow is None}


def aggregate_recipe(kind: str, recipe: str, runs: dict[str, list[dict]], steps: int, floor: float) -> dict:
    """Each method's aggregate (`aggregate_method`); the common bar (90% of the better median final fidelity) with
    each method's median steps to it; ControlNet's median steps over ControlNeXt's to 90% of the own final, to
    the onset and to the common bar; and the sentence on the 5x claim (`floor`: the uncontrolled fidelity)."""
    methods = {method: aggregate_method(method_runs) for method, method_runs in runs.items()}
    bar = 0.9 * max(entry["final"]["median"] for entry in methods.values())
    for entry in methods.values():
        entry["steps_to_common_bar"] = spread([first_step(run["curve"], bar) for run in entry["runs"]])
    result = {"methods": methods, "common_bar": bar, "steps": steps, "floor": floor}
    if set(METHODS) <= set(methods):
        fast, slow = methods["controlnext"], methods["controlnet"]
        for mark in ("steps_to_90", "onset", "steps_to_common_bar"):
            result[f"ratio_{mark}"] = step_ratio(slow[mark]["median"], fast[mark]["median"], steps)
    result["sentence"] = speedup_sentence(kind, recipe, result)
    return result


def speedup_verdict(result: dict) -> str:
    """Whether "ControlNeXt converges at least 5x sooner" holds, judged at the common bar, which a run that does not
    rise within the budget cannot pass (90% of its own low final fidelity it may): "holds", "does not hold", or
    "cannot be told" (a bar not above the uncontrolled floor: neither method learned the control; ControlNet's
    median run not at the bar within the steps and the bound below 5x; neither method's)."""
    ratio = result["ratio_steps_to_common_bar"]
    if result["common_bar"] <= result["floor"]:
        return "cannot be told"
    if ratio is None:
        reached = result["methods"]["controlnet"]["steps_to_common_bar"]["median"] is not None
        return "does not hold" if reached else "cannot be told"
    if ratio["value"] >= TARGET_SPEEDUP:
        return "holds"
    return "cannot be told" if ratio["lower_bound"] else "does not hold"


def speedup_sentence(kind: str, recipe: str, result: dict) -> str:
    """One plain sentence on the 5x claim for one (kind, recipe), with the figures it rests on."""
    from .report import ratio_text, steps_text

    steps = result["steps"]
    if "ratio_steps_to_common_bar" not in result:
        return f"{kind}, {recipe} recipe: one method only, no comparison."

    def pair(mark: str) -> str:
        cnx, cn = (result["methods"][m][mark]["median"] for m in METHODS)
        return (f"ControlNeXt {steps_text(cnx, steps)}, ControlNet {steps_text(cn, steps)} "
                f"({ratio_text(result[f'ratio_{mark}'])})")

    bar, floor = result["common_bar"], result["floor"]
    below = ""
    if bar <= floor:
        below = f", not above the uncontrolled floor {floor:.3f}: neither method learned the control"
    return (f"{kind}, {recipe} recipe: \"ControlNeXt converges at least {TARGET_SPEEDUP}x sooner\" "
            f"{speedup_verdict(result)}. Median steps to the common bar ({bar:.3f}{below}): "
            f"{pair('steps_to_common_bar')}; to 90% of the own final fidelity: {pair('steps_to_90')}; to the onset: "
            f"{pair('onset')}.")


def median_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """The median fidelity over runs at each validation step all of them have."""
    steps = sorted(set.intersection(*(set(dict(curve)) for curve in curves)))
    values = [dict(curve) for curve in curves]
    return steps, [statistics.median(curve[step] for curve in values) for step in steps]


def study_figure(result: dict, kind: str):
    """One panel per recipe: every seed's fidelity curve (thin, one colour per method), each method's median curve
    (thick) and the uncontrolled floor (dashed), as a matplotlib figure."""
    from .report import METHOD_NAMES

    plt = _pyplot()
    setup, entry = result["setup"], result["kinds"][kind]
    recipes = entry["recipes"]
    figure, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 3.8), dpi=110, sharey=True,
                                squeeze=False)
    top = max(value for data in recipes.values() for aggregate in data["methods"].values()
              for run in aggregate["runs"] for _, value in run["curve"])
    for panel, (recipe, data) in zip(axes[0], recipes.items()):
        for method, aggregate in data["methods"].items():
            colour = f"C{METHODS.index(method)}" if method in METHODS else None
            for run in aggregate["runs"]:
                panel.plot(*zip(*run["curve"]), color=colour, linewidth=0.8, alpha=0.45)
            panel.plot(*median_curve([run["curve"] for run in aggregate["runs"]]), color=colour, linewidth=2.4,
                       label=f"{METHOD_NAMES.get(method, method)}, median of {len(aggregate['runs'])}")
        panel.axhline(entry["uncontrolled"], color="grey", linestyle="--", linewidth=1, label="no control")
        panel.set_title(f"{recipe} recipe", fontsize=10)
        panel.set_xlabel("training steps (batch %d)" % setup["batch_size"])
        panel.set_ylim(0, max(top, entry["uncontrolled"]) * 1.05)  # shared: every panel's curves in view
        panel.grid(alpha=0.3)
    axes[0][0].set_ylabel(entry["metric"].replace("_", " "))
    axes[0][0].legend(fontsize=8)
    # two lines, so that the title fits above a single panel too
    figure.suptitle(f"shapes world, {kind} condition, {setup['validation_count']} held-out scenes\n"
                    f"each of {len(setup['seeds'])} training seeds (thin) and their median (thick)", fontsize=10)
    figure.tight_layout()
    return figure


def plot_study(result: dict, kind: str, path: str | Path) -> Path:
    """`study_figure` saved as a PNG."""
    return _save(study_figure(result, kind), path)
