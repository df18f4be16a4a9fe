"""ControlledPipeline inside diffusers' own pipelines: txt2img, img2img, inpaint, schedulers, LoRA."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from controlnext.errors import ControlNextError
from controlnext.pipelines import SCHEDULERS, ControlledPipeline


@pytest.fixture(scope="module")
def pipes(tiny_base, tiny_control):
    return {task: ControlledPipeline.from_pretrained(tiny_base, [tiny_control], task=task)
            for task in ("txt2img", "img2img", "inpaint")}


def circle(size=64):
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), outline="white", width=2)
    return image


def run(pipe, scale=1.0, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    out = pipe("a red circle", control_images=[kwargs.pop("condition", circle())], control_scales=[scale],
               generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return out.images


def base_run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe.pipe("a red circle", generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


TASK_KWARGS = {
    "txt2img": {},
    "img2img": {"image": Image.new("RGB", (64, 64), "blue"), "strength": 0.8},
    "inpaint": {"image": Image.new("RGB", (64, 64), "blue"), "mask_image": Image.new("RGB", (64, 64), "white")},
}


@pytest.mark.parametrize("task", list(TASK_KWARGS))
def test_scale_zero_is_exactly_the_base_pipeline(pipes, task):
    pipe = pipes[task]
    np.testing.assert_array_equal(run(pipe, 0.0, **TASK_KWARGS[task]), base_run(pipe, **TASK_KWARGS[task]))


@pytest.mark.parametrize("task", list(TASK_KWARGS))
def test_control_changes_the_image_deterministically(pipes, task):
    pipe = pipes[task]
    first = run(pipe, 1.0, **TASK_KWARGS[task])
    np.testing.assert_array_equal(first, run(pipe, 1.0, **TASK_KWARGS[task]))
    assert np.abs(first - base_run(pipe, **TASK_KWARGS[task])).max() > 1e-3


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_runs_with_control(tiny_base, tiny_control, scheduler):
    pipe = ControlledPipeline.from_pretrained(tiny_base, [tiny_control], scheduler=scheduler)
    images = run(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(run(pipe, 0.0), base_run(pipe))
    assert np.abs(images - base_run(pipe)).max() > 1e-3


AUTO_CASES = [  # the scheduler a base was loaded with -> what "auto" samples with
    ("DDIMScheduler", "ddim", "DDIMScheduler"),  # the embedded default's own: kept
    ("EulerDiscreteScheduler", "euler", "EulerDiscreteScheduler"),  # SDXL's own: kept
    ("PNDMScheduler", "unipc", "UniPCMultistepScheduler"),  # SD 1.5's own: not one of ours, UniPC instead
    ("DDPMScheduler", "unipc", "UniPCMultistepScheduler"),
]


@pytest.mark.parametrize("loaded, name, used", AUTO_CASES)
def test_auto_keeps_the_base_sampler_when_it_is_one_of_ours(tiny_base, tiny_control, loaded, name, used):
    import diffusers

    pipe = ControlledPipeline.from_pretrained(tiny_base, [tiny_control])
    pipe.loaded_scheduler = getattr(diffusers, loaded).from_config(pipe.pipe.scheduler.config)
    assert pipe.use_scheduler("euler_a") == "euler_a"  # another one first: auto starts again from the loaded one
    assert pipe.use_scheduler("auto") == name and type(pipe.pipe.scheduler).__name__ == used


def test_window_that_never_opens_is_the_base(pipes):
    pipe = pipes["txt2img"]
    closed = pipe("a red circle", control_images=[circle()], control_starts=0.0, control_ends=0.0,
                  num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(closed, base_run(pipe))


def test_batches_of_prompts_and_images(pipes):
    pipe = pipes["txt2img"]
    out = pipe(["a red circle", "a blue square"], control_images=[[circle(), circle(80)]], num_images_per_prompt=2,
               num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (4, 64, 64, 3)


def test_cfg_halves_switch(pipes):
    pipe = pipes["txt2img"]
    both = run(pipe, guidance_scale=5.0)
    cond_only = run(pipe, guidance_scale=5.0, apply_to="cond")
    assert np.abs(both - cond_only).max() > 1e-4


@pytest.mark.parametrize("bad,match", [
    (dict(control_images=[]), "condition image"),
    (dict(control_images=[circle()], control_scales=[1.0, 2.0]), "scale values"),
    (dict(control_images=[circle()], control_starts=0.8, control_ends=0.2), "window"),
    (dict(control_images=[circle()], width=60), "multiple of 8"),
])
def test_bad_arguments_give_one_line(pipes, bad, match):
    with pytest.raises(ControlNextError, match=match) as info:
        pipes["txt2img"]("a red circle", num_inference_steps=1, **bad)
    assert "\n" not in str(info.value)


def test_lora_together_with_control(tmp_path, tiny_base, tiny_control):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = ControlledPipeline.from_pretrained(tiny_base, [tiny_control])
    unet = pipe.pipe.unet
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    unet.delete_adapters(unet.active_adapters())
    plain = run(pipe)

    for weight, same in ((0.0, True), (1.0, False)):
        styled = ControlledPipeline.from_pretrained(tiny_base, [tiny_control],
                                                    loras=[(str(tmp_path / "pytorch_lora_weights.safetensors"), weight)])
        images = run(styled)
        assert np.allclose(images, plain, atol=1e-6) == same


def test_sdxl_pipeline_with_control_after_conv_in(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from controlnext.control.loading import LoadedControl
    from controlnext.testing import tiny_controlnext, tiny_sdxl_components

    base = StableDiffusionXLPipeline(**tiny_sdxl_components())
    base.set_progress_bar_config(disable=True)
    control = LoadedControl(tiny_controlnext(injection="conv_in"))
    pipe = ControlledPipeline(base, [control])
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
    plain = base("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    zero = pipe("a red circle", control_images=[circle()], control_scales=[0.0],
                generator=torch.Generator().manual_seed(0), **kwargs).images
    controlled = pipe("a red circle", control_images=[circle()], generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_array_equal(zero, plain)
    assert controlled.shape == (1, 64, 64, 3) and np.abs(controlled - plain).max() > 1e-3


def test_just_resize_gives_the_condition_the_official_pipelines_give(pipes):
    from diffusers.image_processor import VaeImageProcessor

    noise = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    image = Image.fromarray(noise)  # another size and aspect ratio than the 64 x 64 generation
    official = VaeImageProcessor(do_normalize=False, do_convert_rgb=True).preprocess(image, height=64, width=64)
    pipe = pipes["txt2img"]
    model = pipe.controls[0].model
    stretched = pipe._condition_batch(image, 64, 64, model, "just_resize")
    assert torch.equal(stretched, official.to(stretched.dtype))
    assert not torch.equal(stretched, pipe._condition_batch(image, 64, 64, model, "crop_and_resize"))
    assert np.abs(run(pipe, condition=image, resize_mode="just_resize") - run(pipe, condition=image)).max() > 1e-4
