"""Attaching control to an unmodified diffusers denoiser with forward hooks.

A hook before the denoiser's forward computes every active control's output for this call; hooks at
the injection sites add it (add-at-a-site methods such as ControlNeXt) or the denoiser's documented
residual arguments carry it (residual methods such as ControlNet). Where the sites are, how a call is
read and which residual arguments exist come from the denoiser table (`controlnext.denoisers`); what a
method computes comes from its model (`ControlModel`), so nothing here knows a method or a family by
name. Nothing of the denoiser is replaced, so every diffusers pipeline, scheduler, LoRA and offload
works with control, and training and inference share this one code path. `detach()` removes every
hook and restores any base weights the controls changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ..denoisers import (DenoiserCall, Site, arguments, as_map, describe, find_site, from_map, read_call,
                         set_argument)
from ..errors import ControlNextError

ApplyTo = Literal["both", "cond"]
RESIDUALS = "residuals"  # the `injection` of methods that pass their outputs as residual arguments
CONTROL_MODES = ("balanced", "prompt", "control")  # A1111's: balanced, prompt / control is more important
SOFT_WEIGHT = 0.825  # A1111's soft injection: residual k of 13 (shallow to deep) weighted 0.825^(12 - k)
SOFT_DEPTHS = 13  # SD1.5's ControlNet residuals (12 down, 1 mid): the span of A1111's weights, 1 to 0.825^12


class ControlModel(Protocol):
    """What a control method's model provides; the attachment calls it without knowing the method.

    Add-at-a-site methods name a site of the denoiser table in `injection` and provide `inject`;
    residual methods set `injection = "residuals"` and provide `residual_names` and `residual_arguments`.
    """

    injection: str  # a site of the denoiser table ("conv_in", "down_blocks.0", ...) or "residuals"
    shares_across_cfg: bool  # True when the output does not depend on the prompt (computed once for both halves)

    def control_features(self, condition: torch.Tensor, timestep: torch.Tensor, inputs: dict[str, Any]) -> Any:
        """Condition rows (n, c, H, W) in [0, 1], their timesteps and the call's arguments -> features."""

    def base_mismatch(self, denoiser: nn.Module) -> str | None:
        """Why this control does not fit `denoiser`, as a phrase following its name; None when it fits."""

    def inject(self, x: torch.Tensor, features: Any, scale: torch.Tensor) -> torch.Tensor:
        """Site features as a map (rows, c, h, w), the control's features, per-row scales (rows, 1, 1, 1) -> new map."""

    residual_names: tuple[str, ...]  # the denoiser arguments `residual_arguments` fills

    def residual_arguments(self, features: Any, scale: torch.Tensor) -> dict[str, Any]:
        """Features and per-row scales (rows,) -> values of the denoiser's documented residual arguments."""


PROTOCOL = ("injection", "shares_across_cfg", "control_features", "base_mismatch")


def check_fits(model: nn.Module, denoiser, source: str) -> None:
    """Raise a one-line error unless `model` is a control that fits `denoiser` (None: nothing to check)."""
    missing = [name for name in PROTOCOL if not hasattr(model, name)]
    needs = ("residual_names", "residual_arguments") if getattr(model, "injection", None) == RESIDUALS else ("inject",)
    missing += [name for name in needs if not hasattr(model, name)]
    if missing:
        raise ControlNextError(f"{source}: a {type(model).__name__} is not a control model (it lacks "
                               f"{', '.join(missing)}); load controls with load_control")
    if denoiser is None:
        return
    entry = describe(denoiser)
    if model.injection == RESIDUALS:
        unknown = [name for name in model.residual_names if name not in entry.residuals]
        if unknown:
            raise ControlNextError(f"{source} passes {', '.join(unknown)} to the denoiser, which a "
                                   f"{type(denoiser).__name__} does not take; use a base model of its family")
    else:
        try:
            find_site(denoiser, model.injection)
        except ControlNextError as error:  # e.g. a UNet's control on SD3's transformer
            raise ControlNextError(f"{source}: {error}; use the base model the control was trained for") from None
    mismatch = model.base_mismatch(denoiser)
    if mismatch:
        raise ControlNextError(f"{source} {mismatch}; use the base model the control was trained for")


@dataclass
class ControlUnit:
    """One control: a model, its condition image batch, and how strongly and when it acts."""

    model: nn.Module
    condition: torch.Tensor | None = None  # (b, c, H, W) in [0, 1]; rows of every frame for video denoisers
    scale: float = 1.0
    start: float = 0.0  # fraction of the schedule where the control switches on
    end: float = 1.0  # ... and off
    name: str = ""
    unet_weights: dict[str, torch.Tensor] | None = None  # trained base tensors (absolute), used while active
    # CONTROL_MODES, as A1111 defines them for ControlNet: "prompt" weighs the residuals (`soft_weights`), "control"
    # weighs them too and acts on the conditional half only. ControlNeXt adds at one point, so "prompt" weighs its
    # addition over the schedule instead (`schedule_weight`) and "control" acts on the conditional half at full scale.
    mode: str = "balanced"

    def active_at(self, fraction: float | None, next_fraction: float | None) -> bool:
        if self.scale == 0:
            return False
        if fraction is None:
            return True
        return self.start <= fraction + 1e-9 and next_fraction <= self.end + 1e-9


@dataclass
class _Pending:
    unit: ControlUnit
    features: Any  # (rows, c, h, w) for ControlNeXt
    scale: torch.Tensor  # (rows,) per-row scale, zero where the control does not act


@dataclass
class ControlAttachment:
    """Hooks that add the units' control to `denoiser`; use as a context manager or call `detach()`."""

    denoiser: nn.Module
    units: list[ControlUnit]
    scheduler: Any = None
    apply_to: ApplyTo = "both"
    cfg: bool | None = None  # None: infer (the denoiser batch is twice the condition batch under CFG)
    _handles: list = field(default_factory=list)
    _sites: dict[str, Site] = field(default_factory=dict)
    _call: DenoiserCall | None = None
    _pending: dict[str, list[_Pending]] = field(default_factory=dict)
    _base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    _weights_state: frozenset = frozenset()
    _weights_cache: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.apply_to not in ("both", "cond"):
            raise ControlNextError(f"apply_to must be 'both' or 'cond', not {self.apply_to!r}")
        for unit in self.units:
            if unit.mode not in CONTROL_MODES:
                raise ControlNextError(f"unknown control mode {unit.mode!r}; choose one of {', '.join(CONTROL_MODES)}")
        self._entry = describe(self.denoiser)
        params = dict(self.denoiser.named_parameters())
        self._offloaded = offloaded_weights(self.denoiser)
        for unit in self.units:
            check_fits(unit.model, self.denoiser, f"control {unit.name or type(unit.model).__name__!r}")
            for name, value in (unit.unet_weights or {}).items():
                if name not in params or params[name].shape != value.shape:
                    raise ControlNextError(
                        f"control {unit.name!r} changes base weight {name!r}, which this base model does not have "
                        "with that shape; use the base model the control was trained for"
                    )
                base = params[name].data if self._offloaded is None else self._offloaded[name]
                self._base_weights.setdefault(name, base)
        self._handles.append(self.denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True))
        for name in dict.fromkeys(unit.model.injection for unit in self.units if unit.model.injection != RESIDUALS):
            site, module = find_site(self.denoiser, name)
            self._sites[name] = site
            if site.when == "before":
                handle = module.register_forward_pre_hook(partial(self._before_site, name), with_kwargs=True)
            else:
                handle = module.register_forward_hook(partial(self._after_site, name))
            self._handles.append(handle)

    # -- lifecycle -------------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove every hook and put back the base weights that were replaced."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self._call = None
        self._use_weights_of([])
        for unit in self.units:
            getattr(unit.model, "clear_cache", lambda: None)()  # features kept for the generation's condition

    def _use_weights_of(self, units: list[ControlUnit]) -> None:
        """Give the denoiser its base weights plus the trained changes of `units` (free when unchanged)."""
        key = frozenset(id(unit) for unit in units if unit.unet_weights)
        if key == self._weights_state:
            return
        params = dict(self.denoiser.named_parameters())
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
            value = combined.get(name, base)
            if self._offloaded is not None:
                self._offloaded[name] = value  # loaded from here by the offload hook at each call
            else:
                params[name].data = value.to(params[name].device)  # model offload moves the denoiser between devices
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

    def _layout(self, call: DenoiserCall, condition_rows: int) -> tuple[bool, int]:
        """(is CFG, items per half) for a denoiser call given the condition's rows."""
        cfg = self.cfg
        if cfg is None:
            if call.rows == 2 * condition_rows:
                cfg = True
            elif call.rows == condition_rows:
                cfg = False
            else:
                raise ControlNextError(
                    f"condition batch {condition_rows} does not match the denoiser batch {call.rows}; "
                    "give one condition per image (or one for all)"
                )
        half = call.items // 2 if cfg else call.items
        if (half * call.rows_per_item) % condition_rows:
            raise ControlNextError(
                f"condition batch {condition_rows} does not divide the image batch {half * call.rows_per_item}; "
                "give one condition per image or one for all"
            )
        return cfg, half

    def _before_denoiser(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = read_call(self._entry, module, args, kwargs)
        timestep = call.timestep
        # one timestep for the batch is known without reading the values (no device sync; meta tensors work)
        given = call.inputs[self._entry.timestep]  # as passed: read_call has expanded a single one to the batch
        same_t = torch.as_tensor(given).numel() == 1 or bool((timestep == timestep[0]).all())
        timestep = timestep.expand(call.items) if timestep.numel() == 1 else timestep  # (items,)
        fraction, next_fraction = self._schedule_position(timestep)

        self._call, self._pending = call, {}
        residuals = []
        active = [unit for unit in self.units if unit.active_at(fraction, next_fraction)]
        self._use_weights_of(active)
        for unit in active:
            if unit.condition is None:
                raise ControlNextError(f"control {unit.name or unit.model.injection!r} has no condition image")
            cfg, half = self._layout(call, unit.condition.shape[0])
            cond_only = cfg and (self.apply_to == "cond" or unit.mode == "control")
            features, rows = self._run_unit(unit, call, timestep, same_t, cfg, half, cond_only)
            strength = float(unit.scale)
            if unit.mode == "prompt" and unit.model.injection != RESIDUALS:
                strength *= schedule_weight(fraction)
            scale = torch.full((call.items,), strength, device=call.sample.device, dtype=call.sample.dtype)
            if cond_only:
                scale[:half] = 0
            scale = _per_item_rows(scale, call.rows_per_item)  # (rows,)
            if unit.model.injection == RESIDUALS:
                values = unit.model.residual_arguments(features, scale[rows])
                if unit.mode != "balanced":
                    values = soft_weights(values)
                residuals.append({name: _pad_rows(value, rows, call.rows) for name, value in values.items()})
            else:
                self._pending.setdefault(unit.model.injection, []).append(_Pending(unit, features, scale))

        if residuals:
            args, kwargs = _add_residuals(module, args, kwargs, call.inputs, residuals)
        return args, kwargs

    def _run_unit(self, unit, call: DenoiserCall, timestep, same_t, cfg, half, cond_only):
        """Run a control model on the fewest rows that give its output for every row of the call."""
        model = unit.model
        per_item, total = call.rows_per_item, call.rows
        condition = unit.condition.to(device=model.device, dtype=model.dtype)  # (n, c, H, W)
        half_rows = half * per_item
        row_timesteps = _per_item_rows(timestep, per_item)  # (rows,)
        if model.shares_across_cfg:
            if same_t:
                features = model.control_features(condition, timestep[:1], call.inputs)  # (n, ...)
                features = _spread(features, condition.shape[0], half_rows, per_item)  # (half_rows, ...)
            else:
                rows = slice(half_rows, total) if cfg else slice(0, total)
                spread = _spread(condition, condition.shape[0], half_rows, per_item)
                features = model.control_features(spread, row_timesteps[rows], call.inputs)
            if cfg:
                features = _cat_rows(features, features)  # (rows, ...) both halves see the same condition
            return features, slice(0, total)
        # Prompt-dependent controls (ControlNet) run on the rows they act on, with those rows' inputs.
        items = slice(half, call.items) if cond_only else slice(0, call.items)
        rows = slice(items.start * per_item, items.stop * per_item)
        full = _spread(condition, condition.shape[0], half_rows, per_item)
        full = _cat_rows(full, full) if cfg else full
        sub_inputs = {k: _slice_rows(v, items, call.items) for k, v in call.inputs.items()}
        return model.control_features(full[rows], row_timesteps[rows], sub_inputs), rows

    # -- injection sites -----------------------------------------------------------------------

    def _inject(self, name: str, x: torch.Tensor) -> torch.Tensor:
        pending = self._pending.get(name)
        if not pending:
            return x
        layout = self._sites[name].layout
        h = as_map(x, layout, self._call.grid)  # (rows, c, h, w)
        for item in pending:
            scale = item.scale.to(h.dtype).view(-1, *([1] * (h.ndim - 1)))  # (rows, 1, 1, 1)
            h = item.unit.model.inject(h, item.features, scale)
        return from_map(h, layout)

    def _before_site(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        argument = self._sites[name].tensor
        x = arguments(module, args, kwargs)[argument]
        return set_argument(module, args, kwargs, argument, self._inject(name, x))

    def _after_site(self, name: str, module: nn.Module, args: tuple, output):
        index = self._sites[name].tensor
        if index is None:
            return self._inject(name, output)
        # only this tensor changes: e.g. a UNet block's skips stay as the block stored them
        return (*output[:index], self._inject(name, output[index]), *output[index + 1:])


def attach_control(
    denoiser: nn.Module,
    units: list[ControlUnit] | ControlUnit,
    *,
    scheduler: Any = None,
    apply_to: ApplyTo = "both",
    cfg: bool | None = None,
) -> ControlAttachment:
    """Attach control units to an unmodified denoiser; returns the attachment (call `.detach()` to undo)."""
    units = [units] if isinstance(units, ControlUnit) else list(units)
    return ControlAttachment(denoiser, units, scheduler=scheduler, apply_to=apply_to, cfg=cfg)


def offloaded_weights(denoiser: nn.Module) -> dict | None:
    """Under accelerate's sequential CPU offload a module's weights live in one CPU dict (its hooks' `weights_map`)
    and are loaded from it at every call, so trained weights go there; None when the module holds its weights."""
    for module in denoiser.modules():
        hook = getattr(module, "_hf_hook", None)
        for part in getattr(hook, "hooks", (hook,)):  # one hook, or accelerate's SequentialHook of several
            weights = getattr(part, "weights_map", None)
            if getattr(part, "offload", False) and weights is not None:
                return getattr(weights, "dataset", weights)  # a PrefixedDataset over the whole model's dict
    return None


def soft_weights(values: dict[str, Any]) -> dict[str, Any]:
    """A1111's soft injection: the residuals, in the method's order (shallow to deep), times 0.825^(n - 1 - k).

    With SD1.5's 13 ControlNet residuals this is exactly A1111's sequence: the mid block's residual keeps its
    weight and the shallowest, which carries the finest detail, gets 0.825^12 = 0.1.
    """
    flat = [t for value in values.values() for t in (value if isinstance(value, (tuple, list)) else (value,))]
    weights = iter(SOFT_WEIGHT ** (len(flat) - 1 - k) for k in range(len(flat)))

    def weigh(value):
        if isinstance(value, (tuple, list)):
            return type(value)(t * next(weights) for t in value)
        return value * next(weights)

    return {name: weigh(value) for name, value in values.items()}


def schedule_weight(fraction: float | None) -> float:
    """The soft weights over time for a method with one injection point (ControlNeXt): 1 at the first step, falling
    as 0.825^(12 * fraction of the schedule done), so the early steps that lay out the image follow the control as
    in balanced mode and the late steps that settle detail and colour follow the prompt (None: not known, 1)."""
    return 1.0 if fraction is None else SOFT_WEIGHT ** ((SOFT_DEPTHS - 1) * fraction)


def _map_rows(x: Any, function) -> Any:
    if isinstance(x, (tuple, list)):
        return type(x)(_map_rows(v, function) for v in x)
    return function(x)


def _repeat_rows(x: Any, repeats: int) -> Any:
    if repeats == 1:
        return x
    return _map_rows(x, lambda t: t.repeat_interleave(repeats, dim=0))


def _per_item_rows(x: torch.Tensor, per_item: int) -> torch.Tensor:
    """Values per item (items, ...) -> per row (items * per_item, ...), rows of an item consecutive."""
    return x if per_item == 1 else x.repeat_interleave(per_item, dim=0)


def _spread(x: Any, n: int, rows: int, per_item: int) -> Any:
    """n condition rows (or their features) -> `rows` rows: one per item, or one for all.

    With several rows per item (video frames) a multiple of that many rows is whole clips, one per item;
    otherwise each condition row serves consecutive rows.
    """
    if per_item == 1 or n % per_item:
        return _repeat_rows(x, rows // n)
    clips, items = n // per_item, rows // per_item
    if items % clips:
        raise ControlNextError(f"{clips} condition clips do not divide the {items} videos; give one clip per video "
                               "or one for all")
    return _map_rows(x, lambda t: t.reshape(clips, per_item, *t.shape[1:]).repeat_interleave(items // clips, dim=0)
                     .flatten(0, 1))


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


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, (tuple, list)):
        return type(a)(_add(x, y) for x, y in zip(a, b))
    return a + b


def _add_residuals(module, args: tuple, kwargs: dict, given: dict, residuals: list[dict]) -> tuple[tuple, dict]:
    """Sum the residual methods' arguments, add any the caller passed, and put them in the call."""
    for name in dict.fromkeys(name for values in residuals for name in values):
        parts = [values[name] for values in residuals if name in values]
        total = parts[0]
        for part in parts[1:]:
            total = _add(total, part)
        if given.get(name) is not None:
            total = _add(total, given[name])
        args, kwargs = set_argument(module, args, kwargs, name, total)
    return args, kwargs
