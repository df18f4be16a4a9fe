"""Efficiency benchmarks: parameter counts and the inference overhead of control (FLOPs and CPU time)."""

from .architectures import ARCHITECTURES, SD15_UNET, SDXL_UNET, build_unet
from .overhead import CONFIGURATIONS, StepSetup, architecture_setup, count_flops, make_setup, measure_overhead, time_steps
from .params import count_parameters
from .report import machine_info, render_markdown, update_results
from .suite import run_benchmarks

__all__ = [
    "ARCHITECTURES", "SD15_UNET", "SDXL_UNET", "build_unet", "CONFIGURATIONS", "StepSetup", "architecture_setup",
    "count_flops", "make_setup", "measure_overhead", "time_steps", "count_parameters", "machine_info",
    "render_markdown", "update_results", "run_benchmarks",
]
