"""Base models: find and load a Stable Diffusion 1.x/2.x, SDXL or SD3/SD3.5 pipeline, offline first; schedulers; LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ControlNextError
from ..request import BUNDLED_CONTROLS, DEFAULT_BASE, FLOW_SCHEDULERS, SCHEDULERS, TASKS  # noqa: F401 (imported from here too)

FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
}
# Components a family's pipelines may lack; diffusers then needs them passed as None (SD3 runs without T5).
OPTIONAL_PARTS = {"sd3": ("text_encoder_3", "tokenizer_3")}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name not in DTYPES:
        raise ControlNextError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    if device == "cpu" and name == "fp16":
        raise ControlNextError("fp16 does not run on a CPU; use --dtype fp32 (or bf16) there")
    return DTYPES[name]


def set_scheduler(pipe, name: str) -> str:
    """Replace the pipeline's scheduler by another one built from the same config; returns the name used.

    "auto" keeps the base's own sampler when it is one of ours (a base tuned for DDIM, as the embedded default is,
    or SDXL's Euler) and otherwise takes UniPC for SD 1.x/2.x and SDXL (in place of SD 1.5's PNDM, which needs
    more steps); an SD3 base keeps its own flow-matching sampler."""
    import diffusers

    flow = family_of(pipe) == "sd3"
    known = FLOW_SCHEDULERS if flow else SCHEDULERS
    if name == "auto":
        own = type(pipe.scheduler).__name__
        name = next((key for key, cls in known.items() if cls == own), None)
        if name is None:
            if flow:  # a flow-matching sampler of its own that we do not name: left as it is
                return "auto"
            name = "unipc"
        if known[name] == own:
            return name
    if name not in known:
        what = "an SD3 base samples the flow with" if flow else "choose one of"
        raise ControlNextError(f"unknown scheduler {name!r} for this base; {what} {', '.join(['auto', *known])}")
    pipe.scheduler = getattr(diffusers, known[name]).from_config(pipe.scheduler.config)
    return name


def family_of(pipe) -> str:
    family = FAMILIES.get(type(pipe).__name__)
    if family is None:
        raise ControlNextError(f"{type(pipe).__name__} is not a Stable Diffusion 1.x/2.x, SDXL or SD3 pipeline")
    return family


def _checkpoint_family(path: Path) -> str:
    """"sd", "sdxl" or "sd3", read from a single-file checkpoint's key names."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception:
        raise ControlNextError(f"cannot read {path} as a safetensors checkpoint; is it corrupt?") from None
    if any("joint_blocks." in key for key in keys):
        return "sd3"
    return "sdxl" if any(key.startswith("conditioner.embedders.1") for key in keys) else "sd"


def _missing_parts(folder: Path, class_name: str) -> dict:
    """None for each optional part the folder's model_index.json lacks (or stores as null)."""
    family = FAMILIES.get(class_name, "")
    index = json.loads((folder / "model_index.json").read_text())
    return {name: None for name in OPTIONAL_PARTS.get(family, ()) if (index.get(name) or [None])[0] is None}


def call_defaults(pipe) -> dict:
    """Pipeline-call options a base model records for itself: a T5-less SD3 trained on fewer zero tokens than
    diffusers' default 256 names its `max_sequence_length` in training_config.json (the shapes-world SD3)."""
    if family_of(pipe) != "sd3" or getattr(pipe, "text_encoder_3", None) is not None:
        return {}
    record = Path(str(getattr(pipe.config, "_name_or_path", "") or "")) / "training_config.json"
    if not record.is_file():
        return {}
    length = json.loads(record.read_text()).get("max_sequence_length")
    return {"max_sequence_length": int(length)} if length else {}


def load_base(
    source: str | Path | None = None,
    *,
    task: str = "txt2img",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    allow_download: bool = False,
    cache_dir: str | None = None,
    without_t5: bool = False,
):
    """Load a diffusers pipeline for `task` from a local folder, the local HF cache, or a single file.

    `source=None` uses the embedded default model shipped inside the package. SD3 loads without T5 where
    the folder has none (diffusers then feeds zeros in its place).
    """
    import diffusers

    if task not in TASKS:
        raise ControlNextError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if source is None:
        if not (DEFAULT_BASE / "model_index.json").is_file():
            raise ControlNextError("no embedded default model in this installation; pass --base MODEL")
        source = DEFAULT_BASE
    path = Path(source)
    local_only = not allow_download
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ControlNextError(f"{path} is not a diffusers model folder (no model_index.json)")
        class_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        if class_name not in FAMILIES:
            raise ControlNextError(f"{path} holds a {class_name}; controlnext runs Stable Diffusion 1.x/2.x, SDXL and SD3")
        parts = _missing_parts(path, class_name)
        if FAMILIES[class_name] == "sd":
            parts["safety_checker"] = None
        if without_t5:
            parts.update(text_encoder_3=None, tokenizer_3=None)
        pipe = _from_pretrained(diffusers.AutoPipelineForText2Image, str(path), dtype, True, cache_dir, **parts)
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ControlNextError(f"{path.name}: single-file checkpoints must be .safetensors")
        cls = {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
               "sd3": diffusers.StableDiffusion3Pipeline}[_checkpoint_family(path)]
        parts = {}
        if cls is diffusers.StableDiffusion3Pipeline and config and Path(config).is_dir():
            parts = _missing_parts(Path(config), cls.__name__)
        if cls is diffusers.StableDiffusion3Pipeline and without_t5:
            parts.update(text_encoder_3=None, tokenizer_3=None)
        try:
            pipe = cls.from_single_file(str(path), config=config, dtype=dtype, local_files_only=local_only, **parts)
        except Exception as error:
            raise ControlNextError(
                f"cannot load {path.name} as a single-file {cls.__name__} ({str(error).splitlines()[0][:160]}); "
                "pass --base-config with a local diffusers folder of the same architecture"
            ) from None
    elif "/" in str(source) and not str(source).startswith((".", "/")):
        parts = dict(text_encoder_3=None, tokenizer_3=None) if without_t5 else {"safety_checker": None}
        pipe = _from_pretrained(diffusers.AutoPipelineForText2Image, str(source), dtype, local_only, cache_dir, **parts)
    else:
        raise ControlNextError(f"base model not found: {source} (give a diffusers folder, a .safetensors file or a model id)")

    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    family_of(pipe)
    if task == "img2img":
        pipe = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
    elif task == "inpaint":
        pipe = diffusers.AutoPipelineForInpainting.from_pipe(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _from_pretrained(cls, source: str, dtype: torch.dtype, local_only: bool, cache_dir: str | None = None, **parts):
    try:
        return cls.from_pretrained(source, dtype=dtype, local_files_only=local_only, cache_dir=cache_dir, **parts)
    except (OSError, ValueError, EnvironmentError) as error:
        if local_only and not Path(source).exists():
            raise ControlNextError(
                f"{source} is not in the local Hugging Face cache; download it first "
                f"(`huggingface-cli download {source}`) or pass --allow-download"
            ) from None
        raise ControlNextError(f"cannot load base model {source}: {str(error).splitlines()[0][:200]}") from None


def load_loras(pipe, loras: list[tuple[str, float]]) -> None:
    """Load style LoRAs (diffusers or kohya safetensors) and activate them with their weights."""
    if not loras:
        return
    names = []
    for i, (path, _) in enumerate(loras):
        if not Path(path).exists():
            raise ControlNextError(f"LoRA file not found: {path}")
        name = f"lora{i}"
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as error:
            raise ControlNextError(f"cannot load LoRA {path}: {str(error).splitlines()[0][:200]}") from None
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
