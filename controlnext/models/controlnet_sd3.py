"""ControlNet for SD3 (Zhang et al., 2023, on a diffusion transformer) behind the same control interface.

A trainable copy of the first joint blocks of the base `SD3Transformer2DModel` reads the noisy latents,
the prompt and the condition *latents* (the VAE's encoding of the condition image, added to the copy's
tokens through a zero-initialised patch embedding); zero-initialised linear layers turn each block's
tokens into the residuals that diffusers' transformer adds after its blocks when given them in
`block_controlnet_hidden_states`. The network is diffusers' own `SD3ControlNetModel`; this subclass adds
the attach interface, so its folders load with diffusers alone and it runs inside diffusers' own
`StableDiffusion3ControlNetPipeline` as well.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from diffusers import SD3ControlNetModel

# The base transformer's config fields an SD3 ControlNet must share to add its residuals where they belong.
BASE_FIELDS = ("in_channels", "patch_size", "num_attention_heads", "attention_head_dim", "pooled_projection_dim")


class SD3ControlNet(SD3ControlNetModel):
    """Condition latents (b, c, h, w) + the transformer's inputs -> one residual per copied block (b, tokens, d)."""

    injection = "residuals"
    residual_names = ("block_controlnet_hidden_states",)
    shares_across_cfg = False  # reads the prompt, so each CFG half needs its own pass

    @classmethod
    def from_base(cls, transformer, num_layers: int | None = None) -> "SD3ControlNet":
        """Copy the first `num_layers` joint blocks of `transformer` (default: half, as diffusers' SD3 ControlNet
        training does for SD3-medium's 24); its zero-initialised layers start it as a no-op."""
        most = transformer.config.num_layers - 1  # the base's last block has no text output to copy
        num_layers = num_layers or max(1, transformer.config.num_layers // 2)
        if not 0 < num_layers <= most:
            raise ValueError(f"an SD3 ControlNet copies 1 to {most} blocks of this base, not {num_layers}")
        return cls.from_transformer(transformer, num_layers=num_layers, num_extra_conditioning_channels=0)

    @torch.no_grad()
    def prepare_condition(self, pixels: torch.Tensor, vae) -> torch.Tensor:
        """Condition image (b, 3, H, W) in [0, 1] -> its latents (b, c, H/f, W/f), as diffusers' SD3 ControlNet
        pipeline encodes it: (z - shift) * scale, the posterior's mode (deterministic, so seeds reproduce)."""
        shift = 0.0 if self.config.force_zeros_for_pooled_projection else (vae.config.shift_factor or 0.0)
        latents = vae.encode((pixels * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
        return ((latents - shift) * vae.config.scaling_factor).to(self.dtype)

    def control_features(self, condition: torch.Tensor, timestep: torch.Tensor, inputs: dict[str, Any]) -> list:
        """Run the copy on the rows of the transformer's `inputs` (already sliced to `condition`'s rows)."""
        pooled = inputs["pooled_projections"]
        if self.config.force_zeros_for_pooled_projection:
            pooled = torch.zeros_like(pooled)
        text = inputs["encoder_hidden_states"] if self.config.joint_attention_dim is not None else None
        (samples,) = self(
            hidden_states=inputs["hidden_states"],  # (n, c, h, w)
            controlnet_cond=condition,  # (n, c, h, w) latents
            conditioning_scale=1.0,
            encoder_hidden_states=text,  # (n, tokens, d_text)
            pooled_projections=pooled,  # (n, p)
            timestep=timestep,
            return_dict=False,
        )
        return list(samples)  # [(n, h*w/p^2, d), ...]

    def scale_features(self, features: list, scale: torch.Tensor) -> list:
        """Multiply every residual of row i by scale[i]."""
        rows = scale.view(-1, 1, 1)  # (n, 1, 1)
        return [sample * rows.to(sample.dtype) for sample in features]

    def residual_arguments(self, features: list, scale: torch.Tensor) -> dict[str, Any]:
        """The scaled residuals under the transformer's documented argument name."""
        return {"block_controlnet_hidden_states": self.scale_features(features, scale)}

    def base_mismatch(self, transformer) -> str | None:
        """Why this ControlNet does not fit `transformer` (a phrase after its name), or None."""
        if not hasattr(transformer.config, "joint_attention_dim") or not hasattr(transformer, "transformer_blocks"):
            return f"is an SD3 ControlNet, but the base is a {type(transformer).__name__}"
        for name in BASE_FIELDS:
            mine, theirs = self.config.get(name), transformer.config.get(name)
            if mine != theirs:
                return f"is an SD3 ControlNet made for another base model ({name} {mine}, this base has {theirs})"
        if self.config.num_layers > transformer.config.num_layers:
            return (f"is an SD3 ControlNet with {self.config.num_layers} blocks, more than this base's "
                    f"{transformer.config.num_layers}")
        return None

    def to_json_string(self) -> str:
        """The config under diffusers' class name, so a saved folder loads with SD3ControlNetModel alone."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = SD3ControlNetModel.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"
