"""Control models: one file per method."""

from .controlnet import ControlNet
from .controlnet_sd3 import SD3ControlNet
from .controlnext import VARIANTS, ControlNeXtModel, cross_normalize

__all__ = ["ControlNeXtModel", "ControlNet", "SD3ControlNet", "cross_normalize", "VARIANTS"]
