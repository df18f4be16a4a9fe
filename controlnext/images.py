"""Reading, checking and converting images: the one place where files become tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ControlNextError
from .request import RESIZE_MODES


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully, keeping its mode; raise a one-line error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ControlNextError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ControlNextError(f"cannot read {path} as an image ({error}); give a PNG or JPEG file") from None


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
    new_size, (top, left) = cover_and_crop_box(image.width, image.height, width, height)
    image = image.resize(new_size, resample)
    return image.crop((left, top, left + width, top + height))


def cover_and_crop_box(image_width: int, image_height: int, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (width, height) that covers the target and the (top, left) of the centre crop `resize_and_crop` takes."""
    scale = max(width / image_width, height / image_height)
    new_size = (max(width, round(image_width * scale)), max(height, round(image_height * scale)))
    return new_size, ((new_size[1] - height) // 2, (new_size[0] - width) // 2)


def resize_and_fill(
    image: Image.Image, width: int, height: int, resample: Image.Resampling = Image.BICUBIC
) -> Image.Image:
    """Scale `image` to fit inside (width, height), keeping its aspect ratio, and centre it on black."""
    scale = min(width / image.width, height / image.height)
    new_size = (max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale))))
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(image.resize(new_size, resample), ((width - new_size[0]) // 2, (height - new_size[1]) // 2))
    return canvas


def fit_image(
    image: Image.Image,
    width: int,
    height: int,
    mode: str = "crop_and_resize",
    resample: Image.Resampling = Image.BICUBIC,
) -> Image.Image:
    """Bring `image` to exactly (width, height): cover and crop, stretch, or fit and pad with black."""
    if mode not in RESIZE_MODES:
        raise ControlNextError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")
    if image.size == (width, height):
        return image
    if mode == "just_resize":
        return image.resize((width, height), resample)
    if mode == "resize_and_fill":
        return resize_and_fill(image, width, height, resample)
    return resize_and_crop(image, width, height, resample)


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
