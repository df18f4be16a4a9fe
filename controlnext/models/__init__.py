"""Control models: one file per method."""

from .controlnet import ControlNet
from .controlnext import VARIANTS, ControlNeXtModel, cross_normalize

__all__ = ["ControlNeXtModel", "ControlNet", "cross_normalize", "VARIANTS"]
