"""The denoiser table: one ControlNeXt addition attaches to a video UNet (frames as rows) and to SD3 tokens."""

import pytest
import torch

from controlnext.control import ControlUnit, attach_control
from controlnext.denoisers import DENOISERS, describe, family, site_names
from controlnext.errors import ControlNextError
from controlnext.testing import tiny_controlnext, tiny_sd3_transformer, tiny_svd_unet, tiny_unet
from official_code import official_inject


# -- Stable Video Diffusion: the sites see batch x frames rows ---------------------------------------------

def svd_inputs(videos=2, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(videos, frames, 4, 8, 8, generator=g)  # (b, f, c, h, w)
    image_embeddings = torch.randn(videos, 1, 16, generator=g)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]] * videos)
    conditions = torch.rand(videos * frames, 3, 64, 64, generator=g)  # one condition per frame
    return sample, torch.tensor(20.0), image_embeddings, time_ids, conditions


def reference_svd(unet, sample, t, text, time_ids, control, point, scale):
    """UNetSpatioTemporalConditionModel's forward written out, with the control added at `point` on b*f rows."""
    b, f = sample.shape[:2]
    emb = unet.time_embedding(unet.time_proj(t.reshape(-1).expand(b)).to(sample.dtype))
    added = unet.add_time_proj(time_ids.flatten()).reshape(b, -1).to(emb.dtype)
    emb = (emb + unet.add_embedding(added)).repeat_interleave(f, dim=0)  # (b*f, d)
    text = text.repeat_interleave(f, dim=0)
    indicator = torch.zeros(b, f)
    h = unet.conv_in(sample.flatten(0, 1))  # (b*f, c, h, w)
    skips = (h,)
    if point == "conv_in":
        h = official_inject(h, control, scale)
    for i, block in enumerate(unet.down_blocks):
        text_kw = dict(encoder_hidden_states=text) if getattr(block, "has_cross_attention", False) else {}
        h, res = block(hidden_states=h, temb=emb, image_only_indicator=indicator, **text_kw)
        skips += res
        if i == 0 and point == "down_blocks.0":
            h = official_inject(h, control, scale)
    h = unet.mid_block(hidden_states=h, temb=emb, encoder_hidden_states=text, image_only_indicator=indicator)
    if point == "mid_block":
        h = official_inject(h, control, scale)
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
        text_kw = dict(encoder_hidden_states=text) if getattr(block, "has_cross_attention", False) else {}
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, image_only_indicator=indicator, **text_kw)
    out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return out.reshape(b, f, *out.shape[1:])


@pytest.fixture(scope="module")
def svd_unet():
    return tiny_svd_unet()


@pytest.mark.parametrize("point,channels", [("down_blocks.0", 32), ("conv_in", 32), ("mid_block", 64)])
def test_video_unet_gets_the_addition_on_every_frame_where_the_reference_puts_it(svd_unet, point, channels):
    model = tiny_controlnext(out_channels=channels, injection=point)
    sample, t, text, time_ids, conditions = svd_inputs()
    with torch.no_grad():
        expected = reference_svd(svd_unet, sample, t, text, time_ids, model(conditions, t), point, 0.6)
        plain = svd_unet(sample, t, text, time_ids).sample
        with attach_control(svd_unet, ControlUnit(model, conditions, scale=0.6), cfg=False):
            got = svd_unet(sample, t, text, time_ids).sample
        with attach_control(svd_unet, ControlUnit(model, conditions, scale=0.0), cfg=False):
            unscaled = svd_unet(sample, t, text, time_ids).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3
    assert torch.equal(unscaled, plain)


def test_one_clip_serves_both_guidance_halves_of_a_video(svd_unet):
    model = tiny_controlnext(out_channels=32, injection="down_blocks.0")
    sample, t, text, time_ids, conditions = svd_inputs(videos=2, frames=3)
    clip = conditions[:3]  # three frames' conditions; the batch is [unconditional, conditional] of one video
    with torch.no_grad():
        expected = reference_svd(svd_unet, sample, t, text, time_ids, model(clip.repeat(2, 1, 1, 1), t),
                                 "down_blocks.0", 1.0)
        with attach_control(svd_unet, ControlUnit(model, clip)):  # 6 rows = 2 x 3 condition rows: CFG
            got = svd_unet(sample, t, text, time_ids).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# -- Stable Diffusion 3: the sites hold tokens on the patch grid -------------------------------------------

def sd3_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, 16, generator=g)
    pooled = torch.randn(batch, 12, generator=g)
    condition = torch.rand(batch, 3, 64, 64, generator=g)
    return sample, torch.tensor([500.0] * batch), text, pooled, condition


def reference_sd3(model, sample, t, text, pooled, control, point, scale):
    """SD3Transformer2DModel's forward written out, the control added to the tokens at `point`."""
    b, _, height, width = sample.shape
    p = model.config.patch_size
    grid = (height // p, width // p)

    def add(tokens):  # (b, h*w, d) -> the map (b, d, h, w), add, and back
        features = tokens.transpose(1, 2).reshape(b, -1, *grid)
        return official_inject(features, control, scale).flatten(2).transpose(1, 2)

    x = model.pos_embed(sample)  # (b, h*w, d)
    if point == "pos_embed":
        x = add(x)
    temb = model.time_text_embed(t, pooled)
    context = model.context_embedder(text)
    for i, block in enumerate(model.transformer_blocks):
        context, x = block(hidden_states=x, encoder_hidden_states=context, temb=temb)
        if i == 0 and point == "transformer_blocks.0":
            x = add(x)
    x = model.proj_out(model.norm_out(x, temb))  # (b, h*w, p*p*c)
    x = x.reshape(b, *grid, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, -1, height, width)


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_transformer()


@pytest.mark.parametrize("point", ["pos_embed", "transformer_blocks.0"])
def test_sd3_tokens_get_the_addition_where_the_reference_puts_it(sd3, point):
    model = tiny_controlnext(out_channels=8, injection=point)
    sample, t, text, pooled, condition = sd3_inputs()
    call = dict(hidden_states=sample, encoder_hidden_states=text, pooled_projections=pooled, timestep=t)
    with torch.no_grad():
        expected = reference_sd3(sd3, sample, t, text, pooled, model(condition, t), point, 0.8)
        plain = sd3(**call).sample
        with attach_control(sd3, ControlUnit(model, condition, scale=0.8), cfg=False):
            got = sd3(**call).sample
        with attach_control(sd3, ControlUnit(model, condition, scale=0.0), cfg=False):
            unscaled = sd3(**call).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3
    assert torch.equal(unscaled, plain)


# -- the table itself ----------------------------------------------------------------------------------------

def test_every_family_is_an_entry_and_sites_name_their_submodules(svd_unet, sd3):
    assert family(tiny_unet()) == "sd" and family(svd_unet) == "svd" and family(sd3) == "sd3"
    assert family(tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                            projection_class_embeddings_input_dim=8 + 6 * 4)) == "sdxl"
    for denoiser in (tiny_unet(), svd_unet, sd3):
        for name, site in describe(denoiser).sites.items():
            assert denoiser.get_submodule(site.module) is not None, name
    assert set(site_names()) == {name for entry in DENOISERS.values() for name in entry.sites}


def test_unknown_denoisers_and_sites_are_refused_in_one_line(sd3):
    with pytest.raises(ControlNextError, match="cannot attach to a Linear"):
        attach_control(torch.nn.Linear(2, 2), ControlUnit(tiny_controlnext(), torch.rand(1, 3, 64, 64)))
    with pytest.raises(ControlNextError, match="has no injection site 'conv_in'") as error:
        attach_control(sd3, ControlUnit(tiny_controlnext(injection="conv_in"), torch.rand(1, 3, 64, 64)))
    assert "\n" not in str(error.value)
    with pytest.raises(ControlNextError, match="16 channels at pos_embed, but this base has 8"):
        attach_control(sd3, ControlUnit(tiny_controlnext(out_channels=16, injection="pos_embed"), None))


def test_a_module_without_the_control_interface_is_refused():
    with pytest.raises(ControlNextError, match="not a control model"):
        attach_control(tiny_unet(), ControlUnit(torch.nn.Conv2d(3, 8, 1), torch.rand(1, 3, 64, 64)))
