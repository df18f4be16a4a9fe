"""Pipelines: base models (offline first) and diffusers pipelines with controls attached."""

from .base import SCHEDULERS, TASKS, load_base, load_loras, set_scheduler
from .controlled import ControlledPipeline

__all__ = ["ControlledPipeline", "load_base", "load_loras", "set_scheduler", "SCHEDULERS", "TASKS"]
