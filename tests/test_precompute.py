"""ControlNeXt's timestep-free part, computed once per condition: exactly the plain forward, and reused only when safe."""

import pytest
import torch

from controlnext.control import ControlUnit, attach_control
from controlnext.models import ControlNeXtModel
from controlnext.testing import tiny_controlnext, tiny_unet

LAYOUTS = {
    "release sdxl": "sdxl",
    "release sd15-v1": "sd15-v1",
    "v2 (stem)": dict(),
    "v1 (no stem)": dict(stem_channels=(), block_out_channels=(8, 16, 16), block_groups=(1, 4, 4), mid_residual=False,
                         learnable_scale=True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("timestep", [torch.tensor(10), torch.tensor([999, 3])])
def test_resuming_from_the_precomputed_part_equals_the_plain_forward(layout, timestep):
    options = LAYOUTS[layout]
    torch.manual_seed(0)
    model = ControlNeXtModel.from_variant(options).eval() if isinstance(options, str) else tiny_controlnext(**options)
    condition = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(condition, timestep)
        resumed = model(condition, timestep, precomputed=model.precompute(condition))
    assert torch.equal(resumed, plain)


def count_stem_calls(model):
    calls = []
    model.down_res[0].conv1.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_cache_is_reused_for_the_same_tensor_and_refreshed_when_anything_changes():
    model = tiny_controlnext()
    calls = count_stem_calls(model)
    condition = torch.rand(1, 3, 64, 64)
    features = lambda c, t=500: model.control_features(c, torch.tensor(t), {})  # noqa: E731
    with torch.no_grad():
        first = features(condition)
        second = features(condition, 400)
        assert len(calls) == 1  # the second step reused the stem
        torch.testing.assert_close(second, model(condition, torch.tensor(400)), rtol=0, atol=1e-6)
        condition.mul_(0.5)  # changed in place
        torch.testing.assert_close(features(condition), model(condition, torch.tensor(500)), rtol=0, atol=1e-6)
        model.embedding[0].weight.add_(0.1)  # weights changed
        torch.testing.assert_close(features(condition), model(condition, torch.tensor(500)), rtol=0, atol=1e-6)
        other = condition.clone()  # equal values, another tensor: computed again
        features(other)
    n_cached = len(calls)
    assert not torch.equal(first, features(condition))
    with torch.enable_grad():
        features(condition).sum().backward()  # training never uses the cache
    assert model.down_res[0].conv1.weight.grad is not None
    assert len(calls) == n_cached + 2


def test_steps_of_a_generation_with_the_cache_equal_plain_steps():
    unet = tiny_unet()
    model = tiny_controlnext(injection="conv_in")
    calls = count_stem_calls(model)
    g = torch.Generator().manual_seed(1)
    condition = torch.rand(1, 3, 64, 64, generator=g)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        with attach_control(unet, ControlUnit(model, condition)):
            cached = [unet(sample, t, text).sample for t in (torch.tensor(900), torch.tensor(500))]
        assert model._cache is None  # detaching releases the features
        with torch.enable_grad():  # the attachment's grad path runs the plain forward
            with attach_control(unet, ControlUnit(model, condition)):
                plain = [unet(sample, t, text).sample.detach() for t in (torch.tensor(900), torch.tensor(500))]
    assert len(calls) == 1 + 2
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
