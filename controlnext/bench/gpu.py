"""The checks and figures only a GPU gives: half-precision generation, step and training cost, whole SDXL
generation against diffusers' own ControlNet pipeline, and `torch.compile` with control attached.

Every model has random weights of the public SD1.5, SDXL, SD3-medium and SVD-XT architectures (nothing
is downloaded), so the figures are about cost and numerics, not image quality. Step timing and training
cost are taken on the UNet families; every family gets the generation checks and whole-generation times. `python -m controlnext.bench.gpu` runs it all
and writes one JSON file; `--tiny` runs the same code on toy components (the test suite does that on
the CPU, so the script cannot rot while no GPU is at hand).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..control import ControlUnit, attach_control
from ..denoisers import pipeline_denoiser
from ..models import ControlNet, ControlNeXtModel
from .architectures import ARCHITECTURES

RESOLUTIONS = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "svd": (1024, 576)}
UNET_FAMILIES = ("sd15", "sdxl")
VIDEO_FRAMES = {False: 14, True: 6}  # frames of a video check, full size and toy


# -- components ------------------------------------------------------------------------------------------

def _on_cpu(cls, **config):
    """A scheduler keeps its tables on the CPU, whatever device the models are being built on."""
    with torch.device("cpu"):
        return cls(**config)


def _text_parts():
    """A character-level CLIP tokenizer (77 tokens) and the configs of CLIP ViT-L and OpenCLIP ViT-bigG's text towers."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    from ..testing import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="controlnext-tokenizer-") as folder:
        write_clip_tokenizer(Path(folder), max_length=77)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu", **text)
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu", **text)
    return tokenizer, clip_l, clip_g


def full_components(architecture: str) -> dict:
    """Random-weight pipeline parts of the public SD1.5 or SDXL configuration (tokenizer: character-level)."""
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, clip_l, clip_g = _text_parts()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.13025 if architecture == "sdxl" else 0.18215)
    parts = dict(unet=UNet2DConditionModel(**ARCHITECTURES[architecture]["unet"]), vae=vae,
                 text_encoder=CLIPTextModel(clip_l), tokenizer=tokenizer)
    if architecture == "sdxl":
        parts.update(text_encoder_2=CLIPTextModelWithProjection(clip_g), tokenizer_2=tokenizer,
                     scheduler=_on_cpu(EulerDiscreteScheduler, beta_start=0.00085, beta_end=0.012,
                                              beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"))
    else:
        parts.update(scheduler=_on_cpu(DDIMScheduler, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return parts


def full_sd3_components() -> dict:
    """Random-weight SD3-medium parts: its transformer, a 16-channel VAE, both CLIPs; no T5 (diffusers allows it)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from .sd3 import SD3_MEDIUM

    tokenizer, clip_l, clip_g = _text_parts()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return dict(transformer=SD3Transformer2DModel(**SD3_MEDIUM), vae=vae, text_encoder=CLIPTextModelWithProjection(clip_l),
                tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(clip_g), tokenizer_2=tokenizer,
                text_encoder_3=None, tokenizer_3=None, scheduler=_on_cpu(FlowMatchEulerDiscreteScheduler, shift=3.0))


def full_svd_components() -> dict:
    """Random-weight SVD-XT parts: its spatio-temporal UNet, temporal-decoder VAE and ViT-H image encoder."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from .architectures import SVD_XT_UNET

    vae = AutoencoderKLTemporalDecoder(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                       down_block_types=("DownEncoderBlock2D",) * 4)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=1024, hidden_act="gelu"))
    scheduler = _on_cpu(
        EulerDiscreteScheduler, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    return dict(unet=UNetSpatioTemporalConditionModel(**SVD_XT_UNET), vae=vae, image_encoder=encoder,
                feature_extractor=CLIPImageProcessor(), scheduler=scheduler)


def tiny_components(architecture: str) -> dict:
    from ..testing import tiny_pipeline_components, tiny_sdxl_components

    if architecture == "sdxl":
        return tiny_sdxl_components()
    parts = tiny_pipeline_components()
    parts.pop("image_encoder")
    return {**parts, "requires_safety_checker": False}


def build_pipeline(architecture: str, tiny: bool, device: str, dtype: torch.dtype):
    """A diffusers pipeline of the architecture, its ControlNeXt (release layout) and a ControlNet (None for SVD)."""
    import diffusers

    from .. import testing

    torch.manual_seed(0)
    with torch.device(device):
        if architecture == "sd3":
            pipe = testing.tiny_sd3_pipeline() if tiny else diffusers.StableDiffusion3Pipeline(**full_sd3_components())
        elif architecture == "svd":
            parts = testing.tiny_svd_components(num_frames=VIDEO_FRAMES[tiny]) if tiny else full_svd_components()
            pipe = diffusers.StableVideoDiffusionPipeline(**parts)
        else:
            parts = tiny_components(architecture) if tiny else full_components(architecture)
            cls = diffusers.StableDiffusionXLPipeline if architecture == "sdxl" else diffusers.StableDiffusionPipeline
            pipe = cls(**parts)
        pipe = pipe.to(device, dtype)
        controlnext, controlnet = _controls(architecture, pipe, tiny)
    pipe.set_progress_bar_config(disable=True)
    controlnet = controlnet.to(device, dtype).eval() if controlnet is not None else None
    return pipe, controlnext.to(device, dtype).eval(), controlnet


def _controls(architecture: str, pipe, tiny: bool):
    from .. import testing

    if architecture == "sd3":
        if tiny:
            return testing.tiny_sd3_controlnext(), testing.tiny_sd3_controlnet(pipe.transformer)
        from .sd3 import sd3_controls

        parts = sd3_controls(pipe.transformer)
        return parts["controlnext"], parts["controlnet"]
    if architecture == "svd":
        return (testing.tiny_svd_controlnext() if tiny else ControlNeXtModel.from_variant("svd")), None
    if tiny:
        unet = pipe.unet
        return (testing.tiny_controlnext(injection="conv_in", out_channels=unet.config.block_out_channels[0]),
                testing.tiny_controlnet(unet))
    return ControlNeXtModel.from_variant(ARCHITECTURES[architecture]["controlnext_variant"]), ControlNet.from_unet(pipe.unet)


# -- measures --------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _is_video(pipe) -> bool:
    return type(pipe).__name__ == "StableVideoDiffusionPipeline"


def _condition(pipe, size: tuple[int, int], frames: int, blank: bool = False) -> torch.Tensor:
    """A random condition (one per frame for video) in [0, 1], or a blank one, on the pipeline's device."""
    width, height = size
    shape = (frames if _is_video(pipe) else 1, 3, height, width)
    condition = torch.zeros(shape) if blank else torch.rand(shape, generator=torch.Generator().manual_seed(1))
    denoiser = pipeline_denoiser(pipe)
    return condition.to(denoiser.device, denoiser.dtype)


def _generate(pipe, controls, size: tuple[int, int], steps: int, device: str, frames: int = 0,
              attached: bool = False, **extra) -> tuple[torch.Tensor, float]:
    """One seeded generation, latents out, with `controls` [(model, condition, scale)] through ControlledPipeline
    or ControlledVideoPipeline (`attached`: already attached by the caller); returns the latents and the seconds."""
    from PIL import Image

    from ..control.loading import LoadedControl
    from ..pipelines import ControlledPipeline
    from ..pipelines.video import ControlledVideoPipeline

    width, height = size
    generator = torch.Generator(device="cpu").manual_seed(0)
    _sync(device)
    started = time.perf_counter()
    if _is_video(pipe):
        options = dict(height=height, width=width, num_frames=frames, num_inference_steps=steps, decode_chunk_size=2,
                       generator=generator, output_type="latent")
        reference = Image.new("RGB", (width, height), (150, 110, 80))
        if controls:
            video = ControlledVideoPipeline(pipe, [LoadedControl(model) for model, _, _ in controls])
            out = video(reference, control_frames=[c for _, c, _ in controls],
                        control_scales=[scale for _, _, scale in controls], **options).frames
        else:
            out = pipe(reference, **options).frames
    else:
        options = dict(prompt="a house by a lake", negative_prompt="blurry", num_inference_steps=steps,
                       guidance_scale=7.0, height=height, width=width, generator=generator, output_type="latent",
                       **extra)
        if controls and not attached:  # as users call it: conditions prepared per method (SD3 ControlNet: latents)
            controlled = ControlledPipeline(pipe, [LoadedControl(model) for model, _, _ in controls])
            out = controlled(control_images=[c for _, c, _ in controls],
                             control_scales=[scale for _, _, scale in controls], **options).images
        else:
            out = pipe(**options).images
    _sync(device)
    return out.float().cpu(), time.perf_counter() - started


def check_generation(pipe, controlnext, controlnet, size, steps: int, device: str, frames: int = 0) -> dict:
    """Each method's generation is finite; ControlNeXt at scale 0 gives the base's latents bit for bit."""
    condition = _condition(pipe, size, frames)
    run = lambda controls: _generate(pipe, controls, size, steps, device, frames)[0]  # noqa: E731
    base = run([])
    result = {"base_finite": bool(torch.isfinite(base).all())}
    for name, model in (("controlnext", controlnext), ("controlnet", controlnet)):
        if model is not None:
            out = run([(model, condition, 1.0)])
            result[f"{name}_finite"] = bool(torch.isfinite(out).all())
            result[f"{name}_changes_output"] = float((out - base).abs().max())
    zero = run([(controlnext, condition, 0.0)])
    flat = run([(controlnext, _condition(pipe, size, frames, blank=True), 1.0)])
    result.update(controlnext_scale0_equals_base=bool(torch.equal(zero, base)),
                  controlnext_blank_condition_finite=bool(torch.isfinite(flat).all()))
    return result


# diffusers' own ControlNet pipeline of each image family, and the name of its condition argument
OWN_CONTROLNET_PIPELINES = {"sd15": ("StableDiffusionControlNetPipeline", "image"),
                            "sdxl": ("StableDiffusionXLControlNetPipeline", "image"),
                            "sd3": ("StableDiffusion3ControlNetPipeline", "control_image")}


def time_whole_generation(pipe, controlnext, controlnet, architecture: str, size, steps: int, rounds: int,
                          device: str, frames: int = 0) -> dict:
    """Interleaved rounds: the bare pipeline, ControlNeXt attached, and diffusers' own ControlNet pipeline."""
    import diffusers

    condition = _condition(pipe, size, frames)
    runs = {
        "base": lambda: _generate(pipe, [], size, steps, device, frames)[1],
        "controlnext": lambda: _generate(pipe, [(controlnext, condition, 1.0)], size, steps, device, frames)[1],
    }
    if architecture in OWN_CONTROLNET_PIPELINES:
        name, argument = OWN_CONTROLNET_PIPELINES[architecture]
        cls = getattr(diffusers, name)
        takes = inspect.signature(cls.__init__).parameters
        own = cls(**{k: v for k, v in pipe.components.items() if k in takes}, controlnet=controlnet)
        own.set_progress_bar_config(disable=True)
        runs["diffusers_controlnet"] = lambda: _generate(own, [], size, steps, device, **{argument: condition})[1]
    seconds = {name: [] for name in runs}
    for round_ in range(rounds + 1):  # the first round warms up
        for name, run in runs.items():
            elapsed = run()
            if round_:
                seconds[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"steps": steps, "size": list(size), "frames": frames, "rounds": rounds, "seconds": seconds,
            "median": median, "overhead": {name: median[name] / median["base"] - 1 for name in median if name != "base"}}


def check_compile(pipe, controlnext, size, steps: int, device: str, backend: str) -> dict:
    """Hooks installed, then the denoiser compiled in place: same latents as eager, no recompilation later."""
    import torch._dynamo

    denoiser = pipeline_denoiser(pipe)
    controls = [(controlnext, _condition(pipe, size, 0), 1.0)]
    eager, eager_seconds = _generate(pipe, controls, size, steps, device)
    with attach_control(denoiser, [ControlUnit(*control) for control in controls], scheduler=pipe.scheduler):
        denoiser.compile(backend=backend)
        try:
            torch._dynamo.reset()
            _generate(pipe, controls, size, steps, device, attached=True)  # compiles
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            compiled, compiled_seconds = _generate(pipe, controls, size, steps, device, attached=True)
            recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        finally:
            denoiser._compiled_call_impl = None  # back to eager for whatever runs next
    return {"backend": backend, "max_abs_difference": float((compiled - eager).abs().max()),
            "graphs_compiled_after_first_generation": recompiles,
            "eager_seconds": eager_seconds, "compiled_seconds": compiled_seconds,
            "speedup": eager_seconds / compiled_seconds}


def run_checks(architectures=("sd15", "sdxl", "sd3", "svd"), tiny: bool = False, device: str = "cuda",
               dtype: str = "fp16", steps: int = 30, rounds: int = 3, training_steps: int = 3,
               compile_backend: str | None = "inductor", video_steps: int = 10, log=print) -> dict:
    """Everything above for each architecture; returns one JSON-ready dictionary."""
    from .overhead import make_setup, time_steps
    from .report import machine_info
    from .training_cost import measure_training_cost

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    results = {"machine": machine_info(), "device": device, "dtype": dtype, "tiny": tiny, "architectures": {}}
    if device.startswith("cuda"):
        results["machine"]["gpu"] = torch.cuda.get_device_name()
    for architecture in architectures:
        size = (32, 32) if tiny and architecture == "sd3" else (64, 64) if tiny else RESOLUTIONS[architecture]
        size = (size, size) if isinstance(size, int) else size
        video = architecture == "svd"
        frames, run_steps = (VIDEO_FRAMES[tiny], min(steps, video_steps)) if video else (0, steps)
        log(f"{architecture}: building random-weight components at {size[0]}x{size[1]} px ({dtype}, {device})")
        pipe, controlnext, controlnet = build_pipeline(architecture, tiny, device, torch_dtype)
        entry = {"size": list(size), "frames": frames}
        entry["generation_check"] = check_generation(pipe, controlnext, controlnet, size, min(run_steps, 4), device,
                                                     frames)
        log(f"{architecture}: generation check {entry['generation_check']}")
        if architecture in UNET_FAMILIES:
            setup = make_setup(pipe.unet, controlnext, controlnet, size[0], dtype=torch_dtype,
                               added_cond=architecture == "sdxl")
            entry["step"] = time_steps(setup, repeats=5 * rounds, warmup=2, sync=lambda: _sync(device))["wall"]
            log(f"{architecture}: step overhead {entry['step']['overhead']}")
            del setup
        entry["generation"] = time_whole_generation(pipe, controlnext, controlnet, architecture, size, run_steps,
                                                    1 if video else rounds, device, frames)
        log(f"{architecture}: whole generation {entry['generation']['median']}")
        if compile_backend and not video:
            entry["compile"] = check_compile(pipe, controlnext, size, steps, device, compile_backend)
            log(f"{architecture}: compile {entry['compile']}")
        del pipe, controlnext, controlnet
        if architecture in UNET_FAMILIES and not tiny:
            entry["training"] = measure_training_cost(architecture, resolution=size[0], steps=training_steps,
                                                      device=device, autocast=dtype, log=log)
            log(f"{architecture}: training {entry['training'].get('time_ratio')}")
        results["architectures"][architecture] = entry
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlnext.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS),
                        help="default: all (about 10 minutes on one H200; name some to split the run)")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="default: fp16")
    parser.add_argument("--steps", type=int, default=30, help="steps of a whole image generation (default: 30)")
    parser.add_argument("--video-steps", type=int, default=10, help="steps of a whole video generation (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (default: 3)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend; 'none' skips it")
    parser.add_argument("--tiny", action="store_true", help="toy components: checks the code path, not the figures")
    parser.add_argument("--output", default="gpu-results.json", help="JSON file to write (default: gpu-results.json)")
    parser.add_argument("--report", action="store_true",
                        help="also merge the figures into BENCHMARKS.json and rewrite BENCHMARKS.md")
    args = parser.parse_args(argv)
    results = run_checks(args.architecture, args.tiny, args.device, args.dtype, args.steps, args.rounds,
                         compile_backend=None if args.compile_backend == "none" else args.compile_backend,
                         video_steps=args.video_steps)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    if args.report:
        from .suite import record

        record("BENCHMARKS.json", "BENCHMARKS.md", gpu=results)
        print("wrote BENCHMARKS.md and BENCHMARKS.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
