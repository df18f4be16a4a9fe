"""Where models run: one rule for `auto`, used by generation (CLI and web) and the neural annotators."""

from __future__ import annotations

from .errors import ControlNextError


def resolve_device(device: str = "auto") -> str:
    """'auto': CUDA when present, then Apple's MPS, then the CPU; any other name must be one torch knows."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ControlNextError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    return device


def default_dtype(device: str) -> str:
    """fp32 on the CPU, fp16 on a GPU."""
    return "fp32" if device.split(":")[0] == "cpu" else "fp16"
