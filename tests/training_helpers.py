"""Shared pieces of the training tests: a tiny data folder, a tiny configuration, running the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from controlnext.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY_MODULE = json.dumps(dict(stem_channels=[8], stem_groups=2, block_out_channels=[8, 16], block_groups=[2, 4],
                              time_proj_dim=16, time_embed_dim=32))


def circle_example(seed: int, size: tuple[int, int] = (64, 64)) -> tuple[Image.Image, Image.Image, str]:
    """A red circle on blue, its white outline on black as the condition, and a caption."""
    x, y = np.random.default_rng(seed).integers(4, min(size) - 28, 2)
    box = [int(x), int(y), int(x) + 22, int(y) + 22]
    image = Image.new("RGB", size, (0, 0, 255))
    ImageDraw.Draw(image).ellipse(box, fill=(255, 0, 0))
    condition = Image.new("RGB", size)
    ImageDraw.Draw(condition).ellipse(box, outline=(255, 255, 255), width=2)
    return image, condition, "a red circle on a blue background"


def write_data_folder(folder: Path, count: int = 4, columns=("image", "conditioning_image", "text")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, condition, caption = circle_example(i)
        image.save(folder / f"image-{i}.png")
        condition.save(folder / f"condition-{i}.png")
        rows.append(dict(zip(columns, (f"image-{i}.png", f"condition-{i}.png", caption))))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def tiny_config(base: Path, data: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(base=str(base), data=str(data), output_dir=str(output), module_config=TINY_MODULE, resolution=64,
                  batch_size=2, max_steps=4, learning_rate=3e-3, checkpoint_every=0, validation_every=0,
                  tensorboard=False, progress_bar=False)
    return TrainConfig(**{**values, **overrides})


def cli_arguments(config: TrainConfig) -> list[str]:
    """The `controlnext train` flags that reproduce `config`."""
    args = []
    defaults = TrainConfig()
    for name, value in vars(config).items():
        if value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def subprocess_env() -> dict:
    """This checkout first on the path, one thread per process (the machine is shared), quiet libraries."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def start_cli(config: TrainConfig, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "controlnext", "train", *cli_arguments(config), *extra]
    return subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(output: Path) -> dict[int, float]:
    with open(Path(output) / "log.csv", newline="") as file:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(file) if row["loss"]}
