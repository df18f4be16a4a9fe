"""Pipelines: base models (offline first) and diffusers pipelines with controls attached."""

from .base import SCHEDULERS, TASKS, load_base, load_loras, set_scheduler
from .controlled import ControlledPipeline
from .video import ControlledVideoPipeline

__all__ = ["ControlledPipeline", "ControlledVideoPipeline", "load_base", "load_loras", "set_scheduler", "SCHEDULERS", "TASKS"]
