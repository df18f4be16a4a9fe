"""The official ControlNeXt code written out by hand, as the reference that tests compare with.

Their control module on a state dict, their loading of a UNet file, their Cross Normalization and
addition, and a UNet2DConditionModel forward with the addition where their UNets make it.
"""

import math

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def timestep_features(t: torch.Tensor, dim: int = 128) -> torch.Tensor:
    """Sinusoidal timestep features, cosines first, frequency shift 0."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # (b, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (b, dim)


def resnet(w, name, x, temb, groups):
    h = F.silu(F.group_norm(x, groups, w[f"{name}.norm1.weight"], w[f"{name}.norm1.bias"], eps=1e-6))
    h = F.conv2d(h, w[f"{name}.conv1.weight"], w[f"{name}.conv1.bias"], padding=1)
    h = h + F.linear(F.silu(temb), w[f"{name}.time_emb_proj.weight"], w[f"{name}.time_emb_proj.bias"])[:, :, None, None]
    h = F.silu(F.group_norm(h, groups, w[f"{name}.norm2.weight"], w[f"{name}.norm2.bias"], eps=1e-6))
    h = F.conv2d(h, w[f"{name}.conv2.weight"], w[f"{name}.conv2.bias"], padding=1)
    if f"{name}.conv_shortcut.weight" in w:
        x = F.conv2d(x, w[f"{name}.conv_shortcut.weight"], w[f"{name}.conv_shortcut.bias"])
    return x + h


def official_module(w, image, t, layout):
    """The release's control module on a state dict: "v2", "v2-svd-release" (unpadded stem) or "v1"."""
    temb = F.linear(timestep_features(t.expand(image.shape[0])), w["time_embedding.linear_1.weight"],
                    w["time_embedding.linear_1.bias"])
    temb = F.linear(F.silu(temb), w["time_embedding.linear_2.weight"], w["time_embedding.linear_2.bias"])  # (b, 256)
    x = image
    if layout != "v1":
        paddings = (1, 0, 0) if layout == "v2-svd-release" else (1, 1, 1)
        for i, padding in enumerate(paddings):
            conv, norm = f"embedding.{3 * i}", f"embedding.{3 * i + 1}"
            x = F.conv2d(x, w[f"{conv}.weight"], w[f"{conv}.bias"], stride=2 if i == 0 else 1, padding=padding)
            x = F.relu(F.group_norm(x, 2, w[f"{norm}.weight"], w[f"{norm}.bias"], eps=1e-5))
    for i, groups in enumerate((1, 8, 8) if layout == "v1" else (4, 8)):
        x = resnet(w, f"down_res.{i}", x, temb, groups)
        x = F.conv2d(x, w[f"down_sample.{i}.conv.weight"], w[f"down_sample.{i}.conv.bias"], stride=2, padding=1)
    if layout == "v1":
        x = F.conv2d(x, w["mid_convs.0.0.weight"], w["mid_convs.0.0.bias"], padding=1)
        x = F.conv2d(F.relu(x), w["mid_convs.0.2.weight"], w["mid_convs.0.2.bias"], padding=1)
    else:
        h = F.relu(F.conv2d(x, w["mid_convs.0.0.weight"], w["mid_convs.0.0.bias"], padding=1))
        h = F.group_norm(h, 8, w["mid_convs.0.2.weight"], w["mid_convs.0.2.bias"], eps=1e-5)
        h = F.conv2d(h, w["mid_convs.0.3.weight"], w["mid_convs.0.3.bias"], padding=1)
        x = F.group_norm(h, 8, w["mid_convs.0.4.weight"], w["mid_convs.0.4.bias"], eps=1e-5) + x
    return F.conv2d(x, w["mid_convs.1.weight"], w["mid_convs.1.bias"])


def official_load_unet_file(unet, file, increments):
    """Their loading: the file's tensors (plus the base's own, for increments) into the UNet, non-strictly."""
    tensors = load_file(str(file))
    if increments:
        base = unet.state_dict()
        tensors = {name: value + base[name] for name, value in tensors.items()}
    unet.load_state_dict(tensors, strict=False)


def official_inject(x, c, scale, eps=1e-12, pool_first=False):
    """The official release's addition, written out by hand as the reference."""
    if pool_first:
        c = F.adaptive_avg_pool2d(c, x.shape[-2:])
    mean_x, std_x = x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)
    mean_c, std_c = c.mean(dim=(1, 2, 3), keepdim=True), c.std(dim=(1, 2, 3), keepdim=True)
    c = (c - mean_c) * (std_x / (std_c + eps)) + mean_x
    if not pool_first:
        c = F.adaptive_avg_pool2d(c, x.shape[-2:])
    return x + c * scale


def reference_unet(unet, sample, t, text, control, point, scale, pool_first, eps=1e-12, added=None):
    """UNet2DConditionModel's forward written out, with the control added at `point`; `added`: SDXL's extra inputs."""
    b = sample.shape[0]
    emb = unet.time_embedding(unet.time_proj(t.expand(b)).to(sample.dtype))
    if added is not None:  # pooled text and size/crop ids
        ids = unet.add_time_proj(added["time_ids"].flatten()).reshape(b, -1)
        emb = emb + unet.add_embedding(torch.cat([added["text_embeds"], ids], dim=-1).to(emb.dtype))
    h = unet.conv_in(sample)
    skips = (h,)  # the first skip is taken before any addition
    if point == "conv_in":
        h = official_inject(h, control, scale, eps, pool_first)
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res  # the block's skips are stored before the addition
        if i == 0 and point == "down_blocks.0":
            h = official_inject(h, control, scale, eps, pool_first)
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(h, emb, encoder_hidden_states=text)
    else:
        h = unet.mid_block(h, emb)
    if point == "mid_block":
        h = official_inject(h, control, scale, eps, pool_first)
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=text)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
