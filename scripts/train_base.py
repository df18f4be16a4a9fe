"""Train the embedded base model (tiny Stable Diffusion for the shapes world) and save it in diffusers format."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlnext.models.tiny_sd import BASE_MODEL_DIR  # noqa: E402
from controlnext.training.base_model import BaseTrainingConfig, train_base_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=BASE_MODEL_DIR, help="folder to write (replaced)")
    parser.add_argument("--log", type=Path, help="also append the log to this file")
    defaults = BaseTrainingConfig()
    for item in fields(BaseTrainingConfig):
        if item.name == "model":
            continue
        value = getattr(defaults, item.name)
        flag = "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    args = parser.parse_args(argv)
    config = BaseTrainingConfig(**{item.name: getattr(args, item.name) for item in fields(BaseTrainingConfig)
                                   if item.name != "model"})

    def log(line: str) -> None:
        print(line, flush=True)
        if args.log:
            with args.log.open("a") as file:
                file.write(line + "\n")

    log(f"config: {config}")
    train_base_model(args.output, config, log)


if __name__ == "__main__":
    main()
