"""ControlledVideoPipeline on a tiny seeded Stable Video Diffusion pipeline (as diffusers' own SVD tests build it).

The windowed loop is checked against a hand-written version of ControlNeXt's official one (per-window
scheduler steps with the step index reset, stepped latents averaged) and per-frame control against a
hand-written version of the official injection (normalise with eps 1e-5, pool, times scale x 0.2,
conditional half only).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw

from controlnext.control.loading import LoadedControl
from controlnext.errors import ControlNextError
from controlnext.pipelines.video import ControlledVideoPipeline, plan_windows
from controlnext.testing import tiny_svd_controlnext, tiny_svd_pipeline

SIZE = 64


@pytest.fixture(scope="module")
def pipe():
    return tiny_svd_pipeline(seed=0, num_frames=4)


@pytest.fixture(scope="module")
def reference():
    image = Image.new("RGB", (SIZE, SIZE), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((16, 8, 48, 56), fill=(230, 200, 60))
    return image


def poses(count: int) -> torch.Tensor:
    """A bar that moves down frame by frame: (count, 3, 64, 64) in [0, 1]."""
    frames = torch.zeros(count, 3, SIZE, SIZE)
    for k in range(count):
        frames[k, :, 6 * k: 6 * k + 12, 8:40] = 1.0
    return frames


KWARGS = dict(height=SIZE, width=SIZE, num_inference_steps=3, output_type="latent")


def generate(pipeline, image, seed=0, **kwargs):
    return pipeline(image, generator=torch.Generator().manual_seed(seed), **{**KWARGS, **kwargs}).frames


@pytest.mark.parametrize("frames, window, overlap, starts", [
    (10, 4, 2, [0, 2, 4, 6]),
    (9, 4, 1, [0, 3, 5]),  # the last window moves back to end with the video
    (240, 24, 6, list(range(0, 217, 18))),  # the official run: 24 a window, overlap 6, 240 frames
    (14, 14, 4, [0]),
    (14, None, 0, [0]),
])  # fmt: skip
def test_window_plan(frames, window, overlap, starts):
    plan = plan_windows(frames, window, overlap)
    assert [w.frames[0] for w in plan] == starts and plan[-1].frames[-1] == frames - 1
    assert [w.keep_from for w in plan] == [0] + [1] * (len(plan) - 1)
    assert all(w.control_frames[0] == 0 and w.control_frames[1:] == w.frames[1:] for w in plan)


@pytest.mark.parametrize("frames, window, overlap, message", [
    (6, 8, 2, "the video has 6 frames, fewer than one window of 8"),
    (10, 4, 0, "must overlap by 1 to 2 frames"),
    (10, 4, 3, "must overlap by 1 to 2 frames"),
    (10, 1, 0, "at least 2 frames"),
])  # fmt: skip
def test_bad_window_plans_give_one_line(frames, window, overlap, message):
    with pytest.raises(ControlNextError, match=message):
        plan_windows(frames, window, overlap)


def test_one_window_without_control_is_the_diffusers_pipeline(pipe, reference):
    expected = generate(pipe, reference, num_frames=4)
    assert torch.equal(generate(ControlledVideoPipeline(pipe), reference, num_frames=4), expected)


def official_windowed_latents(pipe, image, *, num_frames, window, overlap, guidance, seed=0, module=None,
                              conditions=None, scale=1.0, steps=KWARGS["num_inference_steps"]):
    """ControlNeXt's released windowed loop, written out by hand on diffusers' SVD parts (constant guidance)."""
    generator, device, cfg = torch.Generator().manual_seed(seed), torch.device("cpu"), guidance > 1
    embeddings = pipe._encode_image(image, device, 1, cfg)  # (2, 1, d): zeros, then the image's
    pixels = pipe.video_processor.preprocess(image, height=SIZE, width=SIZE)
    pixels = pixels + 0.02 * randn_tensor(pixels.shape, generator=generator, dtype=pixels.dtype)
    image_latents = pipe._encode_vae_image(pixels, device, 1, cfg).unsqueeze(1).repeat(1, num_frames, 1, 1, 1)
    time_ids = pipe._get_add_time_ids(7 - 1, 127, 0.02, embeddings.dtype, 1, 1, cfg)
    pipe.scheduler.set_timesteps(steps, device=device)
    latents = pipe.prepare_latents(1, num_frames, 8, SIZE, SIZE, embeddings.dtype, device, generator)
    starts = [min(s, num_frames - window) for s in range(0, num_frames - overlap, window - overlap)]
    handle = None
    for t in pipe.scheduler.timesteps:
        stepped, counts = torch.zeros_like(latents), torch.zeros(num_frames)
        for start in dict.fromkeys(starts):
            pipe.scheduler._step_index = None
            x = latents[:, start:start + window]
            if module is not None:
                control_frames = conditions[[0, *range(start + 1, start + window)]]
                control = module(control_frames, t)  # (window, c, H/8, W/8), same for both halves
                row_scale = torch.tensor([0.0] * window + [scale] * window)[:, None, None, None]  # uncond: zero

                def official(block, args, output, control=torch.cat([control, control]), row_scale=row_scale):
                    sample, skips = output
                    mean, std = sample.mean(dim=(1, 2, 3), keepdim=True), sample.std(dim=(1, 2, 3), keepdim=True)
                    c_mean, c_std = control.mean(dim=(1, 2, 3), keepdim=True), control.std(dim=(1, 2, 3), keepdim=True)
                    aligned = (control - c_mean) * (std / (c_std + 1e-5)) + mean
                    return sample + F.adaptive_avg_pool2d(aligned, sample.shape[-2:]) * row_scale * 0.2, skips

                handle = pipe.unet.down_blocks[0].register_forward_hook(official)
            model_input = pipe.scheduler.scale_model_input(torch.cat([x, x]), t)
            model_input = torch.cat([model_input, image_latents[:, start:start + window]], dim=2)
            prediction = pipe.unet(model_input, t, encoder_hidden_states=embeddings, added_time_ids=time_ids,
                                   return_dict=False)[0]
            if handle is not None:
                handle.remove()
            uncond, cond = prediction.chunk(2)
            x = pipe.scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
            keep = 0 if start == 0 else 1
            stepped[:, start + keep:start + window] += x[:, keep:]
            counts[start + keep:start + window] += 1
        latents = stepped / counts.view(1, -1, 1, 1, 1)
    return latents


def test_windows_equal_the_official_windowed_loop(pipe, reference):
    ours = generate(ControlledVideoPipeline(pipe), reference, num_frames=7, frames_per_window=4, overlap=2,
                    min_guidance_scale=2.5, max_guidance_scale=2.5)
    expected = official_windowed_latents(pipe, reference, num_frames=7, window=4, overlap=2, guidance=2.5)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_a_condition_count_that_does_not_match_the_frames_gives_one_line(pipe, reference):
    controlled = ControlledVideoPipeline(pipe, [LoadedControl(tiny_svd_controlnext(1), source="pose")])
    with pytest.raises(ControlNextError, match="5 condition frames for a video of 4 frames"):
        generate(controlled, reference, control_frames=poses(5), num_frames=4)
    with pytest.raises(ControlNextError, match="1 control\\(s\\) loaded but 0 condition sequence"):
        generate(controlled, reference)
    with pytest.raises(ControlNextError, match=r"must be \(frames, 3, 64, 64\), the video's size, not \(4, 3, 32, 32\)"):
        generate(controlled, reference, control_frames=torch.zeros(4, 3, 32, 32))


# -- per-frame control ------------------------------------------------------------------------------

def controlled(pipe, module, scale=1.0):
    return ControlledVideoPipeline(pipe, [LoadedControl(module, scale=scale, source="pose")])


def test_per_frame_control_equals_the_official_injection_on_the_conditional_half(pipe, reference):
    module = tiny_svd_controlnext(1)
    ours = generate(controlled(pipe, module), reference, control_frames=poses(4), min_guidance_scale=2.5,
                    max_guidance_scale=2.5)
    with torch.no_grad():
        expected = official_windowed_latents(pipe, reference, num_frames=4, window=4, overlap=0, guidance=2.5,
                                             module=module, conditions=poses(4))
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours, generate(pipe, reference, num_frames=4, min_guidance_scale=2.5,
                                             max_guidance_scale=2.5), atol=1e-3)  # the control did something


def test_windows_with_control_equal_the_official_windowed_loop(pipe, reference):
    module = tiny_svd_controlnext(1)
    ours = generate(controlled(pipe, module), reference, control_frames=poses(7), frames_per_window=4, overlap=2,
                    min_guidance_scale=2.0, max_guidance_scale=2.0)
    with torch.no_grad():
        expected = official_windowed_latents(pipe, reference, num_frames=7, window=4, overlap=2, guidance=2.0,
                                             module=module, conditions=poses(7))
    assert torch.allclose(ours, expected, atol=1e-5)


def unet_outputs(pipeline, pipe, image, **kwargs):
    """The real UNet's first output in a generation: (2, frames, 4, h, w) under guidance, unconditional first."""
    outputs = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: outputs.append(output[0].clone()))
    try:
        generate(pipeline, image, **kwargs)
    finally:
        handle.remove()
    return outputs[0]


def test_control_acts_on_the_conditional_half_only(pipe, reference):
    with_control = unet_outputs(controlled(pipe, tiny_svd_controlnext(1)), pipe, reference, control_frames=poses(4))
    without = unet_outputs(pipe, pipe, reference, num_frames=4)
    assert torch.equal(with_control[0], without[0])  # unconditional: zero image embeddings and latents, no control
    assert not torch.allclose(with_control[1], without[1], atol=1e-4)


def test_scale_zero_equals_the_base_pipeline(pipe, reference):
    expected = generate(pipe, reference, num_frames=4, output_type="pt")
    got = generate(controlled(pipe, tiny_svd_controlnext(1), scale=0.0), reference, control_frames=poses(4), output_type="pt")
    assert torch.equal(got, expected)


def test_control_frames_may_be_images_of_another_size(pipe, reference):
    """Pose images are covered and centre-cropped to the video size, as every condition is."""
    images = [Image.fromarray((frame.permute(1, 2, 0).numpy() * 255).astype("uint8")).resize((96, 96))
              for frame in poses(4)]
    frames = generate(controlled(pipe, tiny_svd_controlnext(1)), reference, control_frames=images)
    assert frames.shape == (1, 4, 4, SIZE // 8, SIZE // 8)


# -- the official SVD-v2 release ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def release_pipe():
    """The tiny pipeline with a UNet of the release's width (320 channels after down_blocks[0])."""
    from diffusers import StableVideoDiffusionPipeline

    from controlnext.testing import tiny_svd_components, tiny_svd_unet

    unet = tiny_svd_unet(in_channels=8, block_out_channels=(320, 32), num_attention_heads=(8, 1), num_frames=4,
                         down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
                         up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"))
    pipe = StableVideoDiffusionPipeline(**{**tiny_svd_components(num_frames=4), "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_svd_release(folder, unet, fp16: bool):
    """The release as it ships (controlnet.bin + unet.bin, pickled) or as its fp16 safetensors conversion circulates."""
    from safetensors.torch import save_file

    from controlnext.models import ControlNeXtModel

    torch.manual_seed(4)
    module = ControlNeXtModel.from_variant("svd")
    with torch.no_grad():
        module.mid_convs[1].weight.normal_(0, 0.05)  # a visible control
    g = torch.Generator().manual_seed(5)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    whole_unet = {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v.clone()
                  for k, v in unet.state_dict().items()}  # the release trains the whole UNet
    folder.mkdir(parents=True, exist_ok=True)
    if fp16:
        save_file({k: v.half().contiguous() for k, v in state.items()},
                  str(folder / "controlnext-svd_v2-controlnet-fp16.safetensors"))
        save_file({k: v.half().contiguous() for k, v in whole_unet.items()},
                  str(folder / "controlnext-svd_v2-unet-fp16.safetensors"))
        state = {k: v.half().float() for k, v in state.items()}
        whole_unet = {k: v.half().float() for k, v in whole_unet.items()}
    else:
        torch.save(state, folder / "controlnet.bin")
        torch.save(whole_unet, folder / "unet.bin")
    return state, whole_unet


def test_the_official_svd_release_loads_and_runs_as_its_code(release_pipe, reference, tmp_path):
    from official_code import official_module

    from controlnext.control.loading import load_control

    pipe = release_pipe
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    state, whole_unet = write_svd_release(tmp_path, pipe.unet, fp16=False)
    with pytest.raises(ControlNextError, match="pickled file.*--allow-pickle"):
        load_control(tmp_path, pipe.unet)
    loaded = load_control(tmp_path, pipe.unet, allow_pickle=True)
    assert loaded.metadata["variant"] == "svd" and not loaded.model.config.padded_stem  # the release's stem
    try:
        ours = generate(ControlledVideoPipeline(pipe, [loaded]), reference, control_frames=poses(4),
                        min_guidance_scale=2.0, max_guidance_scale=2.0, num_inference_steps=2)
        pipe.unet.load_state_dict(whole_unet, strict=False)  # their loading: the whole UNet, non-strictly
        with torch.no_grad():
            expected = official_windowed_latents(
                pipe, reference, num_frames=4, window=4, overlap=0, guidance=2.0, conditions=poses(4), steps=2,
                module=lambda frames, t: official_module(state, frames, t.reshape(1), "v2-svd-release"))
        assert torch.allclose(ours, expected, atol=1e-4)
    finally:
        pipe.unet.load_state_dict(base_state)


def test_the_fp16_safetensors_conversion_of_the_release_loads(release_pipe, tmp_path):
    from controlnext.control.loading import load_control

    state, whole_unet = write_svd_release(tmp_path, release_pipe.unet, fp16=True)
    loaded = load_control(tmp_path, release_pipe.unet)  # no pickles: no opt-in needed
    assert loaded.metadata["variant"] == "svd" and not loaded.model.config.padded_stem
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    assert set(loaded.unet_weights) == set(whole_unet)
    key = "down_blocks.0.resnets.0.temporal_res_block.conv1.weight"
    assert torch.equal(loaded.unet_weights[key], whole_unet[key])
