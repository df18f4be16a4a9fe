"""The UNet architectures of Stable Diffusion 1.5, SDXL and Stable Video Diffusion XT as data (public config
facts, no weights)."""

from __future__ import annotations

# stable-diffusion-v1-5 unet/config.json (the fields that differ from diffusers' defaults)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

# stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)

# stable-video-diffusion-img2vid-xt(-1-1) unet/config.json: a UNetSpatioTemporalConditionModel (the image
# latents join the noise, hence 8 input channels; the CLIP image embedding is the one cross-attention token)
SVD_XT_UNET = dict(
    sample_size=96, in_channels=8, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, num_attention_heads=(5, 10, 20, 20),
    transformer_layers_per_block=1, addition_time_embed_dim=256, projection_class_embeddings_input_dim=768,
    num_frames=25,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                      "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                    "CrossAttnUpBlockSpatioTemporal"),
)

# Per base: its UNet (and class), the ControlNeXt variant of its release and the UNet weights its recipe trains
# (DESIGN.md; the SVD-v2 release trains the whole UNet).
ARCHITECTURES = {
    "sd15": dict(unet=SD15_UNET, controlnext_variant="sd15", trained_unet_pattern=r"to_out"),
    "sdxl": dict(unet=SDXL_UNET, controlnext_variant="sdxl", trained_unet_pattern=r".*attn2.*to_out.*"),
    "svd-xt": dict(unet=SVD_XT_UNET, unet_class="UNetSpatioTemporalConditionModel", controlnext_variant="svd",
                   trained_unet_pattern=r".*"),
}


def build_unet(name: str, device: str = "meta"):
    """The named architecture's UNet (UNet2DConditionModel unless it names another class); random weights, on the
    meta device by default."""
    import diffusers
    import torch

    spec = ARCHITECTURES[name]
    with torch.device(device):
        unet = getattr(diffusers, spec.get("unet_class", "UNet2DConditionModel"))(**spec["unet"]).eval()
    return unet.to(device)  # parameters made by legacy constructors (SVD's frame mixers) ignore the default device
