"""Reading, checking and converting images: the one place where files become tensors.

Every image read from a file or from bytes goes through `open_image`: its size is checked against
`MAX_PIXELS` before its pixels are decoded, and its EXIF orientation is applied, so a portrait phone
photo is upright. torch is imported only by the functions that make tensors.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ControlNextError
from .request import RESIZE_MODES

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 8192 * 8192  # of any image read, annotated or written: 64 megapixels (a 48 MP phone photo fits)


def check_pixels(width: int, height: int, what: str = "image", hint: str = "use a smaller size") -> None:
    """Raise unless `width` x `height` is within `MAX_PIXELS`, so that no step runs out of memory."""
    if width * height > MAX_PIXELS:
        raise ControlNextError(
            f"{what} of {width}x{height} pixels is too large: at most {MAX_PIXELS:,} pixels "
            f"(8192x8192) are allowed; {hint}"
        )


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully and upright (EXIF orientation applied), keeping its mode.

    Raises a one-line error for a missing, unreadable or too large file.
    """
    path = Path(path)
    if not path.is_file():
        raise ControlNextError(f"image file not found: {path}")
    with open(path, "rb") as file:
        return open_image(file, str(path))


def open_image(source: bytes | BinaryIO, name: str = "the image") -> Image.Image:
    """Decode image bytes (or a binary file) fully: size checked first, then EXIF orientation applied."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                check_pixels(image.width, image.height, name, "make it smaller first")
                image.load()
                return upright(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ControlNextError(
            f"{name} is too large: at most {MAX_PIXELS:,} pixels (8192x8192) are allowed; make it smaller first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ControlNextError(f"cannot read {name} as an image ({error}); give a PNG or JPEG file") from None


def upright(image: Image.Image) -> Image.Image:
    """A copy of `image` turned as its EXIF orientation tag says (the tag removed); unchanged pixels otherwise."""
    try:
        return ImageOps.exif_transpose(image)
    except (ValueError, OSError, SyntaxError):  # an unreadable EXIF block: keep the pixels as stored
        return image.copy()


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Convert any mode to RGB; transparent pixels become `background` (black: 'no condition here')."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def check_size(width: int, height: int, multiple: int = 8, what: str = "image") -> None:
    """Raise unless both sides are positive multiples of `multiple`."""
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise ControlNextError(
            f"{what} size {width}x{height} is not a multiple of {multiple}; "
            f"pass --width/--height that are (e.g. {max(multiple, round(width / multiple) * multiple)}x"
            f"{max(multiple, round(height / multiple) * multiple)})"
        )


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    import torch

    array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [0, 1] -> RGB PIL image."""
    array = (tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def prepare_condition(image: Image.Image, width: int, height: int, mode: str = "crop_and_resize") -> torch.Tensor:
    """Condition image -> (3, height, width) tensor in [0, 1], brought to the generation size with `mode`.

    crop_and_resize (default) covers the target and centre-crops, keeping the aspect ratio; just_resize
    stretches with Lanczos, as diffusers' VaeImageProcessor does in the official pipelines; resize_and_fill
    fits the image inside and pads with black.
    """
    resample = Image.LANCZOS if mode == "just_resize" else Image.BICUBIC
    return pil_to_tensor(fit_image(to_rgb(image), width, height, mode, resample))


def resize_and_crop(
    image: Image.Image, width: int, height: int, resample: Image.Resampling = Image.BICUBIC
) -> Image.Image:
    """Scale `image` to cover (width, height), then centre-crop to exactly that size."""
    return fit_image(image, width, height, "crop_and_resize", resample)


def cover_and_crop_box(image_width: int, image_height: int, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (width, height) that covers the target and the (top, left) of the centre crop `resize_and_crop` takes."""
    new_size, (left, top) = fit_layout((image_width, image_height), (width, height), "crop_and_resize")
    return new_size, (top, left)


def fit_layout(size: tuple[int, int], target: tuple[int, int], mode: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """How `fit_image` brings an image of `size` to `target` (both width, height): the size it is scaled to,
    and the (left, top) offset of the target inside it (crop_and_resize) or of it inside the target
    (resize_and_fill; (0, 0) for just_resize)."""
    if mode not in RESIZE_MODES:
        raise ControlNextError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")
    (image_width, image_height), (width, height) = size, target
    if mode == "just_resize":
        return (width, height), (0, 0)
    if mode == "resize_and_fill":
        scale = min(width / image_width, height / image_height)
        inner = (max(1, min(width, round(image_width * scale))), max(1, min(height, round(image_height * scale))))
        return inner, ((width - inner[0]) // 2, (height - inner[1]) // 2)
    scale = max(width / image_width, height / image_height)
    cover = (max(width, round(image_width * scale)), max(height, round(image_height * scale)))
    return cover, ((cover[0] - width) // 2, (cover[1] - height) // 2)


def place(scaled: Image.Image, target: tuple[int, int], mode: str, offset: tuple[int, int]) -> Image.Image:
    """Finish `fit_image` on an image already scaled as `fit_layout` says: crop it, or centre it on black."""
    (width, height), (left, top) = target, offset
    if mode == "crop_and_resize" and scaled.size != target:
        return scaled.crop((left, top, left + width, top + height))
    if mode == "resize_and_fill" and scaled.size != target:
        canvas = Image.new(scaled.mode, target)
        canvas.paste(scaled, (left, top))
        return canvas
    return scaled


def resize_and_fill(
    image: Image.Image, width: int, height: int, resample: Image.Resampling = Image.BICUBIC
) -> Image.Image:
    """Scale `image` to fit inside (width, height), keeping its aspect ratio, and centre it on black."""
    return fit_image(image, width, height, "resize_and_fill", resample)


def fit_image(
    image: Image.Image,
    width: int,
    height: int,
    mode: str = "crop_and_resize",
    resample: Image.Resampling = Image.BICUBIC,
) -> Image.Image:
    """Bring `image` to exactly (width, height): cover and crop, stretch, or fit and pad with black."""
    scaled_size, offset = fit_layout(image.size, (width, height), mode)
    if image.size == (width, height):
        return image
    scaled = image if scaled_size == image.size else image.resize(scaled_size, resample)
    return place(scaled, (width, height), mode, offset)


def resize_short_side(image: Image.Image, short_side: int, resample: Image.Resampling = Image.BICUBIC) -> Image.Image:
    """Scale `image` so that its shorter side is `short_side` pixels, keeping the aspect ratio."""
    scale = short_side / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image if size == image.size else image.resize(size, resample)


def normalize_mode(image: Image.Image) -> Image.Image:
    """Bring any PIL mode to RGB, RGBA (when it carries transparency) or L (one channel)."""
    if image.mode in ("RGB", "RGBA", "L"):
        return image
    if image.mode in ("LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        array = array / 257.0 if image.mode.startswith("I") else array  # 16-bit range to 8-bit
        return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
    return image.convert("RGB")
