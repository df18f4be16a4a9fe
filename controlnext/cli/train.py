"""`controlnext train`: train a control (ControlNeXt by default) on a local base model and data set."""

from __future__ import annotations

import argparse

from ..training.config import add_config_arguments, config_from_args

DESCRIPTION = """Train a control for a new kind of condition: the control module plus a selected subset of the
base UNet's weights, on (image, condition, caption) examples. Runs on one CPU or GPU, and on many with
`accelerate launch` (see docs/training.md). The output folder is what `controlnext generate` loads."""


def add_parser(subparsers, parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", parents=[parent], help="train a control on your own data",
                                   description=DESCRIPTION)
    parser.add_argument("--config", metavar="JSON", help="read the options from a JSON file (such as a run's "
                        "train_config.json); flags given here override it")
    add_config_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..training.trainer import train

    output = train(config_from_args(args))
    if PartialState().is_main_process:
        print(f"trained control saved to {output}")
    return 0
