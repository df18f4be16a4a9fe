"""Which base denoiser weights train besides the control module: regular expressions over parameter names.

ControlNeXt fine-tunes a small subset of the base model instead of copying its encoder (Sec. 3.1):
the official SD1.5 recipe trains every name containing `to_out`, the SDXL one `.*attn2.*to_out.*`;
on SD3's transformer the counterpart is every joint block's attention output projections, for the
image tokens (`attn.to_out.0`) and the text tokens (`attn.to_add_out`); the paper also describes
training equally spaced layers ("spaced": every k-th UNet transformer block or SD3 joint block).
"""

from __future__ import annotations

import re

from torch import nn

from ..denoisers import describe
from ..errors import ControlNextError

PRESETS: dict[str, list[str]] = {
    "sd15": [r"to_out"],
    "sdxl": [r".*attn2.*to_out.*"],
    "all": [r"."],  # every parameter: the official SVD-v2 recipe trains the whole UNet
    "sd3": [r"^transformer_blocks\.\d+\.attn\.(to_out\.0|to_add_out)\."],
    "none": [],
}

def transformer_blocks(unet: nn.Module) -> list[str]:
    """Names of the denoiser's transformer blocks in the order the features pass them (UNets: down, mid, up)."""
    entry = describe(unet)
    order = {part: i for i, part in enumerate(entry.block_order)}
    names = [name for name, module in unet.named_modules() if type(module).__name__ == entry.block_class]

    def depth_order(name: str):
        parts = name.split(".")
        return (order.get(parts[0], len(order)), [int(p) if p.isdigit() else 0 for p in parts[1:]])

    return sorted(names, key=depth_order)


def spaced_patterns(unet: nn.Module, every: int) -> list[str]:
    """Patterns for the attention output projections of every `every`-th transformer block."""
    return [rf"^{re.escape(block)}\.attn\d*\.(to_out|to_add_out)\." for block in transformer_blocks(unet)[::every]]


def resolve_patterns(unet: nn.Module, trainable: list[str], *, is_sdxl: bool, spaced_every: int = 2,
                     auto: str | None = None) -> list[str]:
    """Presets and regular expressions -> regular expressions; `auto` names the preset for "auto"."""
    patterns: list[str] = []
    for entry in trainable:
        if entry == "auto":
            entry = auto or ("sdxl" if is_sdxl else "sd15")
        if entry == "spaced":
            patterns += spaced_patterns(unet, spaced_every)
        elif entry in PRESETS:
            patterns += PRESETS[entry]
        else:
            patterns.append(entry)
    return patterns


def select_parameters(unet: nn.Module, patterns: list[str]) -> list[str]:
    """Names of UNet parameters matched (re.search) by any pattern; a pattern that matches none is an error."""
    names = [name for name, _ in unet.named_parameters()]
    selected: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ControlNextError(f"--trainable {pattern!r} is not a valid regular expression ({error})") from None
        matched = {name for name in names if regex.search(name)}
        if not matched:
            raise ControlNextError(
                f"--trainable {pattern!r} selects no UNet parameter; names look like {names[len(names) // 2]!r} "
                "(use a preset: sd15, sdxl, sd3, spaced, all, none)"
            )
        selected |= matched
    return [name for name in names if name in selected]


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def describe_counts(module: nn.Module, unet: nn.Module, selected: list[str]) -> str:
    """One line: trainable parameters of the module and the UNet, against the total."""
    params = dict(unet.named_parameters())
    kind = "UNet" if hasattr(unet.config, "block_out_channels") else "transformer"
    module_count, unet_count = count(module.parameters()), count(params[n] for n in selected)
    total = module_count + count(params.values())
    return (f"trainable parameters: {_millions(module_count + unet_count)} (control module {_millions(module_count)}"
            f" + base {kind} {_millions(unet_count)} in {len(selected)} tensors) of {_millions(total)} in the module and "
            f"the base {kind}")


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)
