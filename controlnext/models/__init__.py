"""Control models: one file per method."""

from .controlnext import INJECTION_POINTS, VARIANTS, ControlNeXtModel, cross_normalize

__all__ = ["ControlNeXtModel", "cross_normalize", "VARIANTS", "INJECTION_POINTS"]
