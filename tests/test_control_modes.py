"""Control modes (A1111's balanced / prompt / control is more important) for both methods, and CPU offload."""

import numpy as np
import pytest
import torch

from controlnext.control import ControlUnit, attach_control
from controlnext.control.attach import SOFT_WEIGHT, schedule_weight, soft_weights
from controlnext.testing import tiny_controlnet, tiny_controlnext, tiny_unet


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)  # (uncond, cond) rows of classifier-free guidance
    text = torch.randn(2, 5, 16, generator=g)
    condition = torch.rand(1, 3, 64, 64, generator=g)
    return sample, torch.tensor(37), text, condition


def run(unet, units, sample, t, text, **options):
    with torch.no_grad(), attach_control(unet, units, cfg=True, **options):
        return unet(sample, t, text).sample


def test_soft_weights_are_a1111s_sequence_over_sd15s_13_residuals():
    ones = torch.ones(1)
    weighted = soft_weights({"down": tuple(ones for _ in range(12)), "mid": ones})
    got = [float(x) for x in weighted["down"]] + [float(weighted["mid"])]
    assert got == pytest.approx([SOFT_WEIGHT ** (12 - k) for k in range(13)])
    assert got[0] == pytest.approx(0.0994, abs=1e-4) and got[-1] == 1


@pytest.mark.parametrize("method", ["controlnext", "controlnet"])
def test_control_mode_leaves_the_unconditional_half_to_the_base_model(method):
    unet = tiny_unet()
    model = tiny_controlnext() if method == "controlnext" else tiny_controlnet(unet)
    sample, t, text, condition = inputs()
    with torch.no_grad():
        plain = unet(sample, t, text).sample
    balanced = run(unet, ControlUnit(model, condition), sample, t, text)
    control = run(unet, ControlUnit(model, condition, mode="control"), sample, t, text)
    torch.testing.assert_close(control[:1], plain[:1])  # unconditional row: no control
    assert not torch.allclose(balanced[:1], plain[:1]) and not torch.allclose(control[1:], plain[1:])


def test_prompt_mode_of_controlnet_weighs_its_residuals_shallow_to_deep():
    unet = tiny_unet()
    model = tiny_controlnet(unet)
    sample, t, text, condition = inputs()
    with torch.no_grad():
        down, mid = model.control_features(condition.expand(2, -1, -1, -1), t.expand(2),
                                           dict(sample=sample, encoder_hidden_states=text))
        n = len(down) + 1
        weights = [SOFT_WEIGHT ** (n - 1 - k) for k in range(n)]
        expected = unet(sample, t, text, down_block_additional_residuals=[d * w for d, w in zip(down, weights)],
                        mid_block_additional_residual=mid * weights[-1]).sample
    torch.testing.assert_close(run(unet, ControlUnit(model, condition, mode="prompt"), sample, t, text), expected)


def test_prompt_mode_of_controlnext_fades_the_control_over_the_schedule():
    from diffusers import DDIMScheduler

    unet = tiny_unet()
    model = tiny_controlnext()
    sample, _, text, condition = inputs()
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    for step in (0, 5, 9):
        t = scheduler.timesteps[step]
        weight = schedule_weight(step / 10)
        faded = run(unet, ControlUnit(model, condition, mode="prompt"), sample, t, text, scheduler=scheduler)
        scaled = run(unet, ControlUnit(model, condition, scale=weight), sample, t, text, scheduler=scheduler)
        torch.testing.assert_close(faded, scaled)
    assert schedule_weight(0) == 1 and schedule_weight(1) == pytest.approx(SOFT_WEIGHT ** 12)


def test_control_mode_of_controlnext_is_the_conditional_half_at_full_scale():
    from diffusers import DDIMScheduler

    unet, model = tiny_unet(), tiny_controlnext()
    sample, _, text, condition = inputs()
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[7]
    control = run(unet, ControlUnit(model, condition, mode="control"), sample, t, text, scheduler=scheduler)
    cond_only = run(unet, ControlUnit(model, condition), sample, t, text, scheduler=scheduler, apply_to="cond")
    torch.testing.assert_close(control, cond_only)


def test_an_unknown_control_mode_is_refused():
    from controlnext.errors import ControlNextError

    with pytest.raises(ControlNextError, match="unknown control mode 'loud'"):
        attach_control(tiny_unet(), ControlUnit(tiny_controlnext(), mode="loud"))


# -- offload ---------------------------------------------------------------------------------------------

def embedded_request(**options):
    from controlnext.request import ControlSettings, GenerationRequest

    return GenerationRequest("a red circle on a blue background", steps=3, device="cpu",
                             controls=[ControlSettings("canny", "examples/circle.png", end=0.6)], **options)


def test_model_offload_gives_the_same_image():
    from controlnext.generation import generate

    plain = generate(embedded_request())
    offloaded = generate(embedded_request(offload="model"))
    np.testing.assert_array_equal(np.asarray(plain.images[0]), np.asarray(offloaded.images[0]))
    assert offloaded.parameters[0]["offload"] == "model"


def test_layer_by_layer_offload_keeps_the_controls_trained_weights():
    """Sequential offload loads every layer's weights from one CPU dict at each call: the control's changed UNet
    tensors must go there (accelerate's cpu_offload, as diffusers' enable_sequential_cpu_offload applies it)."""
    from accelerate import cpu_offload

    from controlnext.control.attach import offloaded_weights
    from controlnext.generation import load_pipeline, settle

    request = settle(embedded_request())
    pipe = load_pipeline(request)
    condition = ["examples/circle.png"]
    options = dict(control_images=condition, control_ends=0.6, num_inference_steps=3)
    plain = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0), **options).images[0]
    for component in (pipe.unet, pipe.text_encoder, pipe.vae):
        cpu_offload(component, torch.device("cpu"))
    assert offloaded_weights(pipe.unet) is not None
    offloaded = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0),
                     **options).images[0]
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(offloaded))


def test_sequential_offload_on_a_cpu_is_refused_in_one_line():
    from controlnext.errors import ControlNextError
    from controlnext.generation import generate

    with pytest.raises(ControlNextError, match="sequential offload needs a GPU"):
        generate(embedded_request(offload="sequential"))
