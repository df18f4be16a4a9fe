"""One generation as a typed request: its fields, defaults, limits and help text, in one place.

`controlnext generate` makes its flags from these fields, the web API its schema and the web UI its
defaults; `controlnext.generation.generate` runs a request and stores it, with the values it used, in
each PNG (`GenerationRequest.parameters`). Nothing here imports torch or diffusers, so a bad value is
refused in milliseconds, before any model loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ControlNextError

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_BASE = ASSETS / "base"  # the embedded default model
BUNDLED_CONTROLS = ASSETS / "controls"  # controls trained for it, one folder each
EMBEDDED = "embedded"  # how stored parameters name the embedded default base

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
}
# SD3 samples the rectified flow: its pipelines (img2img's scale_noise too) need flow-matching schedulers.
FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}
SCHEDULER_NAMES = ("auto", *SCHEDULERS, *(name for name in FLOW_SCHEDULERS if name not in SCHEDULERS))
TASKS = ("txt2img", "img2img", "inpaint")
RESIZE_MODES = ("crop_and_resize", "just_resize", "resize_and_fill")  # how a condition reaches the image size
UNET_WEIGHTS = ("auto", "absolute", "increments")  # how a control's UNet tensors are stored; auto: read from them
DTYPES = ("fp32", "fp16", "bf16")
APPLY_TO = ("both", "cond")
# A1111's control modes: "balanced", "my prompt is more important", "ControlNet is more important"
CONTROL_MODES = ("balanced", "prompt", "control")
OFFLOADS = ("model", "sequential")  # diffusers' CPU offload: whole models, or layer by layer
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance when neither the request nor a control names one
SIZE_MULTIPLE = 8  # diffusers' SD and SDXL pipelines refuse other sizes, whatever the VAE's factor
UPLOADED = "sha256:"  # prefix of an image known only by its fingerprint (uploaded to the web app)

Label = Callable[[str], str]  # a field's name as an interface shows it: "init_image" -> "--init-image"


def recommended_guidance(recommended: typing.Iterable[float | None], default: float = DEFAULT_GUIDANCE) -> float:
    """The guidance a generation uses when its request names none: the first control's recommendation (its
    control.json's "guidance", the guidance it was made for), else `default`. `recommended` holds each chosen
    control's recommendation in order, None where it names none."""
    return next((float(value) for value in recommended if value is not None), default)


def setting(help: str, default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
            short: str | None = None, metavar: str | None = None, choices: tuple | None = None, noun: str | None = None,
            cli: bool = True, record: bool = True, replay: bool = True, web: dict | None = None, **limits):
    """A request field with its help text and limits (ge, gt, le, lt, multiple_of).

    `noun` names a value of the field in errors ("unknown resize mode ..."; "": the field's label itself).
    `web`: the web server's tighter limits (its resource caps). `record=False` keeps a field out of the
    stored parameters (permissions and locations, not what was made); `replay=False` stores it without
    taking it back in `--from` (the device: where to run, not what to make); `cli=False`: no flag.
    """
    metadata = dict(help=help, short=short, metavar=metavar, choices=choices, noun=noun, cli=cli, record=record,
                    replay=replay, limits=limits, web=web or {})
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ControlSettings:
    """One control: its weights, its condition image, and where and how strongly it acts."""

    control: str = setting("control weights: a folder or file, or the name of a bundled control", short="-c",
                           metavar="PATH")
    image: Any = setting("condition image file (from Python also a PIL image)", short="-i", metavar="IMAGE")
    annotator: str = setting("make the condition from the image with this annotator ('none': use it as is)",
                             default="none", metavar="NAME")
    annotator_options: dict = setting('the annotator\'s options, e.g. {"low_threshold": 100}', factory=dict,
                                      cli=False)
    scale: float | None = setting("control strength (default: the control's recommended scale)", default=None,
                                  ge=0, web=dict(le=2))
    start: float = setting("fraction of the schedule where control starts", default=0.0, ge=0, le=1)
    end: float = setting("fraction of the schedule where control ends", default=1.0, ge=0, le=1)
    unet_weights: str = setting("how the control's trained UNet tensors are stored (auto: read from the tensors "
                                "against the base)", default="auto", choices=UNET_WEIGHTS, noun="")
    control_mode: str = setting("balanced; prompt: the prompt is more important (ControlNet's residuals weighted "
                                "0.825^k from deep to shallow; ControlNeXt's addition fading over the schedule); "
                                "control: the control is more important (it acts on the conditional half of guidance "
                                "only, so guidance amplifies it; ControlNet keeps the weights of prompt, as A1111)",
                                default="balanced", choices=CONTROL_MODES)


@dataclass
class LoraSettings:
    """A style LoRA and its weight."""

    lora: str = setting("a LoRA file (diffusers or kohya safetensors)")
    weight: float = setting("its weight", default=1.0, web=dict(ge=-2, le=2))

    @classmethod
    def parse(cls, text: str) -> "LoraSettings":
        """'PATH[:WEIGHT]' (a path that exists as given keeps any ':' in it) -> LoraSettings."""
        if ":" not in text or Path(text).exists():
            return cls(text)
        path, _, weight = text.rpartition(":")
        try:
            return cls(path, float(weight))
        except ValueError:
            raise ControlNextError(f"--lora {text}: the weight after ':' must be a number") from None

    def __str__(self) -> str:
        return f"{self.lora}:{self.weight}"


@dataclass
class GenerationRequest:
    """Everything one generation needs; `parameters()` is what each of its PNGs stores."""

    prompt: str = setting("what to draw", short="-p", metavar="TEXT", web=dict(max_length=2000))
    negative_prompt: str = setting("what not to draw (used by classifier-free guidance)", default="", short="-n",
                                   metavar="TEXT", web=dict(max_length=2000))
    base: str | None = setting("base model: diffusers folder, .safetensors file or cached model id (default: the "
                               "embedded shapes model)", default=None, metavar="MODEL")
    base_config: str | None = setting("diffusers folder whose configs a single-file base uses", default=None,
                                      metavar="FOLDER")
    controls: list[ControlSettings] = setting("the controls, each with its condition image", factory=list,
                                              web=dict(max_length=4))
    variant: str | None = setting("official ControlNeXt layout of a release file (sdxl, sd15, sd15-v1, svd; "
                                  "default: detected)", default=None, metavar="NAME")
    apply_to: str = setting("apply control to both classifier-free guidance halves (official) or the conditional "
                            "one", default="both", choices=APPLY_TO)
    resize_mode: str = setting("how condition images reach the image size: crop_and_resize keeps the aspect ratio, "
                               "just_resize stretches (as the official pipelines do), resize_and_fill pads with black",
                               default="crop_and_resize", choices=RESIZE_MODES)
    loras: list[LoraSettings] = setting("style LoRAs with their weights", factory=list, web=dict(max_length=4))
    task: str = setting("what the base pipeline does", default="txt2img", choices=TASKS)
    init_image: Any = setting("starting image for img2img and inpaint", default=None, metavar="IMAGE")
    mask: Any = setting("inpainting mask (white = repaint)", default=None, metavar="IMAGE")
    strength: float = setting("how much img2img/inpaint changes the init image", default=0.75, gt=0, le=1)
    steps: int = setting("denoising steps", default=20, ge=1, web=dict(le=150))
    guidance: float | None = setting("classifier-free guidance scale, <= 1 disables it (default: the first control's "
                                     f"recommended guidance, else {DEFAULT_GUIDANCE:g})", default=None, ge=0,
                                     web=dict(le=30))
    scheduler: str = setting("sampler (auto: the base's own when it is one of these, else unipc; an SD3 base "
                             "takes euler or heun, on the flow)", default="auto", choices=SCHEDULER_NAMES)
    seed: int | None = setting("random seed; image k of a batch uses seed + k (None: one at random)", default=0,
                               ge=0, lt=2**32)
    width: int | None = setting(f"image width, a multiple of {SIZE_MULTIPLE} (default: the model's size)",
                                default=None, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE, web=dict(ge=64, le=2048))
    height: int | None = setting(f"image height, a multiple of {SIZE_MULTIPLE} (default: the model's size)",
                                 default=None, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE, web=dict(ge=64, le=2048))
    num_images: int = setting("images to generate", default=1, ge=1, record=False, web=dict(le=4))
    device: str = setting("cpu, cuda, cuda:1, mps or auto (CUDA, then MPS, then the CPU)", default="auto",
                          metavar="DEVICE", replay=False)
    dtype: str | None = setting("precision (default: fp32 on the CPU, fp16 on a GPU)", default=None, choices=DTYPES)
    without_t5: bool = setting("leave out SD3's third text encoder (T5), as diffusers allows", default=False)
    offload: str | None = setting("keep the weights in CPU memory and move them to the device as they run: whole "
                                  "models (model) or layer by layer (sequential: least memory, slowest); the images "
                                  "are the same (default: no offload)", default=None, choices=OFFLOADS, replay=False)
    allow_pickle: bool = setting("allow reading pickled .bin/.pth weights (trusted files only)", default=False,
                                 record=False)
    allow_download: bool = setting("allow downloading a base model id from the Hugging Face Hub", default=False,
                                   record=False)
    cache_dir: str | None = setting("Hugging Face cache folder to look for model ids in", default=None,
                                    metavar="FOLDER", record=False)

    def check(self, label: Label = str) -> "GenerationRequest":
        """Raise a one-line ControlNextError, naming fields with `label`, unless every value can be used."""
        check_fields(self, label)
        for k, control in enumerate(self.controls):
            where = f" (control {k + 1})" if len(self.controls) > 1 else ""
            check_fields(control, lambda name: label(name) + where)
            check_window(control.start, control.end, lambda name: label(name) + where)
            if not Path(resolve_control(control.control)).exists():
                raise ControlNextError(f"control weights not found: {control.control}")
            check_image_file(control.image)
        for lora in self.loras:
            check_fields(lora, lambda name: label("lora") + (" weight" if name == "weight" else ""))
            if not Path(lora.lora).exists():
                raise ControlNextError(f"LoRA file not found: {lora.lora}")
        check_task_inputs(self.task, self.init_image, self.mask, label)
        for image in (self.init_image, self.mask):
            check_image_file(image)
        if self.dtype == "fp16" and self.device == "cpu":
            raise ControlNextError(f"fp16 does not run on a CPU; use {label('dtype')} fp32 (or bf16) there")
        return self

    def parameters(self) -> dict:
        """The request as a PNG stores it: JSON values, images named by their path (or fingerprint)."""
        from . import __version__

        stored = {"version": __version__}
        for name, spec in settings(GenerationRequest).items():
            if spec.record:
                stored[name] = _stored(name, getattr(self, name))
        if self.task == "txt2img":
            stored["strength"] = None  # not used
        return stored

    @classmethod
    def values_from_parameters(cls, stored: dict) -> dict:
        """The field values that parameters stored by `parameters()` give back (keys they lack stay out)."""
        specs, values = settings(cls), {}
        for name, value in stored.items():
            spec = specs.get(name)
            if spec is None or not spec.record or not spec.replay or value is None and name == "strength":
                continue
            if name == "base":
                value = None if value == EMBEDDED else value
            elif name == "controls":
                known = settings(ControlSettings)
                value = [ControlSettings(**{k: v for k, v in c.items() if k in known}) for c in value]
            elif name == "loras":
                value = [LoraSettings.parse(text) for text in value]
            values[name] = value
        return values


# -- the fields, for the interfaces that read them ---------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """A request field as interfaces read it: its type, default, help text and limits."""

    name: str
    kind: type  # int, float, str, bool, list, dict, or object (an image)
    optional: bool  # None is a valid value
    default: Any  # dataclasses.MISSING when the field is required
    factory: Callable[[], Any] | None
    help: str
    limits: dict
    web: dict
    choices: tuple | None
    noun: str | None
    short: str | None
    metavar: str | None
    cli: bool
    record: bool
    replay: bool

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING and self.factory is None

    def web_limits(self) -> dict:
        """The limits with the web server's tighter ones in their place."""
        return {**self.limits, **self.web}


def settings(cls: type) -> dict[str, Setting]:
    """The fields of a request dataclass (GenerationRequest, ControlSettings, LoraSettings) by name."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = [k for k in (typing.get_args(hint) if union else (hint,)) if k is not type(None)]
        kind = typing.get_origin(kinds[0]) or kinds[0] if len(kinds) == 1 and kinds[0] is not Any else object
        meta = f.metadata
        factory = None if f.default_factory is dataclasses.MISSING else f.default_factory
        out[f.name] = Setting(
            f.name, kind, (union and len(kinds) < len(typing.get_args(hint))) or f.default is None, f.default, factory,
            meta["help"], meta["limits"], meta["web"], meta["choices"], meta["noun"], meta["short"], meta["metavar"],
            meta["cli"], meta["record"], meta["replay"],
        )
    return out


# -- checks shared by the interfaces --------------------------------------------------------------------

def check_fields(obj, label: Label = str) -> None:
    """Check each field of a request dataclass against its type, choices and limits."""
    for name, spec in settings(type(obj)).items():
        check_value(spec, getattr(obj, name), label(name))


def check_value(spec: Setting, value: Any, where: str) -> None:
    if value is None:
        if spec.optional:
            return
        raise ControlNextError(f"{where} is required")
    if spec.kind in (int, float):
        number = (int, float) if spec.kind is float else int
        if isinstance(value, bool) or not isinstance(value, number):
            raise ControlNextError(f"{where} {value!r}: must be a {'number' if spec.kind is float else 'whole number'}")
        if not math.isfinite(value):
            raise ControlNextError(f"{where} {value}: must be a finite number")
    elif spec.kind in (str, bool, list, dict) and not isinstance(value, spec.kind):
        raise ControlNextError(f"{where} {value!r}: must be {spec.kind.__name__}")
    if spec.choices and value not in spec.choices:
        noun = spec.name.replace("_", " ") if spec.noun is None else spec.noun
        unknown = f"{where}: unknown {noun} {value!r}" if noun else f"unknown {where} {value!r}"
        raise ControlNextError(f"{unknown}; choose one of {', '.join(spec.choices)}")
    limits = spec.limits
    for key, holds, words in (("ge", operator.ge, "at least"), ("gt", operator.gt, "more than"),
                              ("le", operator.le, "at most"), ("lt", operator.lt, "less than")):
        if key in limits and not holds(value, limits[key]):
            raise ControlNextError(f"{where} {value}: must be {words} {limits[key]}")
    multiple = limits.get("multiple_of")
    if multiple and value % multiple:
        below = max(multiple, value // multiple * multiple)
        raise ControlNextError(f"{where} {value}: must be a multiple of {multiple} (e.g. {below} or {below + multiple})")


def check_window(start: float, end: float, label: Label = str) -> None:
    if start > end:
        raise ControlNextError(f"{label('start')} {start:g} is after {label('end')} {end:g}; need start <= end")


def check_task_inputs(task: str, init_image: Any, mask: Any, label: Label = str) -> None:
    if task != "txt2img" and init_image is None:
        raise ControlNextError(f"{label('task')} {task} needs {label('init_image')}")
    if task == "inpaint" and mask is None:
        raise ControlNextError(f"{label('task')} inpaint needs {label('mask')}")


def check_image_file(image: Any) -> None:
    """A path must name a file; an uploaded image's fingerprint cannot stand in for it."""
    if not isinstance(image, (str, Path)):
        return
    if str(image).startswith(UPLOADED):
        raise ControlNextError(f"image {image} was uploaded to the web app, which stores only its fingerprint; "
                               "give the image file")
    if not Path(image).is_file():
        raise ControlNextError(f"image file not found: {image}")


def resolve_control(name: str) -> str:
    """A bundled control's name (e.g. 'canny') -> its folder; anything else is a path."""
    bundled = BUNDLED_CONTROLS / name
    return str(bundled) if not Path(name).exists() and bundled.is_dir() else name


def describe_image(image: Any) -> str | None:
    """How parameters name an image: its path, or the fingerprint of its pixels."""
    if image is None or isinstance(image, (str, Path)):
        return None if image is None else str(image)
    return UPLOADED + hashlib.sha256(image.tobytes()).hexdigest()[:16]


def _stored(name: str, value: Any) -> Any:
    if name == "base":
        return EMBEDDED if value is None else str(value)
    if name in ("init_image", "mask"):
        return describe_image(value)
    if name == "controls":
        recorded = [n for n, spec in settings(ControlSettings).items() if spec.record]
        return [{n: describe_image(c.image) if n == "image" else getattr(c, n) for n in recorded} for c in value]
    if name == "loras":
        return [str(lora) for lora in value]
    return value

def configured_size(folder: Path) -> tuple[int, int] | None:
    """The size a diffusers base folder generates at by default, from its denoiser's and VAE's configs (None:
    no such configs)."""
    denoiser = next((folder / name / "config.json" for name in ("unet", "transformer")
                     if (folder / name / "config.json").is_file()), None)
    try:
        sample_size = json.loads(denoiser.read_text())["sample_size"]
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (AttributeError, OSError, ValueError, KeyError):
        return None
    side = sample_size * 2 ** (len(vae["block_out_channels"]) - 1)
    return side, side
