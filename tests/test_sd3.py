"""ControlNeXt and ControlNet on SD3's unmodified diffusion transformer, inside diffusers' own SD3 pipelines."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3ControlNetPipeline

from controlnext.control import ControlUnit, attach_control
from controlnext.control.loading import LoadedControl, load_control, save_controlnet, save_controlnext
from controlnext.errors import ControlNextError
from controlnext.images import tensor_to_pil
from controlnext.pipelines import ControlledPipeline
from controlnext.testing import (tiny_controlnet, tiny_controlnext, tiny_sd3_controlnet, tiny_sd3_controlnext,
                                 tiny_sd3_pipeline, tiny_unet)

CALL = dict(num_inference_steps=3, guidance_scale=5.0, max_sequence_length=4, output_type="np", height=32, width=32)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def condition():
    return tensor_to_pil(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)))


def transformer_inputs(transformer, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    return dict(hidden_states=torch.randn(rows, config.in_channels, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(rows, 20, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(rows, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([700.0] * rows))


def reference_forward(transformer, inputs, control, scale):
    """SD3Transformer2DModel's forward written out, the control added to the image tokens after the patch
    embedding: brought to the patch grid, normalised per sample over tokens and channels (the release's
    Cross Normalization), added; the text tokens never see it."""
    x, p = inputs["hidden_states"], transformer.config.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    tokens = transformer.pos_embed(x)  # (b, n, d)
    c = F.adaptive_avg_pool2d(control, grid).flatten(2).transpose(1, 2)  # (b, n, d) on the patch grid
    mean_x, std_x = tokens.mean(dim=(1, 2), keepdim=True), tokens.std(dim=(1, 2), keepdim=True)
    mean_c, std_c = c.mean(dim=(1, 2), keepdim=True), c.std(dim=(1, 2), keepdim=True)
    tokens = tokens + scale * ((c - mean_c) * (std_x / (std_c + 1e-12)) + mean_x)
    temb = transformer.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
    text = transformer.context_embedder(inputs["encoder_hidden_states"])
    for block in transformer.transformer_blocks:
        text, tokens = block(hidden_states=tokens, encoder_hidden_states=text, temb=temb)
    tokens = transformer.proj_out(transformer.norm_out(tokens, temb))  # (b, n, p * p * c)
    out = tokens.reshape(x.shape[0], *grid, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], -1, grid[0] * p, grid[1] * p)


def test_addition_lands_on_the_image_tokens_after_the_patch_embedding(pipe):
    transformer, module = pipe.transformer, tiny_sd3_controlnext()
    inputs = transformer_inputs(transformer)
    condition = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = {}

    def keep_text(module, args, kwargs):
        seen["text"] = kwargs["encoder_hidden_states"].clone()

    hook = transformer.transformer_blocks[0].register_forward_pre_hook(keep_text, with_kwargs=True)
    with torch.no_grad():
        plain = transformer(**inputs).sample
        base_text = seen.pop("text")
        with attach_control(transformer, ControlUnit(module, condition, scale=0.8), cfg=False):
            controlled = transformer(**inputs).sample
        expected = reference_forward(transformer, inputs, module(condition, inputs["timestep"]), 0.8)
    hook.remove()
    torch.testing.assert_close(controlled, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["text"], base_text, rtol=0, atol=0)  # text tokens untouched
    assert (controlled - plain).abs().max() > 1e-3


def test_once_per_condition_under_cfg_equals_running_on_both_halves(pipe):
    transformer, module = pipe.transformer, tiny_sd3_controlnext()
    inputs = transformer_inputs(transformer)
    one = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    calls = []
    handle = module.register_forward_hook(lambda m, args, output: calls.append(args[0].shape[0]))
    with torch.no_grad():
        with attach_control(transformer, ControlUnit(module, one), cfg=True):
            once = transformer(**inputs).sample
        with attach_control(transformer, ControlUnit(module, torch.cat([one, one])), cfg=False):
            twice = transformer(**inputs).sample
    handle.remove()
    assert calls == [1, 2]  # under CFG one row for both halves
    torch.testing.assert_close(once, twice, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint"])
def test_scale_zero_equals_the_base_pipeline(pipe, condition, task):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    base = {"txt2img": pipe, "img2img": AutoPipelineForImage2Image.from_pipe(pipe),
            "inpaint": AutoPipelineForInpainting.from_pipe(pipe)}[task]
    extra = {"txt2img": {}, "img2img": {"image": condition, "strength": 0.8},
             "inpaint": {"image": condition, "mask_image": condition.convert("L"), "strength": 0.9}}[task]
    controls = [LoadedControl(tiny_sd3_controlnext(), "controlnext"),
                LoadedControl(tiny_sd3_controlnet(pipe.transformer), "controlnet")]
    expected = base("a red circle", generator=torch.Generator().manual_seed(0), **extra, **CALL).images
    controlled = ControlledPipeline(base, controls)
    images = controlled("a red circle", control_images=[condition, condition], control_scales=0.0,
                        generator=torch.Generator().manual_seed(0), **extra, **CALL).images
    assert (images == expected).all()
    changed = controlled("a red circle", control_images=[condition, condition], control_scales=1.0,
                         generator=torch.Generator().manual_seed(0), **extra, **CALL).images
    assert abs(changed - expected).max() > 1e-3


def test_controlnet_equals_diffusers_sd3_controlnet_pipeline(pipe, condition):
    controlnet = tiny_sd3_controlnet(pipe.transformer)
    reference = StableDiffusion3ControlNetPipeline(**pipe.components, controlnet=controlnet)
    reference.set_progress_bar_config(disable=True)
    window = dict(control_guidance_start=0.0, control_guidance_end=0.7)
    expected = reference("a red circle", control_image=condition, controlnet_conditioning_scale=0.7,
                         generator=torch.Generator().manual_seed(0), **window, **CALL).images
    ours = ControlledPipeline(pipe, [LoadedControl(controlnet, "controlnet")])
    images = ours("a red circle", control_images=[condition], control_scales=0.7, control_ends=0.7,
                  generator=torch.Generator().manual_seed(0), **CALL).images
    # diffusers samples the condition's posterior; the toy VAE's posterior std is e^-15, our mode is its mean
    torch.testing.assert_close(torch.from_numpy(images), torch.from_numpy(expected), rtol=0, atol=1e-4)


def test_both_methods_mix_in_one_generation_and_save_and_load(pipe, condition, tmp_path):
    cnx = save_controlnext(tmp_path / "cnx", tiny_sd3_controlnext())
    cn = save_controlnet(tmp_path / "cn", tiny_sd3_controlnet(pipe.transformer))
    loaded = [load_control(cnx, pipe.transformer), load_control(cn, pipe.transformer)]
    assert [c.method for c in loaded] == ["controlnext", "controlnet"]
    images = ControlledPipeline(pipe, loaded)("a red circle", control_images=[condition, condition],
                                              generator=torch.Generator().manual_seed(0), **CALL).images
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_weights_for_a_unet_base_are_refused_on_sd3_and_the_reverse(pipe, tmp_path):
    unet = tiny_unet()
    cases = [
        (save_controlnext(tmp_path / "unet-cnx", tiny_controlnext()), pipe.transformer),
        (save_controlnet(tmp_path / "unet-cn", tiny_controlnet()), pipe.transformer),
        (save_controlnext(tmp_path / "sd3-cnx", tiny_sd3_controlnext()), unet),
        (save_controlnet(tmp_path / "sd3-cn", tiny_sd3_controlnet(pipe.transformer)), unet),
    ]
    for folder, base in cases:
        with pytest.raises(ControlNextError) as error:
            load_control(folder, base)
        message = str(error.value)
        assert "\n" not in message and "base model" in message, message


def test_published_sd3_configs_count_on_the_meta_device():
    from controlnext.bench.sd3 import count_sd3

    entry = count_sd3("sd3-medium")
    assert 2.02e9 < entry["base_transformer"] < 2.04e9  # SD3-medium's 2B transformer
    assert entry["controlnext"]["trainable"] < 0.15 * entry["controlnet"]["trainable"]
    assert 0 < entry["overhead"]["controlnext"] < entry["overhead"]["controlnext_first_step"] < 0.05
    assert 0.4 < entry["overhead"]["controlnet"] < 0.6  # half the joint blocks, on both guidance halves


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint"])
def test_generate_command_runs_an_sd3_base_with_both_methods(pipe, condition, tmp_path, task):
    from controlnext.cli import main
    from controlnext.testing import save_tiny_sd3_pipeline

    base = save_tiny_sd3_pipeline(tmp_path / "base")
    cnx = save_controlnext(tmp_path / "cnx", tiny_sd3_controlnext())
    cn = save_controlnet(tmp_path / "cn", tiny_sd3_controlnet(pipe.transformer))
    condition.save(tmp_path / "condition.png")
    image = str(tmp_path / "condition.png")
    extra = {"txt2img": [], "img2img": ["--init-image", image], "inpaint": ["--init-image", image, "--mask", image]}
    argv = ["generate", "-p", "a red circle", "--base", str(base), "-c", str(cnx), "-i", image, "-c", str(cn),
            "-i", image, "--steps", "2", "--no-progress", "--task", task, "-o", str(tmp_path / "out.png"),
            *extra[task]]
    assert main(argv) == 0 and (tmp_path / "out.png").is_file()
    from controlnext.metadata import read_parameters

    assert read_parameters(tmp_path / "out.png")["scheduler"] == "euler"  # auto: the base's own flow Euler
    assert main([*argv, "--scheduler", "heun", "-o", str(tmp_path / "heun.png")]) == 0
    assert read_parameters(tmp_path / "heun.png")["scheduler"] == "heun"
    assert main([*argv, "--scheduler", "ddim"]) == 2  # SD3 samples the flow: one clear line


@pytest.mark.parametrize("key, family", [("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3"),
                                         ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
                                         ("model.diffusion_model.input_blocks.0.0.weight", "sd")])
def test_single_file_checkpoints_are_told_apart_by_their_keys(tmp_path, key, family):
    from safetensors.torch import save_file

    from controlnext.pipelines.base import _checkpoint_family

    save_file({key: torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert _checkpoint_family(tmp_path / "model.safetensors") == family


def test_after_the_first_joint_block_is_a_site_for_ablation(pipe):
    """The table's other SD3 site: the image tokens a joint block returns; the text tokens it returns stay."""
    transformer, module = pipe.transformer, tiny_sd3_controlnext(injection="transformer_blocks.0")
    inputs = transformer_inputs(transformer)
    condition = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = {}

    def keep(module_, args, kwargs):
        seen.setdefault("calls", []).append((kwargs["hidden_states"].clone(), kwargs["encoder_hidden_states"].clone()))

    hook = transformer.transformer_blocks[1].register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        transformer(**inputs)
        with attach_control(transformer, ControlUnit(module, condition), cfg=False):
            transformer(**inputs)
    hook.remove()
    (plain_tokens, plain_text), (tokens, text) = seen["calls"]
    torch.testing.assert_close(text, plain_text, rtol=0, atol=0)
    assert (tokens - plain_tokens).abs().max() > 1e-3
