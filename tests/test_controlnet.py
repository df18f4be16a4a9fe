"""ControlNet behind the control interface: equal to diffusers' own residual path, mixed with ControlNeXt, saved and loaded."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from controlnext.control import ControlUnit, attach_control
from controlnext.control.loading import load_control, load_controlnet, save_controlnet, save_controlnext
from controlnext.errors import ControlNextError
from controlnext.models import ControlNet
from controlnext.testing import tiny_controlnet, tiny_controlnext, tiny_unet


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, 16, generator=g)
    condition = torch.rand(batch, 3, 64, 64, generator=g)  # 8x the latent: the conditioning embedding has 3 stride-2 convs
    return sample, torch.tensor(37), text, condition


def by_hand(unet, controlnet, sample, t, text, condition, scale=1.0):
    """diffusers' documented ControlNet path: residuals from the ControlNetModel, passed to the UNet."""
    down, mid = controlnet(sample, t, encoder_hidden_states=text, controlnet_cond=condition,
                           conditioning_scale=scale, return_dict=False)
    return unet(sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample


def test_fresh_controlnet_leaves_the_base_unchanged():
    unet = tiny_unet()
    controlnet = tiny_controlnet(unet, zero_convs=True)
    sample, t, text, condition = inputs()
    with torch.no_grad():
        base = unet(sample, t, text).sample
        with attach_control(unet, ControlUnit(controlnet, condition)):
            got = unet(sample, t, text).sample
    assert torch.equal(got, base)


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_attaching_equals_diffusers_residual_path(scale):
    unet = tiny_unet()
    controlnet = tiny_controlnet(unet)
    sample, t, text, condition = inputs()
    with torch.no_grad():
        expected = by_hand(unet, controlnet, sample, t, text, condition, scale)
        with attach_control(unet, ControlUnit(controlnet, condition, scale=scale)):
            got = unet(sample, t, text).sample
        base = unet(sample, t, text).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - base).abs().max() > 1e-3


def test_under_cfg_cond_only_spares_the_unconditional_half_and_both_matches_the_full_batch():
    unet = tiny_unet()
    controlnet = tiny_controlnet(unet)
    sample, t, text, condition = inputs(batch=4)
    one = condition[:2]  # one condition per image; the UNet batch is [uncond, cond]
    with torch.no_grad():
        base = unet(sample, t, text).sample
        with attach_control(unet, ControlUnit(controlnet, one), apply_to="cond"):
            cond_only = unet(sample, t, text).sample
        with attach_control(unet, ControlUnit(controlnet, one), apply_to="both"):
            both = unet(sample, t, text).sample
        expected = by_hand(unet, controlnet, sample, t, text, torch.cat([one, one]))
        expected_cond = by_hand(unet, controlnet, sample[2:], t, text[2:], one)
    assert torch.equal(cond_only[:2], base[:2])
    torch.testing.assert_close(cond_only[2:], expected_cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-6)


def test_controlnet_and_controlnext_mixed_in_one_call_equal_the_composition_by_hand():
    unet = tiny_unet()
    first, second = tiny_controlnet(unet, seed=1), tiny_controlnet(unet, seed=2)
    controlnext = tiny_controlnext(injection="conv_in")
    sample, t, text, condition = inputs()
    units = [ControlUnit(first, condition, scale=0.8), ControlUnit(controlnext, condition.flip(-1), scale=0.5),
             ControlUnit(second, condition.flip(-2), scale=0.3)]
    with torch.no_grad():
        with attach_control(unet, units):
            got = unet(sample, t, text).sample
        # by hand: both ControlNets' residuals summed and passed as diffusers documents it, with the
        # ControlNeXt addition alone on the hooks (checked against a written-out UNet in test_attach)
        d1, m1 = first(sample, t, text, controlnet_cond=condition, conditioning_scale=0.8, return_dict=False)
        d2, m2 = second(sample, t, text, controlnet_cond=condition.flip(-2), conditioning_scale=0.3, return_dict=False)
        residuals = dict(down_block_additional_residuals=[a + b for a, b in zip(d1, d2)],
                         mid_block_additional_residual=m1 + m2)
        with attach_control(unet, ControlUnit(controlnext, condition.flip(-1), scale=0.5)):
            expected = unet(sample, t, text, **residuals).sample
        controlnets_only = unet(sample, t, text, **residuals).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - controlnets_only).abs().max() > 1e-3  # the ControlNeXt part really acts


def test_control_features_and_scale_features_follow_the_interface():
    controlnet = tiny_controlnet()
    sample, t, text, condition = inputs()
    down, mid = controlnet.control_features(condition, t.expand(2), {"sample": sample, "encoder_hidden_states": text})
    scaled_down, scaled_mid = controlnet.scale_features((down, mid), torch.tensor([0.0, 2.0]))
    assert len(down) == 4 and isinstance(down, tuple)
    assert torch.equal(scaled_mid[0], torch.zeros_like(mid[0]))
    torch.testing.assert_close(scaled_down[1][1], 2 * down[1][1])
    assert controlnet.injection == "residuals" and controlnet.shares_across_cfg is False


def residuals_of(controlnet, seed=0):
    sample, t, text, condition = inputs(seed=seed)
    with torch.no_grad():
        down, mid = controlnet.control_features(condition, t.expand(2), {"sample": sample, "encoder_hidden_states": text})
    return torch.cat([d.flatten() for d in down] + [mid.flatten()])


def test_our_format_round_trip(tmp_path):
    unet = tiny_unet()
    controlnet = tiny_controlnet(unet)
    save_controlnet(tmp_path, controlnet, metadata={"scale": 0.6, "condition": "canny"})
    assert json.loads((tmp_path / "control.json").read_text())["method"] == "controlnet"
    loaded = load_control(tmp_path, unet)
    assert isinstance(loaded.model, ControlNet) and loaded.method == "controlnet"
    assert loaded.scale == 0.6 and loaded.metadata["condition"] == "canny"
    torch.testing.assert_close(residuals_of(loaded.model), residuals_of(controlnet))


def test_a_diffusers_controlnet_folder_is_detected_and_loads(tmp_path):
    from diffusers import ControlNetModel

    unet = tiny_unet()
    controlnet = tiny_controlnet(unet)
    plain = ControlNetModel.from_config(controlnet.config)
    plain.load_state_dict(controlnet.state_dict())
    plain.save_pretrained(tmp_path)  # diffusers' own folder: no control.json
    assert not (tmp_path / "control.json").exists()
    loaded = load_control(tmp_path, unet)
    assert loaded.method == "controlnet"
    torch.testing.assert_close(residuals_of(loaded.model), residuals_of(controlnet))
    # and ours loads with diffusers alone
    save_controlnet(tmp_path / "ours", controlnet)
    again = ControlNetModel.from_pretrained(tmp_path / "ours")
    assert type(again) is ControlNetModel


def to_ldm_controlnet(state_dict, layers_per_block=1):
    """Rename a diffusers ControlNet state dict to the original ControlNet release's key names."""
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
              ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": "input_hint_block.14", "controlnet_mid_block": "middle_block_out.0"}
    out = {}
    for key, value in state_dict.items():
        module, param = key.rsplit(".", 1)
        if module in fixed:
            name = fixed[module]
        elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
            name = f"input_hint_block.{2 * (int(m[1]) + 1)}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
            name = f"zero_convs.{m[1]}.0"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            index = 1 + int(m[1]) * (layers_per_block + 1) + int(m[3])
            rest = m[4]
            for new, old in resnet if m[2] == "resnets" else ():
                rest = rest.replace(new, old)
            name = f"input_blocks.{index}.{0 if m[2] == 'resnets' else 1}.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            name = f"input_blocks.{1 + int(m[1]) * (layers_per_block + 1) + layers_per_block}.0.op"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
            rest = m[3]
            for new, old in resnet if m[1] == "resnets" else ():
                rest = rest.replace(new, old)
            name = f"middle_block.{2 * int(m[2]) if m[1] == 'resnets' else 1}.{rest}"
        else:
            raise KeyError(key)
        out[f"{name}.{param}"] = value.contiguous()
    return out


@pytest.mark.parametrize("release_widths", [True, False])
def test_an_original_single_file_loads(tmp_path, release_widths):
    from diffusers import ControlNetModel

    unet = tiny_unet()
    torch.manual_seed(3)
    # the release's conditioning widths (16, 32, 96, 256) follow from the base UNet's config alone;
    # other widths need the file's own config
    controlnet = ControlNetModel.from_unet(unet) if release_widths else tiny_controlnet(unet)
    file = tmp_path / "control_sd15_tiny.safetensors"
    save_file(to_ldm_controlnet(controlnet.state_dict()), str(file))
    config = None
    if not release_widths:
        controlnet.save_config(tmp_path / "config")
        config = tmp_path / "config"
    loaded = load_control(file, unet, config=config)
    assert loaded.method == "controlnet" and isinstance(loaded.model, ControlNet)
    for name, value in controlnet.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


def test_a_single_file_without_a_usable_config_is_refused_in_one_line(tmp_path):
    unet = tiny_unet()
    file = tmp_path / "control.safetensors"
    save_file(to_ldm_controlnet(tiny_controlnet(unet).state_dict()), str(file))
    # the base's UNet config implies the release's conditioning widths (16, 32, 96, 256), not this file's
    with pytest.raises(ControlNextError, match="pass config=") as error:
        load_controlnet(file, unet)
    assert "\n" not in str(error.value)


def test_a_controlnet_for_another_base_is_refused(tmp_path):
    other = tiny_controlnet(tiny_unet(cross_attention_dim=32))
    save_controlnet(tmp_path, other)
    unet = tiny_unet()
    with pytest.raises(ControlNextError, match="made for another base model") as error:
        load_control(tmp_path, unet)
    assert "\n" not in str(error.value) and "cross_attention_dim" in str(error.value)
    with pytest.raises(ControlNextError, match="made for another base model"):
        attach_control(unet, ControlUnit(other, torch.rand(1, 3, 64, 64)))


def test_controlnext_folders_still_load_as_controlnext(tmp_path):
    save_controlnext(tmp_path, tiny_controlnext())
    (tmp_path / "control.json").unlink()  # no control.json, config.json of a ControlNeXt module
    assert load_control(tmp_path, tiny_unet()).method == "controlnext"


def test_training_through_the_attachment_reaches_the_zero_convolutions():
    unet = tiny_unet()
    controlnet = tiny_controlnet(unet, zero_convs=True).train()
    sample, t, text, condition = inputs()
    with attach_control(unet, ControlUnit(controlnet, condition), cfg=False):
        loss = unet(sample, t, text).sample.square().mean()
    loss.backward()
    # zero convolutions start at zero yet receive gradients (Sec. 3.1), so training moves away from the base
    assert controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    assert all(conv.weight.grad.abs().sum() > 0 for conv in controlnet.controlnet_down_blocks)


def test_sdxl_style_added_conditions_reach_the_controlnet_rows_it_runs_on():
    unet = tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    controlnet = tiny_controlnet(unet)
    sample, t, text, condition = inputs(batch=4)
    g = torch.Generator().manual_seed(5)
    added = {"text_embeds": torch.randn(4, 8, generator=g), "time_ids": torch.rand(4, 6, generator=g) * 512}
    cond_rows = {k: v[2:] for k, v in added.items()}
    with torch.no_grad():
        base = unet(sample, t, text, added_cond_kwargs=added).sample
        with attach_control(unet, ControlUnit(controlnet, condition[:2]), apply_to="cond"):
            got = unet(sample, t, text, added_cond_kwargs=added).sample
        down, mid = controlnet(sample[2:], t, text[2:], controlnet_cond=condition[:2], added_cond_kwargs=cond_rows,
                               return_dict=False)
        expected = unet(sample[2:], t, text[2:], added_cond_kwargs=cond_rows, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
    assert torch.equal(got[:2], base[:2])
    torch.testing.assert_close(got[2:], expected, rtol=1e-5, atol=1e-6)
