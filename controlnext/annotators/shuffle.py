"""Content shuffle: the image's colours and textures rearranged by a smooth random warp (seeded)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..errors import ControlNextError
from .arrays import condition_image, rgb_array


def content_shuffle(image: Image.Image, *, seed: int = 0, cell_size: float = 0.5) -> Image.Image:
    """Shuffle content: every pixel is read from a place given by a smooth random field over the image.

    The field is uniform noise on a coarse grid (cells of `cell_size` times the short side) upsampled
    with a cubic filter, so patches keep local texture while the layout is lost, as shuffle controls
    expect. The same `seed` gives the same shuffle.
    """
    if not 0 < cell_size <= 4 or seed < 0:
        raise ControlNextError(f"shuffle needs 0 < cell_size <= 4 and seed >= 0, got {cell_size}, {seed}")
    rgb = rgb_array(image)  # (h, w, 3)
    height, width = rgb.shape[:2]
    rng = np.random.default_rng(seed)
    cell = max(2, round(cell_size * min(height, width)))
    map_x = _smooth_noise(rng, height, width, cell) * (width - 1)  # (h, w) source columns
    map_y = _smooth_noise(rng, height, width, cell) * (height - 1)  # (h, w) source rows
    shuffled = cv2.remap(rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return condition_image(shuffled)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Uniform noise on a grid of `cell`-pixel cells, cubic-upsampled and rescaled to [0, 1]: (h, w) float32."""
    grid = rng.uniform(size=(height // cell + 3, width // cell + 3)).astype(np.float32)
    full = cv2.resize(grid, ((grid.shape[1]) * cell, (grid.shape[0]) * cell), interpolation=cv2.INTER_CUBIC)
    full = full[cell : cell + height, cell : cell + width]  # drop the border cells, where cubic overshoots
    low, high = float(full.min()), float(full.max())
    return ((full - low) / max(high - low, 1e-6)).astype(np.float32)
