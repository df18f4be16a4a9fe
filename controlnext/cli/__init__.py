"""The `controlnext` command line: a thin layer over the library, one module per subcommand.

Each subcommand module defines `add_parser(subparsers, parent)`, which registers its parser and sets
`run=callable(args) -> int | None`, and may set `check=callable(args)`, which refuses bad flags without
heavy imports and runs first. Heavy imports (torch, diffusers, gradio) happen inside `run`, after the
checks that need none of them, so `--help`, `annotate` and bad input answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import ControlNextError

SUBCOMMANDS = ["generate", "video", "annotate", "train", "serve", "bench"]


DEBUG_HELP = "show full tracebacks on errors"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlnext",
        description="Controllable image and video generation with ControlNeXt and ControlNet.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP + " (here or after the subcommand)")
    # A subcommand's --debug leaves the value alone unless given, so `controlnext --debug generate` keeps it.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers, parent)
    return parser


def quiet_libraries() -> None:
    """Keep the libraries' notices out of the user's terminal (errors still show), without importing them."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's native log lines
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "diffusers", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_unused_bitsandbytes() -> None:
    """Hide bitsandbytes' import-time notices about CPU kernels: diffusers and peft import it when installed, and
    nothing here uses it outside 8-bit training, so its warnings read like errors of ours."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_loading_bars() -> None:
    """Hide diffusers' model-loading bars. It imports diffusers: subcommands call it once they load models."""
    try:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "check"):
            args.check(args)
        if not args.debug:
            quiet_libraries()
        return args.run(args) or 0
    except ControlNextError as error:
        if args.debug:
            raise
        print(f"controlnext {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
