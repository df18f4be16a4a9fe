"""Inference overhead of control: one denoising step with ControlNeXt or ControlNet against the bare step.

Both methods are attached at once through `attach_control` and switched on and off by their scale, so
every configuration runs the same hooked UNet call; timings are interleaved (base, ControlNeXt, ...,
base, ...) so that a machine busy with other work slows all of them alike. FLOPs come from torch's flop
counter on the same calls, a ratio that does not depend on the machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..control import ControlUnit, attach_control

# What each timed configuration runs: the ControlNeXt unit's scale, the ControlNet unit's, and whether
# ControlNeXt's timestep-free part is dropped before the step (as on a generation's first step).
CONFIGURATIONS = {
    "base": (0.0, 0.0, False),
    "controlnext": (1.0, 0.0, False),
    "controlnext_first_step": (1.0, 0.0, True),
    "controlnet": (0.0, 1.0, False),
}


# The control models alone, timed in each round too: their share of a base step without the UNet's noise.
MODULE_CALLS = ("controlnext_module", "controlnet_module")


@dataclass
class StepSetup:
    """A UNet, one control of each method and the inputs of one denoising step under CFG."""

    unet: nn.Module
    controlnext: nn.Module
    controlnet: nn.Module
    sample: torch.Tensor  # (2b, 4, h, w): [unconditional, conditional]
    timestep: torch.Tensor
    text: torch.Tensor  # (2b, tokens, d)
    condition: torch.Tensor  # (b, 3, 8h, 8w) in [0, 1]: one per image, shared by both CFG halves
    resolution: int
    added_cond_kwargs: dict | None = None  # SDXL's pooled text embeddings and size/crop ids

    def units(self) -> list[ControlUnit]:
        return [ControlUnit(self.controlnext, self.condition, name="controlnext"),
                ControlUnit(self.controlnet, self.condition, name="controlnet")]

    def step(self) -> torch.Tensor:
        return self.unet(self.sample, self.timestep, self.text, added_cond_kwargs=self.added_cond_kwargs).sample

    def module_call(self, name: str):
        """One control model's own call as the attachment makes it (ControlNeXt once, ControlNet on the batch)."""
        if name == "controlnext_module":
            return self.controlnext.control_features(self.condition, self.timestep.reshape(1), {})
        condition = self.condition.repeat(self.sample.shape[0] // self.condition.shape[0], 1, 1, 1)  # (2b, 3, H, W)
        inputs = {"sample": self.sample, "encoder_hidden_states": self.text, "added_cond_kwargs": self.added_cond_kwargs}
        return self.controlnet.control_features(condition, self.timestep.expand(self.sample.shape[0]), inputs)


def make_setup(unet, controlnext, controlnet, resolution: int, images: int = 1, tokens: int = 77, seed: int = 0,
               dtype: torch.dtype = torch.float32, added_cond: bool = False) -> StepSetup:
    """Inputs for `unet` at `resolution` pixels (latent 1/8), CFG batch of 2 x `images`.

    `added_cond` adds SDXL's pooled text embeddings and size/crop ids (random values of the right shapes).
    """
    device = unet.device if unet.device.type != "meta" else torch.device("meta")
    g = torch.Generator().manual_seed(seed)
    latent = resolution // 8
    sample = torch.randn(2 * images, unet.config.in_channels, latent, latent, generator=g)
    text = torch.randn(2 * images, tokens, unet.config.cross_attention_dim, generator=g)
    condition = torch.rand(images, 3, resolution, resolution, generator=g)
    added = None
    if added_cond:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2 * images, dtype=torch.float32)
        added = {"text_embeds": torch.randn(2 * images, pooled, generator=g).to(device, dtype),
                 "time_ids": ids.to(device, dtype)}
    return StepSetup(unet, controlnext.eval(), controlnet.eval(), sample.to(device, dtype),
                     torch.tensor(500, device=device), text.to(device, dtype), condition.to(device, dtype), resolution,
                     added)


def architecture_setup(architecture: str = "sd15", resolution: int = 512, device: str = "cpu", seed: int = 0) -> StepSetup:
    """Random-weight base UNet of a named architecture with its release's ControlNeXt and a ControlNet."""
    from ..models import ControlNet, ControlNeXtModel
    from .architectures import ARCHITECTURES, build_unet

    if architecture != "sd15":
        raise ValueError("the overhead benchmark runs on the SD1.5 architecture (SDXL needs added_cond_kwargs)")
    torch.manual_seed(seed)
    unet = build_unet(architecture, device=device)
    with torch.device(device):
        controlnext = ControlNeXtModel.from_variant(ARCHITECTURES[architecture]["controlnext_variant"])
        controlnet = ControlNet.from_unet(unet, load_weights_from_unet=device != "meta")
    return make_setup(unet, controlnext, controlnet, resolution, seed=seed)


def count_flops(setup: StepSetup) -> dict:
    """FLOPs (multiply-adds x 2, convolutions and matrix products) of one step in each configuration."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    units = setup.units()
    with torch.inference_mode(), attach_control(setup.unet, units):
        for name in CONFIGURATIONS:
            _configure(setup, units, name)
            setup.step()  # leaves the cache as a generation's later steps find it
            _configure(setup, units, name)
            with FlopCounterMode(display=False) as counter:
                setup.step()
            flops[name] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            setup.controlnext.precompute(setup.condition)
        flops["controlnext_precompute"] = counter.get_total_flops()
    base = flops["base"]
    return {"flops": flops, "overhead": {name: flops[name] / base - 1 for name in CONFIGURATIONS if name != "base"}}


def time_steps(setup: StepSetup, repeats: int = 5, warmup: int = 1, sync=None) -> dict:
    """Seconds per step of each configuration and per control model call, interleaved, in two clocks.

    On a machine shared with other work, wall-clock time also counts the waits for a free core; CPU time
    counts only the step's own work. Each clock gets medians, IQRs, and overheads as the median of
    per-round ratios to the base step (paired: same round, same load) and as fastest over fastest.
    `sync` (e.g. torch.cuda.synchronize) waits for queued device work before each clock reading.
    """
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    seconds = {clock: {name: [] for name in (*CONFIGURATIONS, *MODULE_CALLS)} for clock in clocks}
    units = setup.units()
    with torch.inference_mode(), attach_control(setup.unet, units):
        for round_index in range(warmup + repeats):
            for name in (*CONFIGURATIONS, *MODULE_CALLS):
                if name in CONFIGURATIONS:
                    _configure(setup, units, name)
                    elapsed = _timed(clocks, setup.step, sync)
                else:
                    elapsed = _timed(clocks, lambda: setup.module_call(name), sync)
                if round_index >= warmup:
                    for clock, value in elapsed.items():
                        seconds[clock][name].append(value)
        precompute = [_timed(clocks, lambda: setup.controlnext.precompute(setup.condition), sync) for _ in range(3)]
    return {clock: summarize(per_config, statistics.median(p[clock] for p in precompute))
            for clock, per_config in seconds.items()}


def summarize(seconds: dict[str, list[float]], precompute: float) -> dict:
    """Medians and IQRs of per-round times; overheads against the base step of the same round.

    A configuration's overhead is step / base - 1; a control model's alone is its call / base step.
    """
    base = seconds["base"]
    summary = {"seconds": seconds, "median": {}, "iqr": {}, "overhead": {}, "overhead_iqr": {},
               "fastest_overhead": {}, "precompute": precompute}
    for name, values in seconds.items():
        summary["median"][name], summary["iqr"][name] = median_iqr(values)
        if name != "base":
            offset = 1 if name in CONFIGURATIONS else 0
            ratios = [value / b - offset for value, b in zip(values, base)]  # paired: same round, same load
            summary["overhead"][name], summary["overhead_iqr"][name] = median_iqr(ratios)
            summary["fastest_overhead"][name] = min(values) / min(base) - offset
    return summary


def measure_overhead(
    resolution: int,
    repeats: int = 5,
    warmup: int = 1,
    architecture: str = "sd15",
    threads: int | None = None,
    setup: StepSetup | None = None,
) -> dict:
    """Timing on CPU (random weights) and FLOPs (meta device, same shapes) of one CFG step at `resolution`."""
    if threads:
        torch.set_num_threads(threads)
    custom = setup is not None
    if not custom:
        setup = architecture_setup(architecture, resolution, device="cpu")
    flop_setup = setup if custom else architecture_setup(architecture, resolution, device="meta")
    return {
        "architecture": "custom" if custom else architecture,
        "resolution": resolution,
        "latent": resolution // 8,
        "batch": setup.sample.shape[0],
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "timing": time_steps(setup, repeats, warmup),
        **count_flops(flop_setup),
    }


def _configure(setup: StepSetup, units: list[ControlUnit], name: str) -> None:
    units[0].scale, units[1].scale, first_step = CONFIGURATIONS[name]
    if first_step:
        setup.controlnext.clear_cache()


def _timed(clocks: dict, call, sync=None) -> dict[str, float]:
    if sync:
        sync()
    start = {clock: read() for clock, read in clocks.items()}
    call()
    if sync:
        sync()
    return {clock: read() - start[clock] for clock, read in clocks.items()}


def median_iqr(values: list[float]) -> tuple[float, float]:
    """Median and interquartile range (inclusive quartiles) of timings; a single value has no spread."""
    if len(values) < 2:
        return (values[0] if values else float("nan")), 0.0
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), quartiles[2] - quartiles[0]
