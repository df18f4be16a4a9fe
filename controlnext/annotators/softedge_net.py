"""A small HED-style soft edge network whose weights come from a local safetensors file.

Layout (Xie & Tu, 2015, "Holistically-Nested Edge Detection"): VGG-like stages of 3x3 convolutions, each
after the first halving the resolution; every stage has a 1x1 side output, and a 1x1 convolution fuses
the upsampled side outputs into one edge probability. The sizes are a `SoftEdgeNetConfig`, saved as
config.json beside model.safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ControlNextError
from ..images import pil_to_tensor, tensor_to_pil

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class SoftEdgeNetConfig:
    """Sizes of a SoftEdgeNet."""

    stage_channels: tuple[int, ...] = field(default=(64, 128, 256, 512, 512), metadata={"help": "width of each stage"})
    convs_per_stage: tuple[int, ...] = field(default=(2, 2, 3, 3, 3), metadata={"help": "3x3 convolutions per stage"})

    def __post_init__(self):
        self.stage_channels, self.convs_per_stage = tuple(self.stage_channels), tuple(self.convs_per_stage)
        if len(self.stage_channels) != len(self.convs_per_stage) or not self.stage_channels:
            raise ControlNextError("SoftEdgeNetConfig needs as many convs_per_stage as stage_channels (at least one)")


class SoftEdgeNet(nn.Module):
    """HED-style edges: per-stage side outputs fused by a 1x1 convolution, then a sigmoid."""

    def __init__(self, config: SoftEdgeNetConfig | None = None):
        super().__init__()
        self.config = config or SoftEdgeNetConfig()
        self.stages = nn.ModuleList()
        in_channels = 3
        for index, (channels, convs) in enumerate(zip(self.config.stage_channels, self.config.convs_per_stage)):
            layers: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if index else []
            for _ in range(convs):
                layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = channels
            self.stages.append(nn.Sequential(*layers))
        self.side_outputs = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in self.config.stage_channels)
        self.fuse = nn.Conv2d(len(self.config.stage_channels), 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(b, 3, h, w) in [0, 1] -> edge probability (b, 1, h, w)."""
        x = image * 2.0 - 1.0  # (b, 3, h, w) in [-1, 1]
        sides = []
        for stage, side_output in zip(self.stages, self.side_outputs):
            x = stage(x)  # (b, c_i, h / 2^i, w / 2^i)
            side = side_output(x)  # (b, 1, h / 2^i, w / 2^i)
            sides.append(F.interpolate(side, size=image.shape[-2:], mode="bilinear", align_corners=False))
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))  # (b, 1, h, w)


def save_soft_edge_net(model: SoftEdgeNet, folder: str | Path) -> Path:
    """Write config.json and model.safetensors into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(model.config), indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_NAME))
    return folder


def load_soft_edge_net(path: str | Path) -> SoftEdgeNet:
    """Load a SoftEdgeNet from a folder (config.json + model.safetensors) or a .safetensors file.

    A file without a config.json beside it is read with the default (HED-sized) configuration.
    """
    path = Path(path).expanduser()
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file() or weights.suffix != ".safetensors":
        raise ControlNextError(
            f"soft edge weights not found at {path}; give a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, "
            "or a .safetensors file of a SoftEdgeNet"
        )
    config_file = weights.parent / CONFIG_NAME
    config = SoftEdgeNetConfig()
    if config_file.is_file():
        try:
            config = SoftEdgeNetConfig(**json.loads(config_file.read_text()))
        except (ValueError, TypeError) as error:
            raise ControlNextError(f"{config_file} is not a SoftEdgeNet config ({error})") from None
    model = SoftEdgeNet(config)
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error type for a corrupt header
        raise ControlNextError(f"cannot read {weights} as safetensors ({error})") from None
    missing, unexpected = _mismatch(model, state)
    if missing or unexpected:
        raise ControlNextError(
            f"{weights} does not hold SoftEdgeNet weights for {config}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    model.load_state_dict(state)
    return model.eval()


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = model.state_dict()
    missing = [k for k, v in expected.items() if k not in state or state[k].shape != v.shape]
    unexpected = [k for k in state if k not in expected]
    return missing, unexpected


def learned_soft_edges(image: Image.Image, model_path: str | Path) -> Image.Image:
    """Soft edges of `image` from the SoftEdgeNet at `model_path`: white edges on black, same size."""
    model = load_soft_edge_net(model_path)
    with torch.inference_mode():
        edges = model(pil_to_tensor(image)[None])[0]  # (1, h, w)
    return tensor_to_pil(edges.expand(3, -1, -1))
