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
    config = config_from_args(args).validate()  # bad flags fail here, before torch and the trainer load
    if config.annotator:
        from ..annotators import get_annotator

        get_annotator(config.annotator)

    from accelerate import PartialState

    from ..training.trainer import train
    from . import quiet_loading_bars

    if not getattr(args, "debug", False):
        quiet_loading_bars()
    output = train(config)
    if PartialState().is_main_process:
        print(f"trained control saved to {output}")
    return 0
