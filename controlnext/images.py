"""Reading, checking and converting images: the one place where files become tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ControlNextError


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


def prepare_condition(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Condition image -> (3, height, width) tensor in [0, 1], resized to the generation size.

    Policy: the condition is resized to cover the target and centre-cropped, so its aspect ratio is kept.
    """
    image = to_rgb(image)
    if image.size != (width, height):
        image = resize_and_crop(image, width, height)
    return pil_to_tensor(image)


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale `image` to cover (width, height), then centre-crop to exactly that size."""
    new_size, (top, left) = cover_and_crop_box(image.width, image.height, width, height)
    image = image.resize(new_size, Image.BICUBIC)
    return image.crop((left, top, left + width, top + height))


def cover_and_crop_box(image_width: int, image_height: int, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (width, height) that covers the target and the (top, left) of the centre crop `resize_and_crop` takes."""
    scale = max(width / image_width, height / image_height)
    new_size = (max(width, round(image_width * scale)), max(height, round(image_height * scale)))
    return new_size, ((new_size[1] - height) // 2, (new_size[0] - width) // 2)
