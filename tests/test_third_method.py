"""A third control method, defined and registered in this file alone, runs through attach, save/load, training,
the CLI and the web catalog: a toy T2I-Adapter-style residual method (one feature map per UNet down block,
added inside those blocks through diffusers' `down_intrablock_additional_residuals`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn
from training_helpers import write_data_folder

from controlnext import methods
from controlnext.control import ControlUnit, attach_control
from controlnext.control.attach import check_fits
from controlnext.control.loading import LoadedControl, load_control
from controlnext.errors import ControlNextError
from controlnext.testing import tiny_unet

NAME = "toy-adapter"


class ToyAdapter(ModelMixin, ConfigMixin):
    """Condition (b, 3, H, W) -> one map per down block of the base UNet, at that block's width and size."""

    injection = "residuals"
    residual_names = ("down_intrablock_additional_residuals",)
    shares_across_cfg = True  # reads the condition only

    @register_to_config
    def __init__(self, block_out_channels: tuple[int, ...] = (8, 16), factor: int = 8):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(factor)
        widths = [3 * factor * factor, *block_out_channels]
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=1 if i == 0 else 2, padding=1)
                                   for i in range(len(block_out_channels)))

    def forward(self, condition: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(condition)  # (b, 3 f^2, H/f, W/f)
        features = []
        for conv in self.convs:
            x = conv(x)  # (b, c_i, h / 2^i, w / 2^i)
            features.append(x)
        return features

    def control_features(self, condition, timestep, inputs):
        return self(condition)

    def residual_arguments(self, features, scale):
        rows = scale.view(-1, 1, 1, 1)
        return {"down_intrablock_additional_residuals": [f * rows.to(f.dtype) for f in features]}

    def base_mismatch(self, unet):
        widths = tuple(unet.config.block_out_channels)
        if widths != tuple(self.config.block_out_channels):
            return f"was made for block widths {tuple(self.config.block_out_channels)}, but this base has {widths}"
        return None


def load(path, denoiser=None, *, allow_pickle=False):
    path = Path(path)
    metadata = json.loads((path / "control.json").read_text())
    model = ToyAdapter.from_pretrained(path)
    check_fits(model, denoiser, str(path))
    return LoadedControl(model.eval(), NAME, None, float(metadata.get("scale", 1.0)), str(path), metadata)


def save(path, model, base_weights=None, *, original_weights=None, increments=False, metadata=None):
    path = Path(path)
    model.save_pretrained(path)
    (path / "control.json").write_text(json.dumps({"method": NAME, **(metadata or {})}))
    return path


def build(denoiser, config, vae_scale_factor=8):
    return ToyAdapter(tuple(denoiser.config.block_out_channels), vae_scale_factor)


@pytest.fixture(autouse=True)
def registered():
    methods.register(methods.ControlMethod(NAME, ToyAdapter, load=load, save=save, build=build))
    yield
    methods.METHODS.pop(NAME)


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(37), torch.randn(batch, 5, 16, generator=g),
            torch.rand(batch, 3, 64, 64, generator=g))


def test_attaching_equals_diffusers_adapter_path_and_scale_zero_is_the_base():
    unet, adapter = tiny_unet(), build(tiny_unet(), None)
    sample, t, text, condition = inputs()
    with torch.no_grad():
        by_hand = unet(sample, t, text,
                       down_intrablock_additional_residuals=[0.7 * f for f in adapter(condition)]).sample
        with attach_control(unet, ControlUnit(adapter, condition, scale=0.7)):
            got = unet(sample, t, text).sample
        base = unet(sample, t, text).sample
        with attach_control(unet, ControlUnit(adapter, condition[:1]), apply_to="cond"):  # CFG: [uncond, cond]
            cond_only = unet(sample, t, text).sample
        with attach_control(unet, ControlUnit(adapter, condition, scale=0.0)):
            unscaled = unet(sample, t, text).sample
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
    assert (got - base).abs().max() > 1e-3
    assert torch.equal(cond_only[:1], base[:1]) and not torch.allclose(cond_only[1:], base[1:])
    assert torch.equal(unscaled, base)


def test_save_and_load_through_the_registry(tmp_path):
    unet = tiny_unet()
    adapter = build(unet, None)
    methods.get_method(NAME).save(tmp_path / "toy", adapter, metadata={"scale": 0.4})
    loaded = load_control(tmp_path / "toy", unet)
    assert loaded.method == NAME and loaded.scale == 0.4
    condition = inputs()[3]
    with torch.no_grad():
        for mine, theirs in zip(loaded.model(condition), adapter(condition)):
            torch.testing.assert_close(mine, theirs)
    with pytest.raises(ControlNextError, match="made for block widths"):
        load_control(tmp_path / "toy", tiny_unet(block_out_channels=(8, 32)))


def test_trains_with_the_cli_and_generates_with_the_cli(tiny_base, tmp_path):
    from controlnext.cli import main
    from controlnext.web.catalog import ModelCatalog

    data = write_data_folder(tmp_path / "data", count=2)
    assert main(["train", "--base", str(tiny_base), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--method", NAME, "--resolution", "64", "--batch-size", "2", "--max-steps", "2",
                 "--learning-rate", "3e-3", "--checkpoint-every", "0", "--validation-every", "0",
                 "--no-tensorboard", "--no-progress-bar"]) == 0
    trained = load_control(tmp_path / "run")
    fresh = build(tiny_unet(), None)
    assert isinstance(trained.model, ToyAdapter) and trained.metadata["steps"] == 2
    assert trained.metadata["trainable"] == []  # "--trainable auto" is this method's default: none
    assert any(not torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(), fresh.state_dict().values()))

    condition = data / "condition-0.png"
    outputs = []
    for scale in ("1", "0"):
        out = tmp_path / f"scale-{scale}.png"
        assert main(["generate", "-p", "a red circle", "--base", str(tiny_base), "-c", str(tmp_path / "run"),
                     "-i", str(condition), "--scale", scale, "--steps", "2", "--no-progress", "-o", str(out)]) == 0
        outputs.append(np.asarray(Image.open(out)))
    assert not np.array_equal(*outputs)  # the toy control acts on the image

    catalog = ModelCatalog.discover([tmp_path], include_embedded=False)
    assert [entry.path for entry in catalog.controls] == [str(tmp_path / "run")]


def test_half_precision_saving_is_refused_before_training_when_the_method_cannot_store_it(tiny_base, tmp_path, capsys):
    from controlnext.cli import main

    data = write_data_folder(tmp_path / "data", count=2)
    code = main(["train", "--base", str(tiny_base), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--method", NAME, "--resolution", "64", "--max-steps", "2", "--save-precision", "fp16",
                 "--no-tensorboard", "--no-progress-bar"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "--save-precision fp16" in message and "fp32" in message
    assert not (tmp_path / "run" / "control.json").exists()
