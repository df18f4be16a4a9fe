"""Where models run: one rule for `auto`, used by generation (CLI and web) and the neural annotators."""

from __future__ import annotations

from .errors import ControlNextError


def resolve_device(device: str = "auto") -> str:
    """'auto': CUDA when present, then Apple's MPS, then the CPU; a named device must exist on this machine."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ControlNextError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ControlNextError(f"device {device!r} is not available: this machine has {found}; use cpu or auto")
    if chosen.type == "mps" and not has_mps:
        raise ControlNextError(f"device {device!r} is not available on this machine; use cpu or auto")
    return device


def default_dtype(device: str) -> str:
    """fp32 on the CPU, fp16 on a GPU."""
    return "fp32" if device.split(":")[0] == "cpu" else "fp16"
