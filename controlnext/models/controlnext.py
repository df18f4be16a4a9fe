"""ControlNeXt's control module and Cross Normalization (Peng et al., 2024, arXiv 2408.06070).

The module turns a condition image into one feature map that is added to the denoising network at a
single point, after Cross Normalization has aligned it to the network's own features. The official
release layouts ("v1", "v2", "svd") are named configurations of this one class, so their weights load
key for key and run as in the code they were released with; any other size is plain configuration.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from torch import nn

from ..denoisers import site_names, site_width

CrossNormMode = Literal["official", "paper"]

_V2_LAYOUT = dict(stem_channels=(64, 64, 128), stem_groups=2, block_out_channels=(128, 256), block_groups=(4, 8),
                  mid_residual=True, out_channels=320, learnable_scale=False)
_V1_LAYOUT = dict(stem_channels=(), block_out_channels=(128, 256, 256), block_groups=(1, 8, 8),
                  mid_residual=False, out_channels=1280, learnable_scale=True)

# Named configurations of the official releases (facts in DESIGN.md): layout, injection point and
# Cross Normalization details, so that their weights load and behave exactly as in their own code.
VARIANTS: dict[str, dict] = {
    # SDXL release: v2 layout, added right after conv_in (first skip taken before the addition).
    "sdxl": dict(_V2_LAYOUT, injection="conv_in", pool_before_norm=False),
    # SD1.5 training code: v2 layout, added after down_blocks[0]; pool, then normalise.
    "sd15": dict(_V2_LAYOUT, injection="down_blocks.0", pool_before_norm=True),
    # SD1.5 v1 release: no stem, 1280 channels added after the mid block, a learnable scale.
    "sd15-v1": dict(_V1_LAYOUT, injection="mid_block", pool_before_norm=True),
    # SVD-v2 release (the inference code that runs the released weights): v2 layout whose 2nd and 3rd stem
    # convolutions have no padding, after down_blocks[0] at a fixed 0.2, eps 1e-5; normalise, then pool.
    "svd": dict(_V2_LAYOUT, padded_stem=False, injection="down_blocks.0", pool_before_norm=False, output_scale=0.2,
                cross_norm_eps=1e-5),
    # SVD-v2 training code: the same with a padded stem (same keys and shapes, other feature maps).
    "svd-training": dict(_V2_LAYOUT, injection="down_blocks.0", pool_before_norm=False, output_scale=0.2,
                         cross_norm_eps=1e-5),
}


def cross_normalize(
    control: torch.Tensor,
    x: torch.Tensor,
    eps: float = 1e-12,
    mode: CrossNormMode = "official",
) -> torch.Tensor:
    """Align control features to the denoising features' statistics (Cross Normalization, Sec. 3.3).

    "official": c' = (c - mean(c)) * std(x) / (std(c) + eps) + mean(x), unbiased std, per sample,
    as the released code computes it. "paper": c' = (c - mean(x)) / sqrt(var(x) + eps), the paper's Eq.
    with gamma = 1. Statistics are per sample, so `control` may have another spatial size than x.

    Computed in at least fp32 and returned in x's dtype: eps 1e-12 is zero in fp16, where a flat control
    (std 0) would otherwise give 0 * inf = NaN.
    """
    dtype = x.dtype
    work = torch.promote_types(dtype, torch.float32)
    x, control = x.to(work), control.to(work)
    dims = tuple(range(1, x.ndim))
    mean_x = x.mean(dim=dims, keepdim=True)  # (b, 1, 1, 1)
    if mode == "official":
        std_x = x.std(dim=dims, keepdim=True)
        mean_c = control.mean(dim=dims, keepdim=True)
        std_c = control.std(dim=dims, keepdim=True)
        out = (control - mean_c) * (std_x / (std_c + eps)) + mean_x
    elif mode == "paper":
        var_x = x.var(dim=dims, keepdim=True, unbiased=False)
        out = (control - mean_x) / torch.sqrt(var_x + eps)
    else:
        raise ValueError(f"unknown cross-normalization mode {mode!r}; use 'official' or 'paper'")
    return out.to(dtype)


class ControlNeXtModel(ModelMixin, ConfigMixin):
    """Condition image in [0, 1], (b, c, H, W), and timestep -> control features (b, out, H/2^k, W/2^k)."""

    @register_to_config
    def __init__(
        self,
        conditioning_channels: int = 3,
        stem_channels: tuple[int, ...] = (64, 64, 128),
        stem_groups: int = 2,
        padded_stem: bool = True,
        block_out_channels: tuple[int, ...] = (128, 256),
        block_groups: tuple[int, ...] = (4, 8),
        mid_residual: bool = True,
        out_channels: int = 320,
        time_proj_dim: int = 128,
        time_embed_dim: int = 256,
        learnable_scale: bool = False,
        output_scale: float = 1.0,
        cross_norm_eps: float = 1e-12,
        cross_norm_mode: str = "official",
        pool_before_norm: bool = False,
        injection: str = "conv_in",
    ):
        super().__init__()
        if injection not in site_names():
            raise ValueError(f"unknown injection point {injection!r}; choose one of {', '.join(site_names())}")
        if cross_norm_mode not in ("official", "paper"):
            raise ValueError(f"unknown cross_norm_mode {cross_norm_mode!r}; use 'official' or 'paper'")
        if len(block_out_channels) != len(block_groups):
            raise ValueError("block_out_channels and block_groups must have the same length")
        self.time_proj = Timesteps(time_proj_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_proj_dim, time_embed_dim)

        channels = conditioning_channels
        if stem_channels:
            layers: list[nn.Module] = []
            for i, width in enumerate(stem_channels):
                stride, padding = (2, 1) if i == 0 else (1, int(padded_stem))
                layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=padding), nn.GroupNorm(stem_groups, width),
                           nn.ReLU()]
                channels = width
            self.embedding = nn.Sequential(*layers)
        else:
            self.embedding = None

        self.down_res = nn.ModuleList()
        self.down_sample = nn.ModuleList()
        for width, groups in zip(block_out_channels, block_groups):
            self.down_res.append(ResnetBlock2D(in_channels=channels, out_channels=width, temb_channels=time_embed_dim, groups=groups))
            self.down_sample.append(Downsample2D(width, use_conv=True, out_channels=width, padding=1, name="op"))
            channels = width

        if mid_residual:
            mid = [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, channels),
                   nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(8, channels)]
        else:
            mid = [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)]
        self.mid_convs = nn.ModuleList([nn.Sequential(*mid), nn.Conv2d(channels, out_channels, 1)])
        self.scale = nn.Parameter(torch.tensor(1.0)) if learnable_scale else None
        self._cache = None  # (weak ref to the condition, key, precomputed features) of the last condition

    shares_across_cfg = True  # the output depends on the condition and timestep only, not on the prompt

    @property
    def injection(self) -> str:
        return self.config.injection

    def control_features(self, condition: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The attachment's call: at inference the timestep-free part is computed once per condition tensor."""
        if torch.is_grad_enabled():
            return self(condition, timestep)
        return self(condition, timestep, precomputed=self.cached_precompute(condition))

    def base_mismatch(self, denoiser) -> str | None:
        """The module's output width must be the denoiser's at the injection site."""
        want, have = self.config.out_channels, site_width(denoiser, self.injection)
        if want != have:
            return (f"was made for a base model with {want} channels at {self.injection}, but this base has {have}")
        return None

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "ControlNeXtModel":
        """Build a named configuration (see VARIANTS) with random weights."""
        if name not in VARIANTS:
            raise KeyError(f"unknown ControlNeXt variant {name!r}; known: {', '.join(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})

    @property
    def official_variant(self) -> str | None:
        """The name of the VARIANTS entry this model's configuration is, or None."""
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()}
        for name, entry in VARIANTS.items():
            full = {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **entry}.items()}
            if all(config.get(k) == v for k, v in full.items()):
                return name
        return None

    @property
    def downscale_factor(self) -> int:
        """How much smaller than the condition image the output is (an unpadded stem takes a few pixels more)."""
        return 2 ** (len(self.config.block_out_channels) + (1 if self.config.stem_channels else 0))

    @property
    def output_multiplier(self) -> torch.Tensor | float:
        """The factor applied after Cross Normalization: the fixed output scale times the learnable one."""
        scale = self.config.output_scale
        return scale * self.scale if self.scale is not None else scale

    def embed_time(self, timestep: torch.Tensor | float | int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """Timestep(s) -> (batch, time_embed_dim)."""
        device = self.time_embedding.linear_1.weight.device
        t = torch.as_tensor(timestep, device=device).reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        return self.time_embedding(self.time_proj(t).to(dtype))  # (b, time_embed_dim)

    def precompute(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The part that does not depend on the timestep: the stem and the first block up to its conv1."""
        x = self.embedding(condition) if self.embedding is not None else condition  # (b, 128, H/2, W/2)
        block = self.down_res[0]
        return x, block.conv1(block.nonlinearity(block.norm1(x)))  # block input, (b, c_0, H/2, W/2)

    def cached_precompute(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`precompute(condition)`, reused while the same tensor comes back unchanged to unchanged weights."""
        first = self.down_res[0].conv1.weight
        key = (_version(condition), first.device, first.dtype, *(_version(p) for p in self._precomputed_params()))
        if self._cache is not None and self._cache[0]() is condition and self._cache[1] == key:
            return self._cache[2]
        value = self.precompute(condition)
        self._cache = (weakref.ref(condition), key, value)
        return value

    def clear_cache(self) -> None:
        """Drop the precomputed features of the last condition."""
        self._cache = None

    def _precomputed_params(self):
        block = self.down_res[0]
        stem = self.embedding.parameters() if self.embedding is not None else ()
        return (*stem, *block.norm1.parameters(), *block.conv1.parameters())

    def forward(
        self,
        condition: torch.Tensor,
        timestep: torch.Tensor | float | int,
        precomputed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        emb = self.embed_time(timestep, condition.shape[0], condition.dtype)  # (b, 256)
        if precomputed is None:
            x = self.embedding(condition) if self.embedding is not None else condition  # (b, 128, H/2, W/2)
            blocks = zip(self.down_res, self.down_sample)
        else:
            x = self.down_sample[0](_resume_resnet(self.down_res[0], *precomputed, emb))  # (b, c_0, H/4, W/4)
            blocks = zip(self.down_res[1:], self.down_sample[1:])
        for res, down in blocks:
            x = down(res(x, emb))  # (b, c_i, H/2^(i+2), W/2^(i+2))
        x = self.mid_convs[0](x) + x if self.config.mid_residual else self.mid_convs[0](x)
        return self.mid_convs[1](x)  # (b, out_channels, H/8, W/8)

    def inject(self, x: torch.Tensor, control: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """x + scale * multiplier * CrossNorm(resize(control)): the one addition into the base network."""
        eps, mode = self.config.cross_norm_eps, self.config.cross_norm_mode
        control = control.to(x.dtype)
        if self.config.pool_before_norm:
            control = cross_normalize(F.adaptive_avg_pool2d(control, x.shape[-2:]), x, eps, mode)
        else:
            control = F.adaptive_avg_pool2d(cross_normalize(control, x, eps, mode), x.shape[-2:])
        return x + control * (scale * self.output_multiplier)


def _resume_resnet(block: ResnetBlock2D, x: torch.Tensor, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """ResnetBlock2D's forward from after its conv1 (h), with the block's own layers; x is the block input."""
    h = h + block.time_emb_proj(block.nonlinearity(emb))[:, :, None, None]  # (b, c, h, w)
    h = block.conv2(block.dropout(block.nonlinearity(block.norm2(h))))  # (b, c, h, w)
    shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    return (shortcut + h) / block.output_scale_factor


def _version(tensor: torch.Tensor) -> int:
    """The in-place modification counter; inference-mode tensors have none."""
    try:
        return tensor._version
    except RuntimeError:
        return -1
