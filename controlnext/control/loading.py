"""Saving and loading controls: our format, the official ControlNeXt release layouts, and ControlNets.

Our format is a folder: the module's `config.json` + `diffusion_pytorch_model.safetensors` (diffusers
save_pretrained), `control.json` (method, variant, how the base tensors are stored, the recommended scale
and classifier-free guidance) and, when base weights were trained, `unet.safetensors` with only those
tensors. The official layout is a module file (`controlnet.safetensors` or `.bin`) beside a UNet file of
trained tensors, absolute or as increments whatever its name says, possibly in LDM key names; which of the
two is read from the tensors against the base they attach to. A ControlNet is a diffusers ControlNet
folder (ours adds `control.json`) or an original single-file checkpoint.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..denoisers import family
from ..errors import ControlNextError
from ..models import VARIANTS, ControlNet, ControlNeXtModel, SD3ControlNet
from ..request import UNET_WEIGHTS  # how a UNet file's tensors are read; auto: from the tensors
from .attach import check_fits

RECOMMENDED = ("scale", "guidance")  # settings a control.json may recommend, each a number >= 0
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
MODULE_FILES = ("controlnet.safetensors", "controlnext.safetensors", "controlnet.bin", "controlnext.bin")
UNET_FILES = (
    "unet.safetensors", "unet_weight_increasements.safetensors", "unet_weight_increments.safetensors",
    "unet.bin", "unet_weight_increasements.bin", "unet_weight_increments.bin",
)

# Recommended scale of the official releases, by layout and the condition their name gives (None: any).
RELEASE_SCALES: dict[tuple[str, str | None], float] = {
    ("sdxl", "canny"): 0.35,
    ("sdxl", "depth"): 1.0,
    ("sd15", None): 0.35,  # the SD1.5 training recipe
}


@dataclass
class LoadedControl:
    """A control ready to attach: its model, the base tensors it trained, and its recommended scale."""

    model: nn.Module
    method: str = "controlnext"
    unet_weights: dict[str, torch.Tensor] | None = None  # absolute values, diffusers key names
    scale: float = 1.0
    source: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def guidance(self) -> float | None:
        """The classifier-free guidance the control is meant for (its control.json's "guidance"), if it names one."""
        value = self.metadata.get("guidance")
        return None if value is None else float(value)


# -- tensors files ---------------------------------------------------------------------------------

def read_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a safetensors file (or, with allow_pickle, a torch pickle read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ControlNextError(f"weights file not found: {path}")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ControlNextError(
                f"{path.name} is a pickled file, which can run code when read; convert it to .safetensors "
                "or pass --allow-pickle if you trust its source"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for corrupt or unsafe pickles
            raise ControlNextError(f"cannot read {path} as torch weights ({type(error).__name__}); is it corrupt?") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ControlNextError(f"{path} does not hold a flat dictionary of tensors")
        return data
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ControlNextError(f"cannot read {path} as safetensors ({error}); is it corrupt or truncated?") from None


def tensor_names(path: Path) -> list[str] | None:
    """The tensor names of a .safetensors file, read from its header; None for other files."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as weights:
            return list(weights.keys())
    except (SafetensorError, OSError) as error:
        raise ControlNextError(f"cannot read {path} as safetensors ({error}); is it corrupt or truncated?") from None


# -- LDM (original Stable Diffusion) key names -------------------------------------------------------

def ldm_to_diffusers_unet_keys(tensors: dict[str, torch.Tensor], unet_config) -> dict[str, torch.Tensor]:
    """Rename LDM UNet keys (input_blocks/middle_block/output_blocks) of attention layers to diffusers names.

    Covers what ControlNeXt trains (tensors inside the transformer blocks); other keys raise an error.
    """
    per_block = unet_config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    out = {}
    for key, value in tensors.items():
        name = key.removeprefix("model.diffusion_model.")
        if not re.match(r"(input_blocks|middle_block|output_blocks)\.", name):
            out[name] = value
            continue
        match = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.1\.(.+)", name) or re.match(
            r"(middle_block)\.()1\.(.+)", name)
        if not match:
            raise ControlNextError(f"cannot convert LDM key {key!r}: only attention layers are supported")
        kind, index, rest = match.groups()
        if kind == "middle_block":
            out[f"mid_block.attentions.0.{rest}"] = value
        elif kind == "input_blocks":
            block, layer = divmod(int(index) - 1, per_block + 1)
            out[f"down_blocks.{block}.attentions.{layer}.{rest}"] = value
        else:
            block, layer = divmod(int(index), per_block + 1)
            out[f"up_blocks.{block}.attentions.{layer}.{rest}"] = value
    return out


# -- ControlNeXt -------------------------------------------------------------------------------------

def detect_variant(module_tensors: dict[str, torch.Tensor], unet, unet_keys=()) -> str:
    """Name the official configuration a module file follows, from its keys, the UNet file's keys and the base.

    The v2 layouts share their keys; the base tells SDXL (text-time embedding) and SVD (a spatio-temporal
    UNet, or temporal layers among the UNet file's keys) from SD1.5.
    """
    if "embedding.0.weight" not in module_tensors:
        return "sd15-v1"
    kind = family(unet) if unet is not None else None
    if kind == "svd" or any("temporal" in k for k in unet_keys):
        return "svd"
    return "sdxl" if kind == "sdxl" else "sd15"


def release_scale(variant: str, *names: str) -> tuple[float, str | None]:
    """The recommended scale of an official release and the condition its file or folder name gives, if any."""
    condition = next((c for name in names for c in ("canny", "depth") if c in name.lower()), None)
    scale = RELEASE_SCALES.get((variant, condition), RELEASE_SCALES.get((variant, None), 1.0))
    return scale, condition


def check_unet_weights(unet, weights: dict[str, torch.Tensor], source: str) -> None:
    """Raise unless every trained tensor names a parameter of `unet` with the same shape."""
    if unet is None:
        return
    params = dict(unet.named_parameters())
    for name, value in weights.items():
        if name not in params:
            raise ControlNextError(f"{source} changes UNet weight {name!r}, which this base model lacks; "
                                   "use the base model the control was trained for")
        if params[name].shape != value.shape:
            raise ControlNextError(f"{source}: UNet weight {name} is {tuple(value.shape)} but the base has "
                                   f"{tuple(params[name].shape)}; use the base model the control was trained for")


def absolute_weights(unet, weights: dict[str, torch.Tensor], increments: bool) -> dict[str, torch.Tensor]:
    """The trained tensors as weights: increments are added in the base's precision (cast to the run's after)."""
    if not increments:
        return weights
    if unet is None:
        raise ControlNextError("weight increments need the base UNet to add them to")
    params = dict(unet.named_parameters())
    return {name: params[name].detach() + delta.to(params[name].device, params[name].dtype) for name, delta in weights.items()}


def base_share(unet, weights: dict[str, torch.Tensor]) -> float:
    """How much of the base weights a UNet file holds: sum <F, B> / sum |B|^2 over its tensors F and the base's B.

    Absolute weights are the base plus a change, increments the change alone; a change not aligned with the
    base gives about 1 for the first and about 0 for the second, whatever its size. Above 1/2 exactly when
    the file is closer to the base than to zero (|F - B| < |F|).
    """
    params = dict(unet.named_parameters())
    overlap = energy = 0.0
    for name, value in weights.items():
        base = params[name].detach().float()
        overlap += float((value.to(base.device, torch.float32) * base).sum())
        energy += float(base.square().sum())
    return overlap / energy if energy else 1.0  # a zero base reads the same either way


def unet_weights_kind(unet, weights: dict[str, torch.Tensor], source: str) -> str:
    """Whether a UNet file holds "absolute" weights or "increments", from its base_share; one line if unclear."""
    share = base_share(unet, weights)
    if share >= 0.75:
        return "absolute"
    if share <= 0.25:
        return "increments"
    raise ControlNextError(
        f"{source} is neither close to this base's weights nor small next to them (it holds {share:.2f} of them; "
        "absolute weights hold about 1, increments about 0): pass --unet-weights absolute or increments"
    )


def _resolve_unet_weights(unet, weights: dict[str, torch.Tensor], mode: str, source: str,
                          recorded: str | None = None) -> dict[str, torch.Tensor]:
    """A UNet file's tensors as absolute weights; `mode` "auto" reads the kind from the tensors against the base.

    Without a base, "auto" takes the kind a control.json records (`recorded`), if any.
    """
    if mode == "auto" and unet is not None:
        mode = unet_weights_kind(unet, weights, source)
    elif mode == "auto":
        if recorded not in ("absolute", "increments"):
            raise ControlNextError(f"{source}: telling absolute weights from increments needs the base model; "
                                   "load it with the base, or pass --unet-weights absolute or increments")
        mode = recorded
    return absolute_weights(unet, weights, mode == "increments")


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _find_named(folder: Path, word: str, other: str) -> Path | None:
    """The one weights file whose name contains `word` but not `other`: converted releases keep their own
    names (e.g. controlnext-svd_v2-controlnet-fp16.safetensors beside controlnext-svd_v2-unet-fp16.safetensors)."""
    found = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", *PICKLE_SUFFIXES)
             and word in p.name.lower() and other not in p.name.lower()]
    return found[0] if len(found) == 1 else None


def release_module_file(folder: Path) -> Path | None:
    """The module file of an official release folder: a release name, else the one file naming "controlnet"."""
    return _find(folder, MODULE_FILES) or _find_named(folder, "controlnet", "unet")


def release_unet_file(folder: Path) -> Path | None:
    """The UNet file of an official release folder: a release name, else the one file naming "unet"."""
    return _find(folder, UNET_FILES) or _find_named(folder, "unet", "controlnet")


def load_controlnext(
    path: str | Path,
    unet=None,
    *,
    variant: str | None = None,
    unet_file: str | Path | None = None,
    unet_weights: str = "auto",
    allow_pickle: bool = False,
) -> LoadedControl:
    """Load a ControlNeXt control from our folder format, an official release folder, or a module file.

    `unet_weights` says how the UNet file's tensors are stored: "absolute", "increments", or "auto" to read
    it from the tensors against `unet`'s weights. An official release gets its recommended scale where its
    layout and name tell it; a control.json beside the release files may state "scale" and "unet_weights".
    """
    path = Path(path)
    if not path.exists():
        raise ControlNextError(f"control weights not found: {path}")
    if unet_weights not in UNET_WEIGHTS:
        raise ControlNextError(f"unknown --unet-weights {unet_weights!r}; use one of {', '.join(UNET_WEIGHTS)}")
    recorded = _read_control_json(path) if path.is_dir() else {}
    ours = path.is_dir() and (path / "config.json").is_file()
    if unet_file is None and path.is_dir():
        unet_file = _find(path, ("unet.safetensors",)) if ours else release_unet_file(path)
    unet_file = Path(unet_file) if unet_file is not None else None
    weights = read_tensors(unet_file, allow_pickle) if unet_file is not None else {}
    if ours:
        metadata = recorded
        try:
            model = ControlNeXtModel.from_pretrained(path)
        except (OSError, ValueError, RuntimeError) as error:
            raise ControlNextError(f"cannot load the ControlNeXt module in {path}: {str(error).splitlines()[0]}") from None
    else:
        module_file = path if path.is_file() else release_module_file(path)
        if module_file is None:
            raise ControlNextError(f"no ControlNeXt module in {path}; expected config.json or one of {', '.join(MODULE_FILES)}")
        tensors = read_tensors(module_file, allow_pickle)
        variant = variant or recorded.get("variant") or detect_variant(tensors, unet, weights)
        if variant not in VARIANTS:
            raise ControlNextError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        model = ControlNeXtModel.from_variant(variant)
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except RuntimeError:  # same names, other shapes
            missing, unexpected = ["(tensor shapes differ)"], []
        if missing or unexpected:
            raise ControlNextError(
                f"{module_file.name} does not match the {variant} layout (missing {len(missing)}, unexpected "
                f"{len(unexpected)} keys, e.g. {(missing or unexpected)[0]}); pass the right --variant"
            )
        scale, condition = release_scale(variant, module_file.stem, module_file.parent.name)
        metadata = {"scale": scale, **({"condition": condition} if condition else {}), **recorded, "variant": variant}
    check_fits(model, unet, str(path))

    trained = None
    if unet_file is not None:
        if unet is not None and any(re.match(r"(model\.diffusion_model\.)?(input|middle|output)_block", k) for k in weights):
            weights = ldm_to_diffusers_unet_keys(weights, unet.config)
        check_unet_weights(unet, weights, str(unet_file))
        stated = metadata.get("unet_weights") if path.is_dir() and unet_file.parent == path else None
        trained = _resolve_unet_weights(unet, weights, unet_weights, str(unet_file), stated)
    return LoadedControl(model.eval(), "controlnext", trained, float(metadata.get("scale", 1.0)), str(path), metadata)


def recommendations(path: str | Path) -> dict[str, float]:
    """What a control folder's control.json recommends ("scale", "guidance"), checked; {} where it says nothing."""
    path = Path(path)
    recorded = _read_control_json(path) if path.is_dir() else {}
    return {key: float(recorded[key]) for key in RECOMMENDED if recorded.get(key) is not None}


def _read_control_json(folder: Path) -> dict:
    """The control.json of a control folder, else {}."""
    file = folder / "control.json"
    if not file.is_file():
        return {}
    try:
        recorded = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ControlNextError(f"{file} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(recorded, dict):
        raise ControlNextError(f"{file} must hold a JSON object, not {type(recorded).__name__}")
    for key in RECOMMENDED:
        value = recorded.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ControlNextError(f'{file}: "{key}" must be a number >= 0, not {value!r}; correct or remove it')
    return recorded


def save_controlnext(
    path: str | Path,
    model: ControlNeXtModel,
    unet_weights: dict[str, torch.Tensor] | None = None,
    *,
    base_unet=None,
    increments: bool = False,
    layout: str = "ours",
    metadata: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save a ControlNeXt control; `layout="official"` writes the release layout (controlnet + unet files).

    `dtype` stores every tensor in that precision (increments are taken first, in the weights' own).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in (unet_weights or {}).items()}
    if increments and weights:
        if base_unet is None:
            raise ValueError("saving increments needs the base UNet")
        params = dict(base_unet.named_parameters())
        weights = {k: v - params[k].detach().cpu().to(v.dtype) for k, v in weights.items()}
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
        model = _cast_copy(model, dtype)
    if layout == "official":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "controlnet.safetensors"))
        if weights:
            name = "unet_weight_increasements.safetensors" if increments else "unet.safetensors"
            save_file(weights, str(path / name))
        return path
    if layout != "ours":
        raise ValueError(f"unknown layout {layout!r}; use 'ours' or 'official'")
    _save_model(model, path)
    if weights:
        save_file(weights, str(path / "unet.safetensors"))
    variant = {"variant": model.official_variant} if model.official_variant else {}
    info = {"method": "controlnext", **variant, "unet_weights": "increments" if increments else "absolute", **(metadata or {})}
    (path / "control.json").write_text(json.dumps(info, indent=2))
    return path


def _save_model(model: nn.Module, path: Path) -> None:
    """diffusers' save_pretrained, without the folder a loaded model came from (a local path, not the control's)."""
    model.save_pretrained(path, safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    if config.pop("_name_or_path", None) is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` in `dtype`, for saving; loading casts back (diffusers' from_pretrained gives fp32)."""
    if next(model.parameters()).dtype == dtype:
        return model
    return nn.Module.to(copy.deepcopy(model), dtype)  # nn.Module's: diffusers' own warns about fp32-kept modules


# -- ControlNet ----------------------------------------------------------------------------------------

def is_diffusers_controlnet(folder: Path) -> bool:
    """True for a folder whose config.json is a diffusers ControlNetModel's or SD3ControlNetModel's."""
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") in CONTROLNET_CLASSES


# diffusers' ControlNet classes -> ours (the same network with the attach interface)
CONTROLNET_CLASSES = {"ControlNetModel": ControlNet, "SD3ControlNetModel": SD3ControlNet}


def load_controlnet(
    path: str | Path,
    unet=None,
    *,
    config: str | Path | None = None,
    allow_pickle: bool = False,
    unet_weights: str = "auto",
    variant: str | None = None,
) -> LoadedControl:
    """Load a ControlNet from our folder, a diffusers ControlNet folder, or an original single file.

    A single file needs its architecture: `config` (a diffusers ControlNet folder, or a base model's
    UNet folder), else the base `unet`'s config, else whatever diffusers finds offline in the HF cache.
    `unet_weights` and `variant` are accepted for the common interface; a ControlNet changes no base
    weights and has no release layouts.
    """
    if variant is not None:
        raise ControlNextError(f"--variant {variant} names a ControlNeXt release layout, but {path} is a ControlNet")
    path = Path(path)
    if not path.exists():
        raise ControlNextError(f"control weights not found: {path}")
    metadata: dict = {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ControlNextError(f"no ControlNet in {path}: expected config.json beside the weights")
        metadata = _read_control_json(path)
        try:
            cls = CONTROLNET_CLASSES.get(json.loads((path / "config.json").read_text()).get("_class_name"), ControlNet)
            model = cls.from_pretrained(path, use_safetensors=None if allow_pickle else True)
        except (OSError, ValueError, RuntimeError) as error:
            hint = "" if allow_pickle else " (pickled weights need --allow-pickle)"
            raise ControlNextError(f"cannot load the ControlNet in {path}{hint}: {str(error).splitlines()[0]}") from None
    else:
        model = _controlnet_from_single_file(path, unet, config, allow_pickle)
    check_fits(model, unet, str(path))
    return LoadedControl(model.eval(), "controlnet", None, float(metadata.get("scale", 1.0)), str(path), metadata)


def _controlnet_from_single_file(path: Path, unet, config, allow_pickle: bool) -> ControlNet:
    checkpoint = read_tensors(path, allow_pickle)
    with tempfile.TemporaryDirectory(prefix="controlnext-config-") as scratch:
        if config is not None:
            config = Path(config)
            if not (config / "config.json").is_file() and (config / "unet" / "config.json").is_file():
                config = config / "unet"  # a whole pipeline folder: its UNet describes the ControlNet
            if not (config / "config.json").is_file():
                raise ControlNextError(f"{config} has no config.json; pass a diffusers ControlNet folder or a UNet folder")
        elif unet is not None:
            unet.save_config(scratch)  # the ControlNet copies the base encoder: the UNet's config describes it
            config = scratch
        try:
            model = ControlNet.from_single_file(
                checkpoint, config=None if config is None else str(config), local_files_only=True)
        except Exception as error:  # diffusers raises many types for a missing config or mismatched keys
            reason = (str(error).splitlines() or [""])[0].split(". ")[0]
            raise ControlNextError(
                f"cannot build a ControlNet from {path.name} ({type(error).__name__}: {reason}); pass "
                "config=<a diffusers ControlNet folder or the base model's unet folder> that matches the file"
            ) from None
    if any(p.is_meta for p in model.parameters()):
        raise ControlNextError(f"{path.name} lacks weights the given config needs; pass the config it was made with")
    return model


def save_controlnet(path: str | Path, model: ControlNet, *, metadata: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Save a ControlNet in our format: a diffusers ControlNet folder plus control.json; `dtype`: stored precision."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = _cast_copy(model, dtype)
    _save_model(model, path)
    (path / "control.json").write_text(json.dumps({"method": "controlnet", **(metadata or {})}, indent=2))
    return path


def load_control(path: str | Path, unet=None, *, method: str | None = None, **options) -> LoadedControl:
    """Load a control of any registered method: the argument, else `control.json`, else recognised from the files.

    Options the method's loader does not take are dropped when left at None or False, else an error.
    """
    from ..methods import METHODS, control_method, get_method

    path = Path(path)
    if not path.exists():
        raise ControlNextError(f"control weights not found: {path}")
    method = method or control_method(path)
    if method is None:
        raise ControlNextError(f"no control in {path}: none of the methods ({', '.join(METHODS)}) recognises its "
                               "files; expected our folder (control.json), an official ControlNeXt release or a "
                               "diffusers ControlNet")
    loader = get_method(method).load
    parameters = inspect.signature(loader).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    given = {name: value for name, value in options.items() if takes_any or name in parameters}
    unused = [name for name, value in options.items() if name not in given and value not in (None, False)]
    if unused:
        raise ControlNextError(f"{', '.join(unused)} does not apply to a {method} control ({path})")
    return loader(path, unet, **given)
