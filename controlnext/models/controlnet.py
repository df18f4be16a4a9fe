"""ControlNet (Zhang et al., 2023, arXiv 2302.05543) behind the same control interface as ControlNeXt.

A trainable copy of the base UNet's encoder reads the noisy latent, the prompt and the condition image;
its features join the locked base through zero convolutions as the residuals that diffusers' UNet takes
in `down_block_additional_residuals` / `mid_block_additional_residual`. The network is diffusers' own
`ControlNetModel`; this subclass only adds the attach interface, so its weights, `save_pretrained`,
`from_pretrained` and `from_single_file` are diffusers' and its folders load with diffusers alone.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from diffusers import ControlNetModel

# The base UNet's config fields a ControlNet must share to add its residuals where the UNet expects them.
BASE_FIELDS = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type")


class ControlNet(ControlNetModel):
    """Condition (b, 3, H, W) in [0, 1] + the UNet's inputs -> residuals for its skips and mid block (Eq. 2)."""

    injection = "residuals"
    residual_names = ("down_block_additional_residuals", "mid_block_additional_residual")
    shares_across_cfg = False  # reads the prompt, so each CFG half needs its own pass

    def control_features(
        self, condition: torch.Tensor, timestep: torch.Tensor, inputs: dict[str, Any]
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Run the copy on the rows of the UNet's `inputs` (already sliced to `condition`'s rows)."""
        extra = {k: inputs[k] for k in ("added_cond_kwargs", "class_labels") if inputs.get(k) is not None}
        down, mid = self(
            sample=inputs["sample"],  # (n, 4, h, w)
            timestep=timestep,
            encoder_hidden_states=inputs["encoder_hidden_states"],  # (n, tokens, d)
            controlnet_cond=condition,  # (n, 3, 8h, 8w) in [0, 1], as diffusers' pipelines feed it
            conditioning_scale=1.0,
            return_dict=False,
            **extra,
        )
        return tuple(down), mid  # ((n, c_i, h_i, w_i), ...), (n, c_mid, h_mid, w_mid)

    def scale_features(self, features, scale: torch.Tensor):
        """Multiply every residual of row i by scale[i]."""
        down, mid = features
        rows = scale.view(-1, 1, 1, 1)  # (n, 1, 1, 1)
        return tuple(d * rows.to(d.dtype) for d in down), mid * rows.to(mid.dtype)

    def residual_arguments(self, features, scale: torch.Tensor) -> dict[str, Any]:
        """The scaled residuals under the UNet's documented argument names."""
        return dict(zip(self.residual_names, self.scale_features(features, scale)))

    def base_mismatch(self, unet) -> str | None:
        """Name the first config field where `unet` differs from the base this ControlNet was made for."""
        blocks = len(self.config.block_out_channels)
        for name in BASE_FIELDS:
            mine, theirs = self.config.get(name), unet.config.get(name)
            if isinstance(mine, (list, tuple)) or isinstance(theirs, (list, tuple)):
                mine, theirs = _per_block(mine, blocks), _per_block(theirs, blocks)
            if mine != theirs:
                return f"is a ControlNet made for another base model ({name} {mine}, this base has {theirs})"
        return None

    def to_json_string(self) -> str:
        """The config under diffusers' class name, so a saved folder loads with ControlNetModel alone."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = ControlNetModel.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _per_block(value, blocks: int) -> tuple:
    """A per-block setting given once or per block -> one value per block."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * blocks
