"""Official ControlNeXt releases, written as they ship, load and run as the authors' own code runs them.

Each case writes a release-shaped folder (module file beside a UNet file, in the release's dtype and file
names), loads it with `load_control` against its base, attaches it, and compares one UNet call with a
hand-written reference of the official code: their module, their loading of the UNet file, and their UNet
forward with the addition (official_code.py). The bases are small UNets with the real width where the
control joins them.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from controlnext.control import ControlUnit, attach_control
from controlnext.control.loading import absolute_weights, detect_variant, load_control, release_scale, save_controlnext
from controlnext.errors import ControlNextError
from controlnext.models import ControlNeXtModel
from official_code import official_load_unet_file, official_module, reference_unet


# -- bases and release folders ----------------------------------------------------------------------

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32,
            cross_attention_dim=16, attention_head_dim=8, time_embedding_dim=64)
BASES = {
    # SD1.5-like: 320 channels after down_blocks[0], attention (to_out) in the first block
    "sd15": dict(UNET, block_out_channels=(320, 320), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD1.5 v1 release: 1280 channels after the mid block
    "sd15-v1": dict(UNET, block_out_channels=(32, 1280), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2D"),
    # SDXL-like: 320 channels at conv_in, text-time embedding, cross attention (attn2) in the second block
    "sdxl": dict(UNET, block_out_channels=(320, 320), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40),
}
TRAINED = {"sd15": "to_out", "sd15-v1": "to_out", "sdxl": "attn2.to_out"}  # what each recipe trains


def base_unet(kind, seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**BASES[kind]).eval()


def trained_tensors(unet, pattern, seed=1, size=0.05):
    """The base's tensors matching `pattern` plus a random change of `size` times their spread."""
    g = torch.Generator().manual_seed(seed)
    return {name: p.detach() + size * p.detach().std() * torch.randn(p.shape, generator=g)
            for name, p in unet.named_parameters() if pattern in name}


def write_release(folder, variant, unet, unet_file, increments, seed=2, learnable_scale=None):
    """A release folder: the module in fp32 as controlnet.safetensors, the trained UNet tensors in fp16."""
    torch.manual_seed(seed)
    module = ControlNeXtModel.from_variant(variant)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if learnable_scale is not None:
        state["scale"] = torch.tensor(learnable_scale)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "controlnet.safetensors"))
    trained = trained_tensors(unet, TRAINED.get(variant, "to_out"))
    base = dict(unet.named_parameters())
    stored = {k: (v - base[k].detach() if increments else v).half().contiguous() for k, v in trained.items()}
    save_file(stored, str(folder / unet_file))
    return state


def inputs(unet, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, 16, generator=g)
    condition = torch.rand(batch, 3, 64, 64, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(batch, 16, generator=g),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)}
    return sample, torch.tensor(601), text, added, condition


# variant, folder name, UNet file name, stored as increments, module layout, addition (point, eps, pool first),
# recommended scale, learnable scale in the file
RELEASES = [
    ("sdxl", "controlnext-sdxl-anime-canny", "unet.safetensors", True, "v2", ("conv_in", 1e-12, False), 0.35, None),
    ("sdxl", "controlnext-sdxl-vidit-depth", "unet.safetensors", True, "v2", ("conv_in", 1e-12, False), 1.0, None),
    ("sd15-v1", "controlnext-sd15", "unet.safetensors", False, "v1", ("mid_block", 1e-12, True), 1.0, 0.8),
    ("sd15", "controlnext-sd15-training", "unet.safetensors", False, "v2", ("down_blocks.0", 1e-12, True), 0.35, None),
]


@pytest.mark.parametrize("variant,name,unet_file,increments,layout,addition,scale,learnable", RELEASES)
def test_release_folder_runs_as_the_official_code(tmp_path, variant, name, unet_file, increments, layout, addition,
                                                  scale, learnable):
    unet = base_unet(variant)
    folder = tmp_path / name
    state = write_release(folder, variant, unet, unet_file, increments, learnable_scale=learnable)
    sample, t, text, added, condition = inputs(unet)
    kwargs = {"added_cond_kwargs": added} if added else {}

    loaded = load_control(folder, unet)
    assert loaded.metadata["variant"] == variant and loaded.scale == scale
    with torch.no_grad(), attach_control(unet, ControlUnit(loaded.model, condition, loaded.scale,
                                                           unet_weights=loaded.unet_weights)):
        got = unet(sample, t, text, **kwargs).sample
    with torch.no_grad():
        plain = unet(sample, t, text, **kwargs).sample

        official_load_unet_file(unet, folder / unet_file, increments)
        control = official_module(state, condition, t, layout)
        point, eps, pool_first = addition
        factor = scale * (learnable if learnable is not None else 1.0)
        expected = reference_unet(unet, sample, t, text, control, point, factor, pool_first, eps, added)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # control and trained weights really act


def test_svd_release_module_and_addition_run_as_the_release_code():
    """SVD-v2: the release's unpadded stem, added after down_blocks[0] at 0.2 with eps 1e-5, normalised then pooled."""
    unet = base_unet("sd15")
    torch.manual_seed(4)
    model = ControlNeXtModel.from_variant("svd").eval()
    state = model.state_dict()
    sample, t, text, _, condition = inputs(unet)
    with torch.no_grad():
        torch.testing.assert_close(model(condition, t), official_module(state, condition, t, "v2-svd-release"),
                                   rtol=1e-4, atol=1e-5)
        assert model(torch.rand(1, 3, 128, 128), t).shape[-2:] == (15, 15)  # 16 x 16 with the training code's stem
        with attach_control(unet, ControlUnit(model, condition, 1.0)):
            got = unet(sample, t, text).sample
        expected = reference_unet(unet, sample, t, text, official_module(state, condition, t, "v2-svd-release"),
                                  "down_blocks.0", 0.2, False, 1e-5)
        training_code = reference_unet(unet, sample, t, text, official_module(state, condition, t, "v2"),
                                       "down_blocks.0", 0.2, False, 1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - training_code).abs().max() > 1e-3  # the two stems really differ

    training = ControlNeXtModel.from_variant("svd-training").eval()
    training.load_state_dict(state)  # same keys and shapes
    with torch.no_grad():
        torch.testing.assert_close(training(condition, t), official_module(state, condition, t, "v2"), rtol=1e-4, atol=1e-5)


# -- what the UNet file holds ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_base():
    return base_unet("sd15")


def stored_file(folder, unet, name, kind, size=0.05):
    """Write trained to_out tensors as `kind` ("absolute", "increments" or a factor of the base) under `name`."""
    trained = trained_tensors(unet, "to_out", size=size)
    base = dict(unet.named_parameters())
    stored = {"absolute": trained, "increments": {k: v - base[k].detach() for k, v in trained.items()}}.get(kind)
    if stored is None:
        stored = {k: float(kind) * base[k].detach() for k in trained}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in stored.items()}, str(folder / name))
    return trained


# layout, UNet file name, what it holds, what a control.json beside it says (None: no control.json)
LABELS = [
    ("official", "unet.safetensors", "increments", None),  # the SDXL releases' naming
    ("official", "unet_weight_increasements.safetensors", "absolute", None),  # the reverse
    ("official", "unet.safetensors", "absolute", None),  # the SD1.5 releases' naming
    ("ours", "unet.safetensors", "increments", "absolute"),  # a mislabelled control.json
    ("ours", "unet.safetensors", "absolute", "increments"),
]


@pytest.mark.parametrize("layout,name,holds,says", LABELS)
def test_the_tensors_tell_absolute_weights_from_increments_whatever_the_label(tmp_path, sd15_base, layout, name, holds,
                                                                                 says):
    folder = tmp_path / "control"
    if layout == "ours":
        torch.manual_seed(0)
        save_controlnext(folder, ControlNeXtModel.from_variant("sd15"), metadata={"unet_weights": says})
    else:
        folder.mkdir()
        torch.manual_seed(0)
        save_file(ControlNeXtModel.from_variant("sd15").state_dict(), str(folder / "controlnet.safetensors"))
    trained = stored_file(folder, sd15_base, name, holds)
    loaded = load_control(folder, sd15_base)
    assert set(loaded.unet_weights) == set(trained)
    for key, value in trained.items():  # increments come back in the base's precision, absolute ones as stored
        assert loaded.unet_weights[key].dtype == (torch.float32 if holds == "increments" else torch.float16)
        torch.testing.assert_close(loaded.unet_weights[key].float(), value, atol=2e-3, rtol=0)


@pytest.mark.parametrize("size", [1e-4, 0.05, 1.0])
def test_changes_of_any_size_are_told_apart(tmp_path, sd15_base, size):
    for holds in ("absolute", "increments"):
        trained = stored_file(tmp_path / holds, sd15_base, "unet.safetensors", holds, size=size)
        torch.manual_seed(0)
        save_file(ControlNeXtModel.from_variant("sd15").state_dict(), str(tmp_path / holds / "controlnet.safetensors"))
        loaded = load_control(tmp_path / holds, sd15_base)
        key = next(iter(trained))
        torch.testing.assert_close(loaded.unet_weights[key].float(), trained[key], atol=2e-3 * max(1, size), rtol=1e-3)


def test_an_ambiguous_file_asks_for_the_flag_in_one_line(tmp_path, sd15_base):
    folder = tmp_path / "control"
    torch.manual_seed(0)
    folder.mkdir()
    save_file(ControlNeXtModel.from_variant("sd15").state_dict(), str(folder / "controlnet.safetensors"))
    stored_file(folder, sd15_base, "unet.safetensors", "0.5")  # half the base: neither close to it nor small
    with pytest.raises(ControlNextError, match="--unet-weights") as info:
        load_control(folder, sd15_base)
    assert "\n" not in str(info.value) and "neither close" in str(info.value)
    for mode, factor in (("absolute", 0.5), ("increments", 1.5)):
        loaded = load_control(folder, sd15_base, unet_weights=mode)
        key = next(iter(loaded.unet_weights))
        base = dict(sd15_base.named_parameters())[key].detach()
        torch.testing.assert_close(loaded.unet_weights[key].float(), factor * base, atol=2e-3, rtol=0)


def test_without_the_base_only_a_recorded_kind_or_the_flag_decides(tmp_path, sd15_base):
    folder = tmp_path / "control"
    torch.manual_seed(0)
    folder.mkdir()
    save_file(ControlNeXtModel.from_variant("sd15").state_dict(), str(folder / "controlnet.safetensors"))
    trained = stored_file(folder, sd15_base, "unet.safetensors", "absolute")
    with pytest.raises(ControlNextError, match="needs the base model") as info:
        load_control(folder)
    assert "\n" not in str(info.value)
    assert set(load_control(folder, unet_weights="absolute").unet_weights) == set(trained)
    with pytest.raises(ControlNextError, match="unknown --unet-weights"):
        load_control(folder, sd15_base, unet_weights="relative")


def test_fp16_increments_are_added_in_the_base_precision(sd15_base):
    g = torch.Generator().manual_seed(5)
    params = {k: p for k, p in sd15_base.named_parameters() if "to_out" in k}
    deltas = {k: (1e-3 * torch.randn(p.shape, generator=g)).half() for k, p in params.items()}
    got = absolute_weights(sd15_base, deltas, increments=True)
    for key, p in params.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], p.detach() + deltas[key].float())


# -- layouts, records and scales -----------------------------------------------------------------

def tiny_svd_unet():
    """A small Stable Video Diffusion UNet with the 320 channels the SVD-v2 control joins."""
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        block_out_channels=(320, 320), down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
        up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"), cross_attention_dim=16,
        num_attention_heads=(8, 8), in_channels=8, out_channels=4, layers_per_block=1, sample_size=8,
        projection_class_embeddings_input_dim=24, addition_time_embed_dim=8,
    ).eval()


def test_an_svd_release_folder_is_detected_as_svd(tmp_path):
    unet = tiny_svd_unet()
    torch.manual_seed(0)
    module = ControlNeXtModel.from_variant("svd")
    tensors = module.state_dict()
    assert detect_variant(tensors, unet) == "svd"
    assert detect_variant(tensors, None) == "sd15"  # same keys: only the base or the UNet file tells
    save_file(tensors, str(tmp_path / "controlnet.safetensors"))
    fine_tuned = {k: v + 0.01 * v.std() * torch.randn_like(v) if v.numel() > 1 else v.clone()
                  for k, v in unet.state_dict().items()}
    torch.save(fine_tuned, tmp_path / "unet.bin")  # the release ships the whole UNet, pickled
    loaded = load_control(tmp_path, unet, allow_pickle=True)
    assert loaded.metadata["variant"] == "svd" and loaded.model.config.padded_stem is False
    assert set(loaded.unet_weights) == set(fine_tuned)
    key = "down_blocks.0.resnets.0.temporal_res_block.conv1.weight"
    torch.testing.assert_close(loaded.unet_weights[key], fine_tuned[key])
    # without the base, the UNet file's temporal layers tell
    assert load_control(tmp_path, allow_pickle=True, unet_weights="absolute").metadata["variant"] == "svd"


@pytest.mark.parametrize("variant", ["svd", "svd-training", "sd15", "sdxl"])
def test_a_saved_control_records_its_variant(tmp_path, variant):
    torch.manual_seed(0)
    model = ControlNeXtModel.from_variant(variant)
    save_controlnext(tmp_path, model)
    loaded = load_control(tmp_path)
    assert loaded.metadata["variant"] == variant and loaded.model.official_variant == variant
    assert loaded.model.config.padded_stem == (variant != "svd")


@pytest.mark.parametrize("variant,names,scale,condition", [
    ("sdxl", ("controlnet", "controlnext-sdxl-anime-canny"), 0.35, "canny"),
    ("sdxl", ("controlnet", "controlnext-sdxl-vidit-depth"), 1.0, "depth"),
    ("sdxl", ("controlnet", "controlany-sdxl"), 1.0, None),  # the name does not tell: the user's --scale
    ("sd15", ("controlnet", "my-sd15-control"), 0.35, None),
    ("sd15-v1", ("controlnet", "controlnext-sd15-canny"), 1.0, "canny"),
])
def test_recommended_scales_of_the_releases(variant, names, scale, condition):
    assert release_scale(variant, *names) == (scale, condition)


def test_a_control_json_beside_release_files_sets_scale_and_variant(tmp_path):
    torch.manual_seed(0)
    save_file(ControlNeXtModel.from_variant("svd").state_dict(), str(tmp_path / "controlnet.safetensors"))
    (tmp_path / "control.json").write_text('{"scale": 0.5, "variant": "svd-training"}')
    loaded = load_control(tmp_path)
    assert loaded.scale == 0.5 and loaded.metadata["variant"] == "svd-training" and loaded.model.config.padded_stem
