"""ControlNeXt and ControlNet on SD3's diffusion transformer: trainable parameters and per-step cost.

Built from the published transformer configs (SD3-medium, SD3.5-large) on the meta device, so no weights
are needed: parameter counts exactly, FLOPs of one denoising step under classifier-free guidance with
torch's flop counter (matrix products and convolutions). ControlNeXt's module runs once per condition
image (both guidance halves see the same condition); ControlNet reads the prompt, so it runs on both
halves. CPU time of the control models alone against the transformer, at a size that fits a CPU, comes
from `measure_cpu` on real tensors.
"""

from __future__ import annotations

import re
import statistics
import time

import torch

# transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers and stable-diffusion-3.5-large
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                  attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                  caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")
SD3_TRANSFORMERS = {"sd3-medium": SD3_MEDIUM, "sd3.5-large": SD35_LARGE}
TEXT_TOKENS = 77 + 256  # both CLIPs side by side, then T5's 256 tokens (the pipelines' default)
VAE_FACTOR = 8


def build_sd3(name: str, device: str = "meta", seed: int = 0, dtype: torch.dtype = torch.float32,
              num_layers: int | None = None) -> dict:
    """The named transformer (optionally only its first `num_layers` joint blocks), the v2-layout ControlNeXt
    module for it and an SD3 ControlNet of half its blocks, built directly in `dtype`."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    config = {**SD3_TRANSFORMERS[name], **({"num_layers": num_layers} if num_layers else {})}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = SD3Transformer2DModel(**config).eval()
            return {"transformer": transformer, **sd3_controls(transformer)}
    finally:
        torch.set_default_dtype(previous)


def sd3_controls(transformer) -> dict:
    """A v2-layout ControlNeXt module added after the patch embedding of `transformer`, and an SD3 ControlNet
    of half its blocks (built on the current default device and dtype)."""
    from ..models import ControlNeXtModel, SD3ControlNet

    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    module = ControlNeXtModel.from_variant("sdxl", out_channels=width, injection="pos_embed", pool_before_norm=True)
    return {"controlnext": module.eval(), "controlnet": SD3ControlNet.from_base(transformer).eval()}


def count_sd3(name: str, resolution: int = 1024, images: int = 1, text_tokens: int = TEXT_TOKENS) -> dict:
    """Parameters and FLOPs of one CFG step at `resolution` for the named SD3 transformer (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..training.selection import PRESETS

    parts = build_sd3(name)
    transformer, module, controlnet = parts["transformer"], parts["controlnext"], parts["controlnet"]
    pattern = re.compile(PRESETS["sd3"][0])
    trained = sum(p.numel() for n, p in transformer.named_parameters() if pattern.search(n))
    base = sum(p.numel() for p in transformer.parameters())
    module_params = sum(p.numel() for p in module.parameters())
    controlnet_params = sum(p.numel() for p in controlnet.parameters())

    inputs = step_inputs(transformer, resolution, images, text_tokens, device="meta")
    condition = torch.empty(images, 3, resolution, resolution, device="meta")
    flops = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            transformer(**inputs, return_dict=False)
        flops["base"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            module(condition, inputs["timestep"][:1])
        flops["controlnext_module"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            module.precompute(condition)
        flops["controlnext_precompute"] = counter.get_total_flops()
        latents = torch.empty(2 * images, transformer.config.in_channels, *inputs["hidden_states"].shape[-2:],
                              device="meta")
        with FlopCounterMode(display=False) as counter:
            controlnet.control_features(latents, inputs["timestep"], inputs)
        flops["controlnet_model"] = counter.get_total_flops()
    per_step = flops["controlnext_module"] - flops["controlnext_precompute"]  # later steps reuse the timestep-free part
    return {
        "architecture": name, "resolution": resolution, "images": images, "text_tokens": text_tokens,
        "base_transformer": base,
        "controlnext": {"module": module_params, "trained_transformer": trained, "trainable": module_params + trained,
                        "added": module_params, "trained_pattern": PRESETS["sd3"][0]},
        "controlnet": {"trainable": controlnet_params, "added": controlnet_params,
                       "layers": controlnet.config.num_layers},
        "flops": flops,
        "overhead": {"controlnext": per_step / flops["base"],
                     "controlnext_first_step": flops["controlnext_module"] / flops["base"],
                     "controlnet": flops["controlnet_model"] / flops["base"]},
    }


def step_inputs(transformer, resolution: int, images: int, text_tokens: int, device="cpu", seed: int = 0) -> dict:
    """The transformer's arguments for one CFG step (2 x `images` rows) at `resolution` pixels."""
    config = transformer.config
    latent = resolution // VAE_FACTOR
    shapes = {"hidden_states": (2 * images, config.in_channels, latent, latent),
              "encoder_hidden_states": (2 * images, text_tokens, config.joint_attention_dim),
              "pooled_projections": (2 * images, config.pooled_projection_dim)}
    if device == "meta":
        values = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    else:
        g = torch.Generator().manual_seed(seed)
        values = {name: torch.randn(shape, generator=g).to(device) for name, shape in shapes.items()}
    return {**values, "timestep": torch.full((2 * images,), 500.0, device=device)}


def measure_cpu(name: str = "sd3-medium", resolution: int = 256, text_tokens: int = 77, repeats: int = 3,
                threads: int = 1, dtype: str = "bf16", layers: int = 6, log=print) -> dict:
    """CPU seconds of one CFG step of the transformer and of each control model alone, interleaved.

    Real tensors with random weights, at a size that fits a shared CPU machine: the architecture's width
    with its first `layers` joint blocks (the ControlNet copies half of them), bf16 weights, a small image
    and the CLIP tokens only (SD3 runs without T5). The module is the full one; the transformer and the
    ControlNet scale with their blocks, so `share_full_depth` extrapolates both to the whole depth."""
    torch.set_num_threads(threads)
    kind = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    parts = build_sd3(name, device="cpu", dtype=kind, num_layers=layers)
    transformer, module, controlnet = parts["transformer"], parts["controlnext"], parts["controlnet"]
    inputs = {k: v.to(kind) for k, v in step_inputs(transformer, resolution, 1, text_tokens).items()}
    condition = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)).to(kind)
    latents = torch.randn_like(inputs["hidden_states"])
    precomputed = module.precompute(condition)
    calls = {
        "base": lambda: transformer(**inputs, return_dict=False),
        "controlnext_module": lambda: module(condition, inputs["timestep"][:1], precomputed=precomputed),
        "controlnet_model": lambda: controlnet.control_features(latents, inputs["timestep"], inputs),
    }
    seconds = {key: [] for key in calls}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for key, call in calls.items():
                started = time.process_time()
                call()
                if round_:  # the first round warms up
                    seconds[key].append(time.process_time() - started)
            if round_:
                log(f"{name} CPU round {round_}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()))
    median = {key: statistics.median(values) for key, values in seconds.items()}
    depth = SD3_TRANSFORMERS[name]["num_layers"] / layers
    return {"architecture": name, "resolution": resolution, "text_tokens": text_tokens, "threads": threads,
            "dtype": dtype, "layers": layers, "full_layers": SD3_TRANSFORMERS[name]["num_layers"],
            "seconds": seconds, "median": median,
            "share": {"controlnext": median["controlnext_module"] / median["base"],
                      "controlnet": median["controlnet_model"] / median["base"]},
            "share_full_depth": {"controlnext": median["controlnext_module"] / (median["base"] * depth),
                                 "controlnet": median["controlnet_model"] / median["base"]}}
