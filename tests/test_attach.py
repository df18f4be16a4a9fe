"""Attaching ControlNeXt to an unmodified UNet: the addition lands where the official code puts it."""

import pytest
import torch

from controlnext.control import ControlUnit, attach_control
from controlnext.testing import tiny_controlnext, tiny_unet
from official_code import reference_unet


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, 16, generator=g)
    condition = torch.rand(batch, 3, 64, 64, generator=g)
    return sample, torch.tensor(37), text, condition


# injection point, module output channels (the UNet's width there), pool before normalising
POINTS = [
    ("conv_in", 8, False),
    ("down_blocks.0", 8, True),
    ("down_blocks.0", 8, False),
    ("mid_block", 16, True),
]


@pytest.mark.parametrize("point,channels,pool_first", POINTS)
def test_addition_lands_where_the_official_code_puts_it(point, channels, pool_first):
    unet = tiny_unet()
    model = tiny_controlnext(out_channels=channels, injection=point, pool_before_norm=pool_first)
    sample, t, text, condition = inputs()
    with torch.no_grad():
        control = model(condition, t)
        expected = reference_unet(unet, sample, t, text, control, point, 0.7, pool_first)
        plain = unet(sample, t, text).sample
        with attach_control(unet, ControlUnit(model, condition, scale=0.7)):
            got = unet(sample, t, text).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the control really changes the output


@pytest.mark.parametrize("point,channels,pool_first", POINTS[:1] + POINTS[3:])
def test_detach_restores_the_model_exactly(point, channels, pool_first):
    unet = tiny_unet()
    model = tiny_controlnext(out_channels=channels, injection=point)
    sample, t, text, condition = inputs()
    with torch.no_grad():
        before = unet(sample, t, text).sample
        attachment = attach_control(unet, ControlUnit(model, condition))
        controlled = unet(sample, t, text).sample
        attachment.detach()
        after = unet(sample, t, text).sample
    assert torch.equal(before, after)
    assert not torch.equal(before, controlled)
    assert not unet._forward_pre_hooks and not unet.down_blocks[0]._forward_pre_hooks


def test_scale_zero_is_the_base_model():
    unet = tiny_unet()
    sample, t, text, condition = inputs()
    with torch.no_grad():
        base = unet(sample, t, text).sample
        with attach_control(unet, ControlUnit(tiny_controlnext(), condition, scale=0.0)):
            assert torch.equal(unet(sample, t, text).sample, base)


def test_a_second_control_at_scale_zero_changes_nothing():
    unet = tiny_unet()
    sample, t, text, condition = inputs()
    first, second = tiny_controlnext(seed=1), tiny_controlnext(seed=2)
    with torch.no_grad():
        with attach_control(unet, ControlUnit(first, condition)):
            single = unet(sample, t, text).sample
        units = [ControlUnit(first, condition), ControlUnit(second, condition.flip(-1), scale=0.0)]
        with attach_control(unet, units):
            double = unet(sample, t, text).sample
        units[1].scale = 1.0
        with attach_control(unet, units):
            both = unet(sample, t, text).sample
    assert torch.equal(single, double)
    assert not torch.allclose(single, both)


def test_once_per_condition_under_cfg_equals_running_on_both_halves():
    unet = tiny_unet()
    model = tiny_controlnext()
    sample, t, text, condition = inputs(batch=4)
    one = condition[:2]  # two images, each with its own condition; the UNet batch is [uncond, cond]
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    with torch.no_grad():
        with attach_control(unet, ControlUnit(model, one)):  # batch 4 = 2 x condition batch: CFG
            once = unet(sample, t, text).sample
        with attach_control(unet, ControlUnit(model, torch.cat([one, one])), cfg=False):
            twice = unet(sample, t, text).sample
    assert calls == [2, 4]
    torch.testing.assert_close(once, twice, rtol=1e-5, atol=1e-6)


def test_conditional_half_only_leaves_the_unconditional_half_alone():
    unet = tiny_unet()
    sample, t, text, condition = inputs(batch=4)
    with torch.no_grad():
        base = unet(sample, t, text).sample
        with attach_control(unet, ControlUnit(tiny_controlnext(), condition[:2]), apply_to="cond"):
            got = unet(sample, t, text).sample
    assert torch.equal(got[:2], base[:2])
    assert not torch.allclose(got[2:], base[2:])


class FakeScheduler:
    timesteps = torch.tensor([900, 700, 500, 300, 100])


@pytest.mark.parametrize("start,end,expected", [
    (0.0, 1.0, [1, 1, 1, 1, 1]),
    (0.0, 0.4, [1, 1, 0, 0, 0]),
    (0.6, 1.0, [0, 0, 0, 1, 1]),
    (0.2, 0.8, [0, 1, 1, 1, 0]),
])
def test_start_end_window_switches_control_off_outside_it(start, end, expected):
    unet = tiny_unet()
    sample, _, text, condition = inputs()
    unit = ControlUnit(tiny_controlnext(), condition, start=start, end=end)
    seen = []
    with torch.no_grad(), attach_control(unet, unit, scheduler=FakeScheduler()):
        for t in FakeScheduler.timesteps:
            with_control = unet(sample, t, text).sample
            unit.scale = 0.0
            without = unet(sample, t, text).sample
            unit.scale = 1.0
            seen.append(int(not torch.equal(with_control, without)))
    assert seen == expected


def test_trained_base_weights_apply_while_active_and_detach_restores_them():
    unet = tiny_unet()
    sample, t, text, condition = inputs()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"
    original = dict(unet.named_parameters())[name].detach().clone()
    trained = {name: original + 0.5}
    unit = ControlUnit(tiny_controlnext(), condition, unet_weights=trained)
    with torch.no_grad():
        attachment = attach_control(unet, unit)
        unet(sample, t, text)
        assert torch.equal(dict(unet.named_parameters())[name], trained[name])
        attachment.detach()
    assert torch.equal(dict(unet.named_parameters())[name], original)


def test_weights_for_another_base_are_refused():
    from controlnext.errors import ControlNextError

    unet = tiny_unet()
    bad = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight": torch.zeros(3, 3)}
    with pytest.raises(ControlNextError, match="base model"):
        attach_control(unet, ControlUnit(tiny_controlnext(), None, unet_weights=bad))


@pytest.mark.parametrize("point,channels,pool_first", POINTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blank_condition_gives_a_finite_unet_output_in_half_precision(dtype, point, channels, pool_first):
    unet = tiny_unet().to(dtype)
    model = tiny_controlnext(out_channels=channels, injection=point, pool_before_norm=pool_first)
    with torch.no_grad():
        model.mid_convs[1].weight.zero_()  # a flat control whatever the condition: nothing to divide by
        model.mid_convs[1].bias.fill_(0.25)
    model = model.to(dtype)
    sample, t, text, _ = inputs()
    blank = torch.zeros(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad(), attach_control(unet, ControlUnit(model, blank, scale=1.0)):
        out = unet(sample.to(dtype), t, text.to(dtype)).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
