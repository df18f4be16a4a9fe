"""The ControlNeXt module: official layouts, Cross Normalization variants, configuration checks."""

import pytest
import torch

from controlnext.models import VARIANTS, ControlNeXtModel, cross_normalize


# the SVD-v2 release's unpadded stem takes 4 pixels off the half-size map: 64 px -> 32 -> 28 -> 14 -> 7
@pytest.mark.parametrize("variant,params_m,channels,side", [
    ("sdxl", 3.53, 320, 8), ("sd15", 3.53, 320, 8), ("sd15-v1", 5.35, 1280, 8), ("svd", 3.53, 320, 7),
    ("svd-training", 3.53, 320, 8),
])
def test_official_layouts_have_the_released_sizes(variant, params_m, channels, side):
    model = ControlNeXtModel.from_variant(variant)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m
    out = model(torch.rand(1, 3, 64, 64), torch.tensor(10))
    assert out.shape == (1, channels, side, side)


def test_official_cross_normalization_takes_the_base_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=g) * 3 + 1
    c = torch.randn(2, 8, 4, 4, generator=g) * 0.01 - 5
    out = cross_normalize(c, x)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)


def test_paper_cross_normalization_standardises_with_the_base_statistics():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 4, 4, generator=g) * 2 + 3
    out = cross_normalize(x, x, eps=0.0, mode="paper")
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    c = torch.randn(2, 8, 4, 4, generator=g)
    expected = (c - x.mean(dim=(1, 2, 3), keepdim=True)) / x.var(dim=(1, 2, 3), keepdim=True, unbiased=False).sqrt()
    torch.testing.assert_close(cross_normalize(c, x, eps=0.0, mode="paper"), expected)


def test_cross_normalization_is_per_sample():
    x = torch.randn(2, 4, 4, 4)
    c = torch.randn(2, 4, 4, 4)
    both = cross_normalize(c, x)
    torch.testing.assert_close(both[1:], cross_normalize(c[1:], x[1:]))


@pytest.mark.parametrize("bad", [dict(injection="up_blocks.1"), dict(cross_norm_mode="batch"),
                                 dict(block_out_channels=(8, 16), block_groups=(2,))])
def test_bad_configuration_is_refused(bad):
    with pytest.raises(ValueError):
        ControlNeXtModel(**bad)


def test_learnable_scale_multiplies_after_normalisation():
    model = ControlNeXtModel.from_variant("sd15-v1")
    x, c = torch.randn(1, 1280, 2, 2), torch.randn(1, 1280, 2, 2)
    with torch.no_grad():
        model.scale.fill_(0.0)
        torch.testing.assert_close(model.inject(x, c), x)
        model.scale.fill_(2.0)
        twice = model.inject(x, c) - x
        model.scale.fill_(1.0)
        torch.testing.assert_close(twice, 2 * (model.inject(x, c) - x))


def test_every_variant_names_a_valid_injection_point():
    for name, config in VARIANTS.items():
        assert ControlNeXtModel.from_variant(name).injection == config["injection"]


FLAT_CONTROLS = {  # control features a blank or nearly blank condition can give: no spread to divide by
    "blank": lambda shape: torch.zeros(shape),
    "constant": lambda shape: torch.full(shape, 0.7),
    "tiny": lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 1e-6,
}


@pytest.mark.parametrize("mode", ["official", "paper"])
@pytest.mark.parametrize("kind", FLAT_CONTROLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_normalization_is_finite_in_half_precision_and_matches_fp32(dtype, kind, mode):
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 + 1
    control = FLAT_CONTROLS[kind](x.shape)
    out = cross_normalize(control.to(dtype), x.to(dtype), mode=mode)
    assert out.dtype == dtype and torch.isfinite(out).all()
    reference = cross_normalize(control.to(dtype).float(), x.to(dtype).float(), mode=mode)
    torch.testing.assert_close(out.float(), reference.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["sdxl", "sd15", "sd15-v1", "svd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_flat_control_injects_finite_features_in_half_precision(variant, dtype):
    model = ControlNeXtModel.from_variant(variant).to(dtype)
    with torch.no_grad():
        model.mid_convs[1].weight.zero_()  # every output value equals the constant bias: a flat feature map
        model.mid_convs[1].bias.fill_(0.25)
        features = model(torch.zeros(1, 3, 64, 64, dtype=dtype), torch.tensor(500))
        assert features.std() == 0
        x = torch.randn(1, model.config.out_channels, 8, 8).to(dtype)
        out = model.inject(x, features)
    assert out.dtype == dtype and torch.isfinite(out).all()
