"""Attaching control to an unmodified base model."""

from .attach import ControlAttachment, ControlUnit, attach_control

__all__ = ["ControlAttachment", "ControlUnit", "attach_control"]
