"""controlnext: controllable generation with ControlNeXt and ControlNet on pretrained diffusion models."""

__version__ = "0.1.0"
