"""Training cost: time of one optimizer step and peak memory, ControlNeXt against ControlNet.

Each method trains in its own fresh process (so that one's memory peak cannot hide in the other's) on
the same random-weight UNet of a public architecture, with the same batch, resolution and seed, through
the trainer's own parts: the method's `build`, the trainable selection of its recipe, `ControlledUNet`
and `make_optimizer` (AdamW). Text embeddings, latents and targets are random tensors of the right
shapes: the VAE and text encoder are frozen and cost both methods the same.

Memory on a GPU is torch's peak allocation; on a CPU it is the process's peak resident set (weights
included), next to the resident set once the models are built, so the difference is what training
itself holds (activations kept for the backward pass, gradients, optimizer state).
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from pathlib import Path

from .overhead import median_iqr

METHODS = ("controlnext", "controlnet")


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_method(method: str, architecture: str | dict = "sd15", resolution: int = 256, batch: int = 1, steps: int = 3,
                   warmup: int = 1, threads: int | None = 1, device: str = "cpu", autocast: str | None = None) -> dict:
    """Build the base and `method`'s control, train `warmup + steps` steps, return times and memory (this process).

    `architecture` names an entry of ARCHITECTURES or is one: {"unet": UNet config, "controlnext_variant":
    a release layout or None, "module_config": JSON sizes for ControlNeXt when there is no variant}.
    `autocast` ("fp16", "bf16") runs the forward pass under torch.autocast, as mixed-precision training does.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from ..training.config import TrainConfig
    from ..denoisers import family
    from ..methods import get_method
    from ..training.selection import resolve_patterns, select_parameters
    from ..training.trainer import ControlledUNet, make_optimizer
    from .architectures import ARCHITECTURES

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = ARCHITECTURES[architecture] if isinstance(architecture, str) else architecture
    unet = UNet2DConditionModel(**spec["unet"]).to(device)
    kind = family(unet)
    sdxl = kind == "sdxl"
    training = get_method(method)
    variant = spec.get("controlnext_variant") if method == "controlnext" else None
    config = TrainConfig(method=method, data="-", output_dir="-", module_variant=variant,
                         module_config=None if variant else spec.get("module_config"))
    control = training.build(unet, config).to(device)
    patterns = resolve_patterns(unet, ["auto"], is_sdxl=sdxl, auto=training.trainable(kind))
    selected = set(select_parameters(unet, patterns))
    unet.requires_grad_(False)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(name in selected)
    control.requires_grad_(True).train()
    model = ControlledUNet(unet, control).train()
    optimizer = make_optimizer(control, [p for n, p in unet.named_parameters() if n in selected], config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    latent = resolution // 8
    generator = torch.Generator().manual_seed(0)
    shape = (batch, unet.config.in_channels, latent, latent)
    inputs = dict(
        sample=torch.randn(shape, generator=generator).to(device),
        timestep=torch.randint(0, 1000, (batch,), generator=generator).to(device),
        encoder_hidden_states=torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(device),
        condition=torch.rand(batch, 3, resolution, resolution, generator=generator).to(device),
        added_cond_kwargs={"text_embeds": torch.randn(batch, 1280).to(device),
                           "time_ids": torch.tensor([[resolution] * 2 + [0, 0] + [resolution] * 2] * batch,
                                                    dtype=torch.float32).to(device)} if sdxl else None,
    )
    target = torch.randn(shape, generator=generator).to(device)
    cuda = device.startswith("cuda")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}[autocast]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    built_bytes = torch.cuda.memory_allocated() if cuda else _resident_bytes()

    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=half, enabled=half is not None):
            loss = F.mse_loss(model(**inputs).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    median, iqr = median_iqr(times)
    return {"method": method, "trainable": trainable, "step_seconds": times, "median": median,
            "iqr": iqr, "built_bytes": built_bytes, "peak_bytes": peak,
            "memory": "cuda max_memory_allocated" if cuda else "peak resident set (ru_maxrss)"}


def _child(queue, kwargs) -> None:
    try:
        queue.put(("ok", measure_method(**kwargs)))
    except BaseException as error:  # reported to the parent, which raises it there
        queue.put(("error", f"{type(error).__name__}: {error}"))


def measure_training_cost(architecture: str | dict = "sd15", resolution: int = 256, batch: int = 1, steps: int = 3,
                          warmup: int = 1, threads: int | None = 1, device: str | None = None,
                          methods: tuple[str, ...] = METHODS, autocast: str | None = None, log=print) -> dict:
    """Both methods, each in a fresh process, at the same size; with the ratio of ControlNeXt to ControlNet."""
    import torch

    from ..errors import ControlNextError

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    context = multiprocessing.get_context("spawn")
    name = architecture if isinstance(architecture, str) else architecture.get("name", "custom")
    entries = {}
    for method in methods:
        log(f"training cost: {method} on {name} at {resolution} px, batch {batch} ({device})")
        queue = context.Queue()
        process = context.Process(target=_child, args=(queue, dict(
            method=method, architecture=architecture, resolution=resolution, batch=batch, steps=steps,
            warmup=warmup, threads=threads, device=device, autocast=autocast)))
        process.start()
        status, value = queue.get()
        process.join()
        if status != "ok":
            raise ControlNextError(f"training-cost run of {method} failed: {value}")
        entries[method] = value
    result = {"architecture": name, "resolution": resolution, "batch": batch, "steps": steps,
              "warmup": warmup, "threads": threads, "device": device, "autocast": autocast, "methods": entries}
    if set(METHODS) <= set(entries):
        cnx, cn = entries["controlnext"], entries["controlnet"]
        result["time_ratio"] = cnx["median"] / cn["median"]
        result["training_memory_ratio"] = ((cnx["peak_bytes"] - cnx["built_bytes"])
                                           / max(cn["peak_bytes"] - cn["built_bytes"], 1))
    return result
