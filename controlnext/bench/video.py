"""The cost of pose control on a Stable Video Diffusion denoising step (FLOPs and CPU time), printed, not a test.

One step is the UNet call of a window under classifier-free guidance: 2 x frames rows at latent size. The
control is the SVD-v2 release module, attached through `attach_control` as generation attaches it: run
once per window on the condition frames (both guidance halves see the same frames; the unconditional half
gets scale 0), its timestep-free stem computed once per condition. The official pipeline runs the module
on both halves (2 x frames rows): counted beside it. FLOPs come from torch's flop counter on the meta
device (no weights, any size); CPU time needs real weights, so it is taken at a size that fits.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..control import ControlUnit, attach_control


@dataclass
class VideoStep:
    """The SVD-XT UNet, the SVD-v2 control module and one window's inputs under CFG."""

    unet: nn.Module
    module: nn.Module
    sample: torch.Tensor  # (2, frames, 8, h, w): noise and image latents, [unconditional, conditional]
    timestep: torch.Tensor
    image_embeddings: torch.Tensor  # (2, 1, 1024)
    added_time_ids: torch.Tensor  # (2, 3): fps, motion bucket, noise augmentation
    condition: torch.Tensor  # (frames, 3, H, W) in [0, 1]
    size: tuple[int, int]  # (height, width) in pixels

    def step(self) -> torch.Tensor:
        return self.unet(self.sample, self.timestep, self.image_embeddings, added_time_ids=self.added_time_ids,
                         return_dict=False)[0]

    def unit(self, scale: float = 1.0) -> ControlUnit:
        return ControlUnit(self.module, self.condition, scale=scale, name="svd-v2")

    def module_call(self) -> torch.Tensor:
        """The module as the attachment calls it: once for the window's frames."""
        return self.module.control_features(self.condition, self.timestep.reshape(1), {})


def video_step(height: int = 576, width: int = 1024, frames: int = 14, device: str = "meta", seed: int = 0) -> VideoStep:
    """Random-weight SVD-XT UNet and SVD-v2 module with the inputs of one guided step of `frames` frames."""
    from ..models import ControlNeXtModel
    from .architectures import build_unet

    torch.manual_seed(seed)
    unet = build_unet("svd-xt", device=device)
    with torch.device(device):
        module = ControlNeXtModel.from_variant("svd").eval()
    g = torch.Generator().manual_seed(seed)
    latent = (height // 8, width // 8)
    sample = torch.randn(2, frames, unet.config.in_channels, *latent, generator=g)
    embeddings = torch.randn(2, 1, unet.config.cross_attention_dim, generator=g)
    embeddings[0] = 0  # the unconditional half gets zero image embeddings
    time_ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    condition = torch.rand(frames, 3, height, width, generator=g)
    return VideoStep(unet, module, sample.to(device), torch.tensor(1.0, device=device), embeddings.to(device),
                     time_ids.to(device), condition.to(device), (height, width))


def count_video_flops(setup: VideoStep) -> dict:
    """FLOPs of the base step, the controlled step (first and later steps) and the module alone."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(call) -> int:
        with FlopCounterMode(display=False) as counter:
            call()
        return counter.get_total_flops()

    unit = setup.unit()
    with torch.inference_mode():
        base = flops(setup.step)
        with attach_control(setup.unet, unit, apply_to="cond", cfg=True):
            first = flops(setup.step)  # computes the timestep-free stem, which later steps reuse
            later = flops(setup.step)
        setup.module.clear_cache()
        module = flops(lambda: setup.module(setup.condition, setup.timestep.reshape(1)))
        stem = flops(lambda: setup.module.precompute(setup.condition))
        both_halves = flops(lambda: setup.module(torch.cat([setup.condition, setup.condition]),
                                                 setup.timestep.reshape(1)))
    return {
        "base": base, "controlled": later, "controlled_first_step": first, "module": module,
        "module_stem": stem, "module_both_halves": both_halves,
        "overhead": later / base - 1, "overhead_first_step": first / base - 1,
        "overhead_both_halves": (base + both_halves) / base - 1,
    }


def time_video_module(setup: VideoStep, repeats: int = 3, warmup: int = 1) -> dict:
    """CPU seconds (this process) of the base step and of the module call, interleaved round by round."""
    seconds = {"base": [], "module": [], "controlled": []}
    unit = setup.unit()
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name in seconds:
                start = time.process_time()
                if name == "base":
                    setup.step()
                elif name == "module":
                    setup.module_call()
                else:
                    with attach_control(setup.unet, unit, apply_to="cond", cfg=True):
                        setup.step()
                if round_index >= warmup:
                    seconds[name].append(time.process_time() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"seconds": seconds, "median": median, "module_share": median["module"] / median["base"],
            "step_overhead": median["controlled"] / median["base"] - 1, "repeats": repeats, "warmup": warmup,
            "threads": torch.get_num_threads()}


def measure_video(frames: int = 14, flops_size: tuple[int, int] = (576, 1024), time_size: tuple[int, int] = (128, 224),
                  time_frames: int = 14, repeats: int = 3, threads: int | None = 1, log=print) -> dict:
    """FLOPs at `flops_size` on the meta device, CPU time at `time_size` with random weights; logged and returned."""
    if threads:
        torch.set_num_threads(threads)
    log(f"FLOPs of one SVD-XT step, {flops_size[0]}x{flops_size[1]}, {frames} frames, CFG (meta device)")
    flops = count_video_flops(video_step(*flops_size, frames=frames, device="meta"))
    log(f"  base {flops['base'] / 1e12:.2f} TFLOP; with the SVD-v2 control {flops['overhead']:+.2%} "
        f"(first step {flops['overhead_first_step']:+.2%}; module on both halves, as the official code runs it, "
        f"{flops['overhead_both_halves']:+.2%}); module {flops['module'] / 1e9:.1f} GFLOP")
    log(f"CPU time at {time_size[0]}x{time_size[1]}, {time_frames} frames, {torch.get_num_threads()} thread(s), "
        f"{repeats} rounds (random weights, fp32)")
    timing = time_video_module(video_step(*time_size, frames=time_frames, device="cpu"), repeats=repeats)
    log(f"  base step {timing['median']['base']:.2f} s, module {timing['median']['module']:.3f} s "
        f"({timing['module_share']:.2%} of a step), controlled step {timing['step_overhead']:+.2%}")
    time_flops = count_video_flops(video_step(*time_size, frames=time_frames, device="meta"))
    return {"architecture": "svd-xt", "frames": frames, "size": list(flops_size), "flops": flops,
            "time_size": list(time_size), "time_frames": time_frames, "time_flops": time_flops, "timing": timing}
