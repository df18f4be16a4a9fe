"""Depth and surface normals from a local transformers depth-estimation model (DPT, Depth Anything, ...)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..errors import ControlNextError
from .arrays import condition_image, rgb_array
from .local_models import load_local_model, resolve_device

DEPTH_EXAMPLES = "DPT or Depth Anything"
_METRIC_MODEL_TYPES = {"zoedepth", "depth_pro", "glpn"}  # these predict distance, not inverse depth


def estimate_nearness(image: Image.Image, model_path: str | None, device: str = "auto") -> np.ndarray:
    """Per-pixel nearness in [0, 1] (1 = nearest), at the image's size: (h, w) float32."""
    import torch
    import torch.nn.functional as F

    target = resolve_device(device)
    model, processor = load_local_model(model_path, "AutoModelForDepthEstimation", "depth estimation", DEPTH_EXAMPLES)
    rgb = rgb_array(image)  # (h, w, 3)
    inputs = processor(images=Image.fromarray(rgb), return_tensors="pt")
    with torch.inference_mode():
        predicted = model.to(target)(pixel_values=inputs["pixel_values"].to(target)).predicted_depth  # (1, h', w')
        predicted = F.interpolate(predicted[:, None].float(), size=rgb.shape[:2], mode="bicubic", align_corners=False)
    values = predicted[0, 0].cpu().numpy()  # (h, w)
    if _predicts_distance(model.config):
        values = -values
    low, high = float(values.min()), float(values.max())
    if high <= low:  # a constant prediction has no near or far
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _predicts_distance(config) -> bool:
    return config.model_type in _METRIC_MODEL_TYPES or getattr(config, "depth_estimation_type", "") == "metric"


def depth(
    image: Image.Image, *, model_path: str | None = None, invert: bool = False, device: str = "auto"
) -> Image.Image:
    """Depth map, near = white, from a local depth-estimation model folder (`model_path`), as depth controls use.

    Relative models (DPT/MiDaS, Depth Anything) predict inverse depth; metric ones (ZoeDepth, Depth Pro,
    GLPN, Depth Anything metric) are flipped so near is white either way. `invert` makes near black.
    """
    nearness = estimate_nearness(image, model_path, device)
    return condition_image(1.0 - nearness if invert else nearness)


def normals(
    image: Image.Image,
    *,
    model_path: str | None = None,
    relief: float = 0.5,
    background_threshold: float = 0.1,
    device: str = "auto",
) -> Image.Image:
    """Surface normals from the gradients of estimated depth, coloured as normal controls expect.

    With nearness z scaled to `relief` times the short side, n = normalise(dz/dx, dz/dy, 1) mapped to RGB
    by n * 127.5 + 127.5 (the convention of ControlNet's depth-derived normal maps: red grows where the
    surface comes nearer to the right, green where it comes nearer downwards, blue faces the viewer).
    Pixels farther than `background_threshold` (in nearness) are treated as flat background.
    """
    if relief <= 0 or not 0 <= background_threshold < 1:
        raise ControlNextError(
            f"normals needs relief > 0 and 0 <= background_threshold < 1, got {relief}, {background_threshold}"
        )
    nearness = estimate_nearness(image, model_path, device)  # (h, w)
    height_map = nearness * relief * min(nearness.shape)  # (h, w), in pixels
    slope_x = cv2.Sobel(height_map, cv2.CV_32F, 1, 0, ksize=3) / 8.0  # (h, w), Sobel weights sum to 8
    slope_y = cv2.Sobel(height_map, cv2.CV_32F, 0, 1, ksize=3) / 8.0  # (h, w)
    background = nearness < background_threshold
    slope_x[background] = 0.0
    slope_y[background] = 0.0
    normal = np.stack([slope_x, slope_y, np.ones_like(slope_x)], axis=2)  # (h, w, 3)
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    return condition_image((normal * 127.5 + 127.5).clip(0, 255).round().astype(np.uint8))
