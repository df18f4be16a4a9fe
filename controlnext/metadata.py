"""Generation parameters stored inside PNG files, so that any image can be made again."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import BinaryIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "controlnext"


def save_with_parameters(image: Image.Image, target: str | Path | BinaryIO, params: dict) -> None:
    """Write `image` as PNG to a path or binary file, with `params` as JSON in a `controlnext` text chunk."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(params))
    image.save(target, format="PNG", pnginfo=info)


def png_with_parameters(image: Image.Image, params: dict) -> bytes:
    """The PNG file `save_with_parameters` would write, as bytes."""
    buffer = io.BytesIO()
    save_with_parameters(image, buffer, params)
    return buffer.getvalue()


def read_parameters(source: str | Path | BinaryIO) -> dict:
    """The parameters stored in a PNG written by `save_with_parameters` (a path or a binary file)."""
    with Image.open(source) as image:
        return json.loads(image.text[PARAMETERS_KEY])
