"""Attaching control to an unmodified diffusers UNet with forward hooks.

A hook before the UNet's forward computes every active control's output for this call; hooks at the
injection point add it (ControlNeXt) or the documented residual arguments carry it (ControlNet).
Nothing of the UNet is replaced, so every diffusers pipeline, scheduler, LoRA and offload works with
control, and training and inference share this one code path. `detach()` removes every hook and
restores any base weights the controls changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ..errors import ControlNextError
from .loading import check_fits

ApplyTo = Literal["both", "cond"]


class ControlModel(Protocol):
    """What a control method provides; ControlNeXtModel and ControlNet both implement it."""

    injection: str  # "conv_in" | "down_blocks.0" | "mid_block" | "residuals"
    shares_across_cfg: bool  # True when the output does not depend on the prompt (computed once for both halves)

    def control_features(self, condition: torch.Tensor, timestep: torch.Tensor, unet_inputs: dict[str, Any]) -> Any:
        """Condition (b, c, H, W) in [0, 1] and timestep(s) -> what `inject`/residuals need."""

    def scale_features(self, features: Any, scale: torch.Tensor) -> Any:
        """Apply per-sample scales (b,) to features (residual methods) or keep them for `inject`."""


@dataclass
class ControlUnit:
    """One control: a model, its condition image batch, and how strongly and when it acts."""

    model: nn.Module
    condition: torch.Tensor | None = None  # (b, c, H, W) in [0, 1]
    scale: float = 1.0
    start: float = 0.0  # fraction of the schedule where the control switches on
    end: float = 1.0  # ... and off
    name: str = ""
    unet_weights: dict[str, torch.Tensor] | None = None  # trained base tensors (absolute), used while active

    def active_at(self, fraction: float | None, next_fraction: float | None) -> bool:
        if self.scale == 0:
            return False
        if fraction is None:
            return True
        return self.start <= fraction + 1e-9 and next_fraction <= self.end + 1e-9


@dataclass
class _Pending:
    unit: ControlUnit
    features: Any  # (N, c, h, w) for ControlNeXt
    scale: torch.Tensor  # (N,) per-sample scale, zero where the control does not act


@dataclass
class ControlAttachment:
    """Hooks that add the units' control to `unet`; use as a context manager or call `detach()`."""

    unet: nn.Module
    units: list[ControlUnit]
    scheduler: Any = None
    apply_to: ApplyTo = "both"
    cfg: bool | None = None  # None: infer (the UNet batch is twice the condition batch under CFG)
    _handles: list = field(default_factory=list)
    _pending: dict[str, list[_Pending]] = field(default_factory=dict)
    _base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    _weights_state: frozenset = frozenset()
    _weights_cache: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.apply_to not in ("both", "cond"):
            raise ControlNextError(f"apply_to must be 'both' or 'cond', not {self.apply_to!r}")
        params = dict(self.unet.named_parameters())
        for unit in self.units:
            check_fits(unit.model, self.unet, f"control {unit.name or type(unit.model).__name__!r}")
            for name, value in (unit.unet_weights or {}).items():
                if name not in params or params[name].shape != value.shape:
                    raise ControlNextError(
                        f"control {unit.name!r} changes UNet weight {name!r}, which this base model does not have "
                        "with that shape; use the base model the control was trained for"
                    )
                self._base_weights.setdefault(name, params[name].data)
        self._handles.append(self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True))
        points = {unit.model.injection for unit in self.units}
        if "conv_in" in points:
            hook = self._inject_before_first_block
            self._handles.append(self.unet.down_blocks[0].register_forward_pre_hook(hook, with_kwargs=True))
        if "down_blocks.0" in points:
            self._handles.append(self.unet.down_blocks[0].register_forward_hook(self._inject_after_first_block))
        if "mid_block" in points:
            if self.unet.mid_block is None:
                raise ControlNextError("this control injects after the mid block, but the base UNet has none")
            self._handles.append(self.unet.mid_block.register_forward_hook(self._inject_after_mid_block))

    # -- lifecycle -------------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove every hook and put back the base weights that were replaced."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self._use_weights_of([])
        for unit in self.units:
            getattr(unit.model, "clear_cache", lambda: None)()  # features kept for the generation's condition

    def _use_weights_of(self, units: list[ControlUnit]) -> None:
        """Give the UNet its base weights plus the trained changes of `units` (free when unchanged)."""
        key = frozenset(id(unit) for unit in units if unit.unet_weights)
        if key == self._weights_state:
            return
        params = dict(self.unet.named_parameters())
        if key not in self._weights_cache:
            combined = {}
            for unit in units:
                for name, value in (unit.unet_weights or {}).items():
                    base = self._base_weights[name]
                    value = value.to(base.device, base.dtype)
                    combined[name] = value if name not in combined else combined[name] + (value - base)
            self._weights_cache = {key: combined}  # keep one combination: the one in use
        combined = self._weights_cache[key]
        for name, base in self._base_weights.items():
            params[name].data = combined.get(name, base)
        self._weights_state = key

    def __enter__(self) -> "ControlAttachment":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- per call ----------------------------------------------------------------------------------

    def _schedule_position(self, timestep: torch.Tensor) -> tuple[float | None, float | None]:
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None, None
        t = timestep.reshape(-1)[0].to(timesteps.device, timesteps.dtype)
        index = int(torch.argmin((timesteps - t).abs()))
        return index / len(timesteps), (index + 1) / len(timesteps)

    def _layout(self, batch: int, condition_batch: int) -> tuple[bool, int]:
        """(is CFG, rows per half) for a UNet batch given the condition batch."""
        cfg = self.cfg
        if cfg is None:
            if batch == 2 * condition_batch:
                cfg = True
            elif batch == condition_batch:
                cfg = False
            else:
                raise ControlNextError(
                    f"condition batch {condition_batch} does not match the UNet batch {batch}; "
                    "give one condition per image (or one for all)"
                )
        half = batch // 2 if cfg else batch
        if half % condition_batch:
            raise ControlNextError(
                f"condition batch {condition_batch} does not divide the image batch {half}; "
                "give one condition per image or one for all"
            )
        return cfg, half

    def _before_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        names = ("sample", "timestep", "encoder_hidden_states")
        inputs = dict(kwargs)
        for name, value in zip(names, args):
            inputs[name] = value
        sample = inputs["sample"]
        batch = sample.shape[0]
        timestep = torch.as_tensor(inputs["timestep"], device=sample.device).reshape(-1)
        # one timestep for the batch is known without reading the values (no device sync; meta tensors work)
        same_t = timestep.numel() == 1 or bool((timestep == timestep[0]).all())
        timestep = timestep.expand(batch) if timestep.numel() == 1 else timestep
        fraction, next_fraction = self._schedule_position(timestep)

        self._pending = {}
        residuals = []
        active = [unit for unit in self.units if unit.active_at(fraction, next_fraction)]
        self._use_weights_of(active)
        for unit in active:
            if unit.condition is None:
                raise ControlNextError(f"control {unit.name or unit.model.injection!r} has no condition image")
            cfg, half = self._layout(batch, unit.condition.shape[0])
            features, rows = self._run_unit(unit, timestep, same_t, inputs, cfg, half)
            scale = torch.full((batch,), float(unit.scale), device=sample.device, dtype=sample.dtype)
            if cfg and self.apply_to == "cond":
                scale[:half] = 0
            if unit.model.injection == "residuals":
                residuals.append(_pad_rows(unit.model.scale_features(features, scale[rows]), rows, batch))
            else:
                self._pending.setdefault(unit.model.injection, []).append(_Pending(unit, features, scale))

        if residuals:
            kwargs = _add_residuals(kwargs, residuals, len(args))
        return args, kwargs

    def _run_unit(self, unit, timestep, same_t, inputs, cfg, half):
        """Run a control model on the fewest rows that give its output for the whole UNet batch."""
        model = unit.model
        batch = timestep.shape[0]
        condition = unit.condition.to(device=model.device, dtype=model.dtype)  # (bc, c, H, W)
        per_half = half // condition.shape[0]
        if model.shares_across_cfg:
            if same_t:
                features = model.control_features(condition, timestep[:1], inputs)  # (bc, ...)
                features = _repeat_rows(features, per_half)  # (half, ...)
            else:
                rows = slice(half, batch) if cfg else slice(0, batch)
                features = model.control_features(_repeat_rows(condition, per_half), timestep[rows], inputs)
            if cfg:
                features = _cat_rows(features, features)  # (batch, ...) both halves see the same condition
            return features, slice(0, batch)
        # Prompt-dependent controls (ControlNet) run on the rows they act on, with those rows' inputs.
        rows = slice(half, batch) if cfg and self.apply_to == "cond" else slice(0, batch)
        full = _repeat_rows(condition, per_half)
        full = _cat_rows(full, full) if cfg else full
        sub_inputs = {k: _slice_rows(v, rows, batch) for k, v in inputs.items()}
        return model.control_features(full[rows], timestep[rows], sub_inputs), rows

    # -- injection points ----------------------------------------------------------------------

    def _inject(self, point: str, x: torch.Tensor) -> torch.Tensor:
        for pending in self._pending.get(point, ()):
            scale = pending.scale.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (N, 1, 1, 1)
            x = pending.unit.model.inject(x, pending.features, scale)
        return x

    def _inject_before_first_block(self, module, args, kwargs):
        # The first skip connection (conv_in's output) is stored before this call, so it stays uncontrolled.
        if args:
            return (self._inject("conv_in", args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._inject("conv_in", kwargs["hidden_states"])
        return args, kwargs

    def _inject_after_first_block(self, module, args, output):
        sample, skips = output  # skips are kept as they were: the addition follows the block's outputs
        return self._inject("down_blocks.0", sample), skips

    def _inject_after_mid_block(self, module, args, output):
        return self._inject("mid_block", output)


def attach_control(
    unet: nn.Module,
    units: list[ControlUnit] | ControlUnit,
    *,
    scheduler: Any = None,
    apply_to: ApplyTo = "both",
    cfg: bool | None = None,
) -> ControlAttachment:
    """Attach control units to an unmodified UNet; returns the attachment (call `.detach()` to undo)."""
    units = [units] if isinstance(units, ControlUnit) else list(units)
    return ControlAttachment(unet, units, scheduler=scheduler, apply_to=apply_to, cfg=cfg)


def _repeat_rows(x: Any, repeats: int) -> Any:
    if repeats == 1:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_repeat_rows(v, repeats) for v in x)
    return x.repeat_interleave(repeats, dim=0)


def _cat_rows(a: Any, b: Any) -> Any:
    if isinstance(a, (tuple, list)):
        return type(a)(_cat_rows(x, y) for x, y in zip(a, b))
    return torch.cat([a, b], dim=0)


def _slice_rows(value: Any, rows: slice, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: _slice_rows(v, rows, batch) for k, v in value.items()}
    return value


def _pad_rows(x: Any, rows: slice, batch: int) -> Any:
    """Rows computed for `rows` of the batch -> the whole batch, zero elsewhere."""
    if isinstance(x, (tuple, list)):
        return type(x)(_pad_rows(v, rows, batch) for v in x)
    if x.shape[0] == batch:
        return x
    full = x.new_zeros((batch, *x.shape[1:]))
    full[rows] = x
    return full


def _add_residuals(kwargs: dict, residuals: list, n_args: int) -> dict:
    """Sum (down residuals, mid residual) pairs into the UNet's documented ControlNet arguments."""
    down = [sum(parts) for parts in zip(*(r[0] for r in residuals))]
    mid = sum(r[1] for r in residuals)
    kwargs = dict(kwargs)
    if kwargs.get("down_block_additional_residuals") is not None:
        down = [d + e for d, e in zip(down, kwargs["down_block_additional_residuals"])]
    if kwargs.get("mid_block_additional_residual") is not None:
        mid = mid + kwargs["mid_block_additional_residual"]
    kwargs["down_block_additional_residuals"] = tuple(down)
    kwargs["mid_block_additional_residual"] = mid
    return kwargs
