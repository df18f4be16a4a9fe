"""Requests and answers of the HTTP API (pydantic), validated before anything reaches the model.

The request's fields, defaults, limits and help come from `controlnext.request` (the web's own caps on
top); the web UI builds the same `GenerateRequest`, so both interfaces accept exactly the same settings.
Images travel as base64 PNG (or JPEG) strings; a `data:image/...;base64,` prefix is accepted.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema, model_validator

from ..images import upright
from ..errors import ControlNextError
from ..request import (
    APPLY_TO,
    CONTROL_MODES,
    OFFLOADS,
    RESIZE_MODES,
    SCHEDULER_NAMES,
    TASKS,
    UNET_WEIGHTS,
    ControlSettings,
    GenerationRequest,
    LoraSettings,
    check_task_inputs,
    check_window,
    settings,
)

MAX_IMAGE_PIXELS = 4096 * 4096  # of an uploaded image, checked before its pixels are decoded

SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
ApplyTo = Literal[tuple(APPLY_TO)]  # type: ignore[valid-type]
UnetWeights = Literal[UNET_WEIGHTS]  # type: ignore[valid-type]
ResizeMode = Literal[RESIZE_MODES]  # type: ignore[valid-type]
ControlMode = Literal[CONTROL_MODES]  # type: ignore[valid-type]
Offload = Literal[OFFLOADS]  # type: ignore[valid-type]


def web_field(cls: type, name: str, **overrides) -> Any:
    """A pydantic Field with the request field's default, help text and limits (the web's caps in their place)."""
    spec = settings(cls)[name]
    options: dict[str, Any] = {"description": spec.help, **spec.web_limits()}
    if spec.kind is float:
        options["allow_inf_nan"] = False
    options.update(overrides)
    if "default" in options or "default_factory" in options:
        return Field(**options)
    if spec.factory is not None:
        return Field(default_factory=spec.factory, **options)
    return Field(... if spec.required else spec.default, **options)


def web_limit(cls: type, name: str, key: str):
    """One limit of a request field as the web applies it (e.g. the most steps a request may ask for)."""
    return settings(cls)[name].web_limits()[key]


def _valid(check, *args) -> None:
    """Run a shared check of controlnext.request; pydantic reports ValueErrors as validation errors."""
    try:
        check(*args)
    except ControlNextError as error:
        raise ValueError(str(error)) from None


def decode_image(value: Any) -> Image.Image:
    """A base64 PNG/JPEG string (or a PIL image, from the UI) -> a loaded PIL image, upright (EXIF orientation)."""
    if isinstance(value, Image.Image):
        return upright(value)
    if not isinstance(value, str):
        raise ValueError("expected an image as a base64 PNG or JPEG string")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64; send the PNG or JPEG file's bytes base64-encoded") from None
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {image.width}x{image.height} pixels is too large; at most {MAX_IMAGE_PIXELS} pixels")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise ValueError("the base64 data is not a readable PNG or JPEG image") from None
    return upright(image)


def encode_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


Base64Image = Annotated[
    Image.Image,
    PlainValidator(decode_image),
    PlainSerializer(encode_png, return_type=str),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png",
                    "description": "a PNG or JPEG file, base64-encoded"}),
]
Options = dict[str, str | int | float | bool]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ControlRequest(StrictModel):
    """One control unit: which control, its condition image, and where and how strongly it acts."""

    control: str = web_field(ControlSettings, "control", description="a control's name from /api/models")
    image: Base64Image
    annotator: str = web_field(ControlSettings, "annotator")
    annotator_options: Options = web_field(ControlSettings, "annotator_options")
    scale: float | None = web_field(ControlSettings, "scale")
    start: float = web_field(ControlSettings, "start")
    end: float = web_field(ControlSettings, "end")
    unet_weights: UnetWeights = web_field(ControlSettings, "unet_weights")
    control_mode: ControlMode = web_field(ControlSettings, "control_mode")

    @model_validator(mode="after")
    def _window(self) -> "ControlRequest":
        _valid(check_window, self.start, self.end)
        return self


class LoraRequest(StrictModel):
    lora: str = web_field(LoraSettings, "lora", description="a LoRA's name from /api/models")
    weight: float = web_field(LoraSettings, "weight")


def _request_field(name: str, **overrides) -> Any:
    return web_field(GenerationRequest, name, **overrides)


class GenerateRequest(StrictModel):
    """Everything one generation needs; the field names match the parameters stored in each PNG."""

    prompt: str = _request_field("prompt")
    negative_prompt: str = _request_field("negative_prompt")
    base: str | None = _request_field("base", description="a base model's name from /api/models (default: the first one)")
    task: TaskName = _request_field("task")
    init_image: Base64Image | None = _request_field("init_image")
    mask: Base64Image | None = _request_field("mask")
    strength: float = _request_field("strength")
    controls: list[ControlRequest] = _request_field("controls")
    apply_to: ApplyTo = _request_field("apply_to")
    resize_mode: ResizeMode = _request_field("resize_mode")
    loras: list[LoraRequest] = _request_field("loras")
    steps: int = _request_field("steps")
    guidance: float | None = _request_field("guidance")
    scheduler: SchedulerName = _request_field("scheduler")
    seed: int | None = _request_field("seed", default=None, description="random seed (default: a random one); "
                                      "image k uses seed + k")
    width: int | None = _request_field("width")
    height: int | None = _request_field("height")
    num_images: int = _request_field("num_images")
    offload: Offload | None = _request_field("offload")

    @model_validator(mode="after")
    def _task_inputs(self) -> "GenerateRequest":
        _valid(check_task_inputs, self.task, self.init_image, self.mask)
        return self


class GeneratedImage(BaseModel):
    image: str = Field(description="PNG, base64; its `controlnext` text chunk holds `parameters` as JSON")
    seed: int
    parameters: dict[str, Any]


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    seconds: float = Field(description="time spent generating, without waiting in the queue")
    notes: list[str] = Field(default_factory=list, description="warnings about the input: words or a size the model "
                             "was not trained on, a colour image given to an edge control")


class AnnotateRequest(StrictModel):
    image: Base64Image
    annotator: str = Field(description="an annotator's name from /api/models ('none' returns the image as RGB)")
    options: Options = Field(default_factory=dict)


class AnnotateResponse(BaseModel):
    image: str = Field(description="the condition image, PNG, base64")


class ModelInfo(BaseModel):
    name: str
    path: str
    source: str


class ModelsResponse(BaseModel):
    bases: list[ModelInfo]
    controls: list[ModelInfo]
    loras: list[ModelInfo]
    annotators: list[str]
    schedulers: list[str]
    tasks: list[str]


class QueueInfo(BaseModel):
    pending: int = Field(description="jobs waiting or running")
    capacity: int = Field(description="more pending jobs than this are refused with 503")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str
    device: str
    queue: QueueInfo
    loaded_pipelines: int


class ErrorResponse(BaseModel):
    error: str = Field(description="one line: what was wrong and what to do")
    detail: list[dict[str, Any]] | None = None


def describe_errors(errors: list[dict]) -> str:
    """Pydantic errors -> one line such as 'width: Input should be a multiple of 8; steps: ...'."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})")
            continue
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid"))
    return "; ".join(parts)


def public_errors(errors: list[dict]) -> list[dict]:
    """Errors without the offending input (which may be megabytes of base64) and with plain-text context."""
    def plain(key, value):
        return {k: str(v) for k, v in value.items()} if key == "ctx" else value

    return [{key: plain(key, value) for key, value in error.items() if key != "input"} for error in errors]
