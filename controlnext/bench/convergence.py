"""Convergence: train ControlNeXt and ControlNet on the shapes world with the same budget, data and seed,
and follow control fidelity on held-out conditions against steps.

Both runs go through `controlnext.training.train`, the same loop users run; fidelity is measured at
every validation on the first `validation_count` scenes of the world's test split (edge F1 for edges
and outlines, mask IoU for masks), sampled with the same seed, sampler and guidance for both methods.
The uncontrolled floor is the same base model sampling the same prompts without any control.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
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


def summarize(curve: list[tuple[int, float]], tail: int = 3) -> dict:
    """Final fidelity (mean of the last `tail` validations), steps to 90% of it, and how sudden the rise was.

    The rise is measured on the gain over the step-0 value: "plateau" is the step where 10% of the final
    gain is first reached, "rise" the steps from there to 90% of the gain. A curve is called sudden
    (ControlNet's "sudden convergence", Zhang et al., Sec. 4.1) when its plateau outlasts the first
    validation interval and lasts at least twice as long as its rise (a rise within one interval counting
    as one interval).
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
        log(f"{setup.kind}: {method} final {setup.metric} {summary['final']:.3f}, 90% of it at step "
            f"{summary['steps_to_90']}, sudden: {summary['sudden']}")
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
