"""Saving and loading controls: our format, the official release layouts, and bad files."""

import pytest
import torch
from safetensors.torch import save_file

from controlnext.control.loading import (
    absolute_weights,
    ldm_to_diffusers_unet_keys,
    load_controlnext,
    load_control,
    read_tensors,
    recommendations,
    save_controlnext,
)
from controlnext.errors import ControlNextError
from controlnext.models import ControlNeXtModel
from controlnext.testing import tiny_controlnext, tiny_unet

TO_OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"


def trained_unet_tensors(unet):
    params = dict(unet.named_parameters())
    return {name: p.detach() + 0.25 for name, p in params.items() if "to_out" in name}


def module_output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model(torch.rand(1, 3, 64, 64, generator=g), torch.tensor(500))


@pytest.mark.parametrize("variant", ["sd15-v1", "sdxl"])
@pytest.mark.parametrize("increments", [False, True])
def test_official_layout_round_trip(tmp_path, variant, increments):
    torch.manual_seed(0)
    model = ControlNeXtModel.from_variant(variant).eval()
    unet = tiny_unet()
    trained = trained_unet_tensors(unet)
    save_controlnext(tmp_path, model, trained, base_unet=unet, increments=increments, layout="official")
    assert (tmp_path / "controlnet.safetensors").is_file()
    # The official modules are SD-sized, wider than the tiny test UNet: load the module without a base,
    # and check the UNet file on its own.
    loaded = load_controlnext(tmp_path / "controlnet.safetensors", None, variant=variant)
    assert loaded.metadata["variant"] == variant
    torch.testing.assert_close(module_output(loaded.model), module_output(model))
    stored = read_tensors(next(tmp_path.glob("unet*.safetensors")))
    got = absolute_weights(unet, stored, increments)
    for name, value in trained.items():
        torch.testing.assert_close(got[name], value)


@pytest.mark.parametrize("increments", [False, True])
def test_official_folder_with_unet_file_loads_against_its_base(tmp_path, increments):
    unet = tiny_unet()
    model = tiny_controlnext()
    trained = trained_unet_tensors(unet)
    save_controlnext(tmp_path, model, trained, base_unet=unet, increments=increments, layout="official")
    # a tiny module is not an official variant; load the module through our format, the UNet file as released
    save_controlnext(tmp_path / "ours", model)
    unet_file = next(tmp_path.glob("unet*.safetensors"))
    assert ("increasements" in unet_file.name) == increments
    loaded = load_control(tmp_path / "ours", unet, unet_file=unet_file, unet_weights="auto" if increments else "absolute")
    assert set(loaded.unet_weights) == set(trained)
    for name, value in trained.items():
        torch.testing.assert_close(loaded.unet_weights[name], value)


def test_our_format_round_trip_keeps_config_and_outputs(tmp_path):
    unet = tiny_unet()
    model = tiny_controlnext(injection="down_blocks.0", pool_before_norm=True)
    recorded = {"scale": 0.5, "guidance": 2, "condition": "canny"}
    save_controlnext(tmp_path, model, trained_unet_tensors(unet), metadata=recorded)
    loaded = load_control(tmp_path, unet)
    assert loaded.model.config.injection == "down_blocks.0" and loaded.model.config.pool_before_norm
    assert loaded.scale == 0.5 and loaded.guidance == 2.0 and loaded.metadata["condition"] == "canny"
    assert recommendations(tmp_path) == {"scale": 0.5, "guidance": 2.0}
    torch.testing.assert_close(module_output(loaded.model), module_output(model))
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()


def test_a_control_that_recommends_nothing_leaves_guidance_open(tmp_path):
    save_controlnext(tmp_path, tiny_controlnext())
    assert load_control(tmp_path, tiny_unet()).guidance is None and recommendations(tmp_path) == {}


@pytest.mark.parametrize("recorded", ['{"guidance": "high"}', '{"guidance": -1}', '{"scale": true}',
                                      '{"guidance": NaN}', '{"scale": [1]}', '[1, 2]'])
def test_a_bad_recommendation_in_control_json_is_one_line(tmp_path, recorded):
    save_controlnext(tmp_path, tiny_controlnext())
    (tmp_path / "control.json").write_text(recorded)
    with pytest.raises(ControlNextError, match="control.json") as error:
        load_control(tmp_path, tiny_unet(), method="controlnext")
    assert "\n" not in str(error.value)


def test_ldm_key_names_convert_to_diffusers_names():
    unet = tiny_unet()
    w = torch.zeros(8, 8)
    ldm = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight": w,
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight": w,
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.bias": w,
    }
    got = ldm_to_diffusers_unet_keys(ldm, unet.config)
    names = dict(unet.named_parameters())
    assert set(got) == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.bias",
    }
    assert all(name in names for name in got)


def test_ldm_named_unet_file_loads(tmp_path):
    unet = tiny_unet()
    save_controlnext(tmp_path, tiny_controlnext())
    value = dict(unet.named_parameters())[TO_OUT].detach() + 1
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight": value},
              str(tmp_path / "unet_ldm.safetensors"))
    loaded = load_control(tmp_path, unet, unet_file=tmp_path / "unet_ldm.safetensors")
    torch.testing.assert_close(loaded.unet_weights[TO_OUT], value)


def test_pickles_need_the_explicit_opt_in(tmp_path):
    model = tiny_controlnext()
    torch.save(model.state_dict(), tmp_path / "controlnet.bin")
    with pytest.raises(ControlNextError, match="allow-pickle"):
        read_tensors(tmp_path / "controlnet.bin")
    tensors = read_tensors(tmp_path / "controlnet.bin", allow_pickle=True)
    assert set(tensors) == set(model.state_dict())


@pytest.mark.parametrize("content,match", [
    (b"not a safetensors file at all", "corrupt"),
    (b"", "corrupt"),
])
def test_corrupt_files_give_one_line(tmp_path, content, match):
    bad = tmp_path / "controlnet.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ControlNextError, match=match) as info:
        load_control(bad)
    assert "\n" not in str(info.value)


def test_missing_weights_give_one_line(tmp_path):
    with pytest.raises(ControlNextError, match="not found"):
        load_control(tmp_path / "nothing")


def test_control_for_another_base_is_refused(tmp_path):
    save_controlnext(tmp_path, tiny_controlnext(out_channels=320))
    with pytest.raises(ControlNextError, match="320 channels"):
        load_control(tmp_path, tiny_unet())


def test_unet_tensors_for_another_base_are_refused(tmp_path):
    save_controlnext(tmp_path, tiny_controlnext(), {TO_OUT: torch.zeros(4, 4)})
    with pytest.raises(ControlNextError, match="trained for"):
        load_control(tmp_path, tiny_unet())


def test_wrong_variant_is_named(tmp_path):
    torch.manual_seed(0)
    save_file(ControlNeXtModel.from_variant("sdxl").state_dict(), str(tmp_path / "controlnet.safetensors"))
    with pytest.raises(ControlNextError, match="variant"):
        load_control(tmp_path / "controlnet.safetensors", variant="sd15-v1")
