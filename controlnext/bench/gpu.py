"""The checks and figures only a GPU gives: half-precision generation, step and training cost, whole SDXL
generation against diffusers' own ControlNet pipeline, and `torch.compile` with control attached.

Every model has random weights of the public SD1.5 / SDXL architectures (nothing is downloaded), so the
figures are about cost and numerics, not image quality. `python -m controlnext.bench.gpu` runs it all
and writes one JSON file; `--tiny` runs the same code on toy components (the test suite does that on
the CPU, so the script cannot rot while no GPU is at hand).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..control import ControlUnit, attach_control
from ..models import ControlNet, ControlNeXtModel
from .architectures import ARCHITECTURES

RESOLUTIONS = {"sd15": 512, "sdxl": 1024}


# -- components ------------------------------------------------------------------------------------------

def full_components(architecture: str) -> dict:
    """Random-weight pipeline parts of the public SD1.5 or SDXL configuration (tokenizer: character-level)."""
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ..testing import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="controlnext-tokenizer-") as folder:
        write_clip_tokenizer(Path(folder), max_length=77)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu", **text)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.13025 if architecture == "sdxl" else 0.18215)
    parts = dict(unet=UNet2DConditionModel(**ARCHITECTURES[architecture]["unet"]), vae=vae,
                 text_encoder=CLIPTextModel(clip_l), tokenizer=tokenizer)
    if architecture == "sdxl":
        clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                projection_dim=1280, hidden_act="gelu", **text)
        parts.update(text_encoder_2=CLIPTextModelWithProjection(clip_g), tokenizer_2=tokenizer,
                     scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                      steps_offset=1, timestep_spacing="leading"))
    else:
        parts.update(scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return parts


def tiny_components(architecture: str) -> dict:
    from ..testing import tiny_pipeline_components, tiny_sdxl_components

    if architecture == "sdxl":
        return tiny_sdxl_components()
    parts = tiny_pipeline_components()
    parts.pop("image_encoder")
    return {**parts, "requires_safety_checker": False}


def build_pipeline(architecture: str, tiny: bool, device: str, dtype: torch.dtype):
    """A diffusers txt2img pipeline of the architecture, its ControlNeXt (release layout) and a ControlNet."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(0)
    with torch.device(device):
        parts = tiny_components(architecture) if tiny else full_components(architecture)
        cls = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
        pipe = cls(**parts).to(device, dtype)
        unet = pipe.unet
        if tiny:
            from ..testing import tiny_controlnet, tiny_controlnext

            controlnext = tiny_controlnext(injection="conv_in", out_channels=unet.config.block_out_channels[0])
            controlnet = tiny_controlnet(unet)
        else:
            controlnext = ControlNeXtModel.from_variant(ARCHITECTURES[architecture]["controlnext_variant"])
            controlnet = ControlNet.from_unet(unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe, controlnext.to(device, dtype).eval(), controlnet.to(device, dtype).eval()


# -- measures --------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _generate(pipe, units, size: int, steps: int, device: str, **extra) -> tuple[torch.Tensor, float]:
    """One seeded generation (latents out), with `units` attached; returns the output and its seconds."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    options = dict(prompt="a house by a lake", negative_prompt="blurry", num_inference_steps=steps,
                   guidance_scale=7.0, height=size, width=size, generator=generator, output_type="latent", **extra)
    _sync(device)
    started = time.perf_counter()
    if units:
        with attach_control(pipe.unet, units, scheduler=pipe.scheduler):
            out = pipe(**options).images
    else:
        out = pipe(**options).images
    _sync(device)
    return out.float().cpu(), time.perf_counter() - started


def check_generation(pipe, controlnext, controlnet, size: int, steps: int, device: str) -> dict:
    """Each method's generation is finite; ControlNeXt at scale 0 gives the base's latents bit for bit."""
    condition = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, pipe.unet.dtype)
    base, _ = _generate(pipe, [], size, steps, device)
    result = {"base_finite": bool(torch.isfinite(base).all())}
    for name, model in (("controlnext", controlnext), ("controlnet", controlnet)):
        out, _ = _generate(pipe, [ControlUnit(model, condition, 1.0)], size, steps, device)
        result[f"{name}_finite"] = bool(torch.isfinite(out).all())
        result[f"{name}_changes_output"] = float((out - base).abs().max())
    zero, _ = _generate(pipe, [ControlUnit(controlnext, condition, 0.0)], size, steps, device)
    blank = torch.zeros_like(condition)
    flat, _ = _generate(pipe, [ControlUnit(controlnext, blank, 1.0)], size, steps, device)
    result.update(controlnext_scale0_equals_base=bool(torch.equal(zero, base)),
                  controlnext_blank_condition_finite=bool(torch.isfinite(flat).all()))
    return result


def time_whole_generation(pipe, controlnext, controlnet, architecture: str, size: int, steps: int, rounds: int,
                          device: str) -> dict:
    """Interleaved rounds: the bare pipeline, ControlNeXt attached, and diffusers' own ControlNet pipeline."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    cls = StableDiffusionXLControlNetPipeline if architecture == "sdxl" else StableDiffusionControlNetPipeline
    own = cls(**{**pipe.components, "controlnet": controlnet})
    own.set_progress_bar_config(disable=True)
    condition = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, pipe.unet.dtype)
    units = [ControlUnit(controlnext, condition, 1.0)]
    runs = {
        "base": lambda: _generate(pipe, [], size, steps, device)[1],
        "controlnext": lambda: _generate(pipe, units, size, steps, device)[1],
        "diffusers_controlnet": lambda: _generate(own, [], size, steps, device, image=condition)[1],
    }
    seconds = {name: [] for name in runs}
    for round_ in range(rounds + 1):  # the first round warms up
        for name, run in runs.items():
            elapsed = run()
            if round_:
                seconds[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"steps": steps, "size": size, "rounds": rounds, "seconds": seconds, "median": median,
            "overhead": {name: median[name] / median["base"] - 1 for name in median if name != "base"}}


def check_compile(pipe, controlnext, size: int, steps: int, device: str, backend: str) -> dict:
    """Hooks installed, then the UNet compiled in place: same latents as eager, no recompilation later."""
    import torch._dynamo

    condition = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, pipe.unet.dtype)
    units = [ControlUnit(controlnext, condition, 1.0)]
    eager, eager_seconds = _generate(pipe, units, size, steps, device)
    with attach_control(pipe.unet, units, scheduler=pipe.scheduler):
        pipe.unet.compile(backend=backend)
        try:
            torch._dynamo.reset()
            _generate(pipe, [], size, steps, device)  # compiles
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            compiled, compiled_seconds = _generate(pipe, [], size, steps, device)
            recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        finally:
            pipe.unet._compiled_call_impl = None  # back to eager for whatever runs next
    return {"backend": backend, "max_abs_difference": float((compiled - eager).abs().max()),
            "graphs_compiled_after_first_generation": recompiles,
            "eager_seconds": eager_seconds, "compiled_seconds": compiled_seconds,
            "speedup": eager_seconds / compiled_seconds}


def run_checks(architectures=("sd15", "sdxl"), tiny: bool = False, device: str = "cuda", dtype: str = "fp16",
               steps: int = 30, rounds: int = 3, training_steps: int = 3, compile_backend: str | None = "inductor",
               log=print) -> dict:
    """Everything above for each architecture; returns one JSON-ready dictionary."""
    from .overhead import make_setup, time_steps
    from .report import machine_info
    from .training_cost import measure_training_cost

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    results = {"machine": machine_info(), "device": device, "dtype": dtype, "tiny": tiny, "architectures": {}}
    if device.startswith("cuda"):
        results["machine"]["gpu"] = torch.cuda.get_device_name()
    for architecture in architectures:
        size = 64 if tiny else RESOLUTIONS[architecture]
        log(f"{architecture}: building random-weight components at {size} px ({dtype}, {device})")
        pipe, controlnext, controlnet = build_pipeline(architecture, tiny, device, torch_dtype)
        entry = {"size": size}
        entry["generation_check"] = check_generation(pipe, controlnext, controlnet, size, min(steps, 4), device)
        log(f"{architecture}: generation check {entry['generation_check']}")
        setup = make_setup(pipe.unet, controlnext, controlnet, size, dtype=torch_dtype,
                           added_cond=architecture == "sdxl")
        entry["step"] = time_steps(setup, repeats=5 * rounds, warmup=2, sync=lambda: _sync(device))["wall"]
        log(f"{architecture}: step overhead {entry['step']['overhead']}")
        entry["generation"] = time_whole_generation(pipe, controlnext, controlnet, architecture, size, steps, rounds,
                                                    device)
        log(f"{architecture}: whole generation {entry['generation']['median']}")
        if compile_backend:
            entry["compile"] = check_compile(pipe, controlnext, size, steps, device, compile_backend)
            log(f"{architecture}: compile {entry['compile']}")
        del pipe, controlnext, controlnet, setup
        if not tiny:
            entry["training"] = measure_training_cost(architecture, resolution=size, steps=training_steps,
                                                      device=device, autocast=dtype, log=log)
            log(f"{architecture}: training {entry['training'].get('time_ratio')}")
        results["architectures"][architecture] = entry
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlnext.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", nargs="+", default=["sd15", "sdxl"], choices=sorted(RESOLUTIONS))
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="default: fp16")
    parser.add_argument("--steps", type=int, default=30, help="steps of a whole generation (default: 30)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (default: 3)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend; 'none' skips it")
    parser.add_argument("--tiny", action="store_true", help="toy components: checks the code path, not the figures")
    parser.add_argument("--output", default="gpu-results.json", help="JSON file to write (default: gpu-results.json)")
    parser.add_argument("--report", action="store_true",
                        help="also merge the figures into BENCHMARKS.json and rewrite BENCHMARKS.md")
    args = parser.parse_args(argv)
    results = run_checks(args.architecture, args.tiny, args.device, args.dtype, args.steps, args.rounds,
                         compile_backend=None if args.compile_backend == "none" else args.compile_backend)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    if args.report:
        from .report import render_markdown, update_results

        Path("BENCHMARKS.md").write_text(render_markdown(update_results("BENCHMARKS.json", gpu=results)))
        print("wrote BENCHMARKS.md and BENCHMARKS.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
