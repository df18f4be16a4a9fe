"""Requests and answers of the HTTP API (pydantic), validated before anything reaches the model.

The web UI builds the same `GenerateRequest`, so both interfaces accept exactly the same settings.
Images travel as base64 PNG (or JPEG) strings; a `data:image/...;base64,` prefix is accepted.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema, model_validator

from ..control.loading import UNET_WEIGHTS
from ..images import RESIZE_MODES
from ..pipelines.base import SCHEDULERS, TASKS

MAX_CONTROLS = 4
MAX_LORAS = 4
MAX_STEPS = 150
MAX_SIDE = 2048
MAX_IMAGES = 4
MAX_IMAGE_PIXELS = 4096 * 4096  # of an uploaded image, checked before its pixels are decoded

SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
UnetWeights = Literal[UNET_WEIGHTS]  # type: ignore[valid-type]
ResizeMode = Literal[RESIZE_MODES]  # type: ignore[valid-type]


def decode_image(value: Any) -> Image.Image:
    """A base64 PNG/JPEG string (or a PIL image, from the UI) -> a loaded PIL image."""
    if isinstance(value, Image.Image):
        return value
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
    return image


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

    control: str = Field(description="a control's name from /api/models")
    image: Base64Image
    annotator: str = Field("none", description="make the condition from `image` with this annotator; 'none' uses it as is")
    annotator_options: Options = Field(default_factory=dict, description='its options, e.g. {"low_threshold": 100}')
    scale: float | None = Field(None, ge=0, le=2, description="control strength (default: the control's recommended scale)")
    start: float = Field(0.0, ge=0, le=1, description="fraction of the schedule where control starts")
    end: float = Field(1.0, ge=0, le=1, description="fraction of the schedule where control ends")
    unet_weights: UnetWeights = Field("auto", description="how the control's trained UNet tensors are stored "
                                      "(auto: read from the tensors against the base)")

    @model_validator(mode="after")
    def _window(self) -> "ControlRequest":
        if self.start > self.end:
            raise ValueError(f"start={self.start} is after end={self.end}; need start <= end")
        return self


class LoraRequest(StrictModel):
    lora: str = Field(description="a LoRA's name from /api/models")
    weight: float = Field(1.0, ge=-2, le=2)


class GenerateRequest(StrictModel):
    """Everything one generation needs; the field names match the parameters stored in each PNG."""

    prompt: str = Field(max_length=2000, description="what to draw")
    negative_prompt: str = Field("", max_length=2000, description="what not to draw (classifier-free guidance)")
    base: str | None = Field(None, description="a base model's name from /api/models (default: the first one)")
    task: TaskName = "txt2img"
    init_image: Base64Image | None = Field(None, description="starting image for img2img and inpaint")
    mask: Base64Image | None = Field(None, description="inpainting mask (white = repaint)")
    strength: float = Field(0.75, gt=0, le=1, description="how much img2img/inpaint changes init_image")
    controls: list[ControlRequest] = Field(default_factory=list, max_length=MAX_CONTROLS)
    apply_to: Literal["both", "cond"] = Field("both", description="control both guidance halves or the conditional one")
    resize_mode: ResizeMode = Field("crop_and_resize", description="how condition images reach the image size "
                                    "(just_resize: stretched, as the official pipelines do)")
    loras: list[LoraRequest] = Field(default_factory=list, max_length=MAX_LORAS)
    steps: int = Field(20, ge=1, le=MAX_STEPS, description="denoising steps")
    guidance: float = Field(7.5, ge=0, le=30, description="classifier-free guidance scale (<= 1 disables it)")
    scheduler: SchedulerName = "unipc"
    seed: int | None = Field(None, ge=0, lt=2**32, description="random seed (default: a random one); image k uses seed + k")
    width: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8, description="default: the model's size")
    height: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8, description="default: the model's size")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)

    @model_validator(mode="after")
    def _task_inputs(self) -> "GenerateRequest":
        if self.task != "txt2img" and self.init_image is None:
            raise ValueError(f"task {self.task} needs init_image")
        if self.task == "inpaint" and self.mask is None:
            raise ValueError("task inpaint needs mask")
        return self


class GeneratedImage(BaseModel):
    image: str = Field(description="PNG, base64; its `controlnext` text chunk holds `parameters` as JSON")
    seed: int
    parameters: dict[str, Any]


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    seconds: float = Field(description="time spent generating, without waiting in the queue")


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
