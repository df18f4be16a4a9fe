"""Train the embedded base model (tiny Stable Diffusion for the shapes world) and save it in diffusers format."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlnext.errors import ControlNextError  # noqa: E402
from controlnext.models.tiny_sd import BASE_MODEL_DIR, TinySDConfig  # noqa: E402
from controlnext.training.base_model import BaseTrainingConfig, train_base_model  # noqa: E402


def add_flags(parser: argparse.ArgumentParser, config) -> list[str]:
    """One flag per dataclass field (tuples as comma-separated integers); return the field names."""
    names = []
    for item in fields(config):
        value = getattr(config, item.name)
        if item.name == "model":
            continue
        flag = "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=lambda text: tuple(int(part) for part in text.split(",") if part),
                                default=value,
                                help=f"default {','.join(map(str, value))}")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
        names.append(item.name)
    return names


def main(argv: list[str] | None = None, *, default_output: Path = BASE_MODEL_DIR, training=BaseTrainingConfig,
         sizes=TinySDConfig, train=train_base_model) -> None:
    """Parse the flags of a training config and its model sizes, then train (the SD3 script passes its own)."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__)
    parser.add_argument("--output", type=Path, default=default_output, help="folder to write (replaced)")
    parser.add_argument("--log", type=Path, help="also append the log to this file")
    training_names = add_flags(parser.add_argument_group("training"), training())
    model_names = add_flags(parser.add_argument_group("model sizes"), sizes())
    args = parser.parse_args(argv)
    model = sizes(**{name: getattr(args, name) for name in model_names})
    config = training(**{name: getattr(args, name) for name in training_names}, model=model)

    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)
        if args.log:
            with args.log.open("a") as file:
                file.write(line + "\n")

    log(f"config: {config}")
    try:
        train(args.output, config, log)
    except ControlNextError as error:  # a flag or folder that cannot work: one line, as the CLI says it
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
