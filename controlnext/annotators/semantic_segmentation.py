"""Semantic segmentation from a local transformers model, drawn in the ADE20K palette seg controls use."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .ade20k_palette import ADE20K_PALETTE
from .arrays import condition_image, rgb_array
from .local_models import load_local_model, resolve_device

SEGMENTATION_EXAMPLES = "SegFormer, UperNet, BEiT or DPT trained on ADE20K"


def label_colors(num_labels: int) -> np.ndarray:
    """Colour of each label: the 150 ADE20K colours, then seeded random colours for any further labels."""
    palette = np.asarray(ADE20K_PALETTE, dtype=np.uint8)  # (150, 3)
    if num_labels <= len(palette):
        return palette[:num_labels]
    extra = np.random.default_rng(0).integers(0, 256, size=(num_labels - len(palette), 3), dtype=np.uint8)
    return np.concatenate([palette, extra])


def segmentation(image: Image.Image, *, model_path: str | None = None, device: str = "auto") -> Image.Image:
    """Semantic segmentation map in the ADE20K palette (label i -> colour i) from a local model folder.

    Takes models of transformers' AutoModelForSemanticSegmentation (per-pixel logits); for ADE20K models
    (150 labels, wall = 0) the colours are exactly those ADE20K seg controls were trained on.
    """
    import torch
    import torch.nn.functional as F

    target = resolve_device(device)
    model, processor = load_local_model(
        model_path, "AutoModelForSemanticSegmentation", "semantic segmentation", SEGMENTATION_EXAMPLES
    )
    rgb = rgb_array(image)  # (h, w, 3)
    inputs = processor(images=Image.fromarray(rgb), return_tensors="pt")
    with torch.inference_mode():
        logits = model.to(target)(pixel_values=inputs["pixel_values"].to(target)).logits  # (1, n, h', w')
        logits = F.interpolate(logits.float(), size=rgb.shape[:2], mode="bilinear", align_corners=False)  # (1, n, h, w)
    labels = logits[0].argmax(dim=0).cpu().numpy()  # (h, w)
    return condition_image(label_colors(logits.shape[1])[labels])
