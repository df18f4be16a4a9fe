"""Control models: one file per method."""

from .controlnet import ControlNet
from .controlnext import INJECTION_POINTS, VARIANTS, ControlNeXtModel, cross_normalize

__all__ = ["ControlNeXtModel", "ControlNet", "cross_normalize", "VARIANTS", "INJECTION_POINTS"]
