"""`controlnext serve`: the web UI and the JSON HTTP API on one local server (flags from WebConfig)."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def add_parser(subparsers, parent) -> None:
    from ..web.config import WebConfig

    p = subparsers.add_parser(
        "serve", parents=[parent], help="start the web UI and HTTP API",
        description="Start a local web app (gradio) for controlled generation, with a JSON HTTP API under /api "
        "(OpenAPI schema at /openapi.json, docs at /docs). Models come from the embedded default, --models-dir "
        "folders, --base/--control/--lora, and --tiny-demo.",
    )
    hints = typing.get_type_hints(WebConfig)
    for field in dataclasses.fields(WebConfig):
        flag, kind, help_text = "--" + field.name.replace("_", "-"), hints[field.name], field.metadata["help"]
        if field.default not in (None, False, dataclasses.MISSING) and "default:" not in help_text:
            help_text += f" (default: {field.default})"
        if kind is bool:
            p.add_argument(flag, action="store_true", help=help_text)
        elif typing.get_origin(kind) is list:
            p.add_argument(flag, action="append", default=[], metavar="PATH", help=help_text)
        else:
            value_type = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            p.add_argument(flag, type=value_type, default=field.default, help=help_text)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..web import WebConfig, serve

    config = WebConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WebConfig)})
    config.check()
    if not args.debug:
        from . import quiet_loading_bars, quiet_unused_bitsandbytes

        quiet_unused_bitsandbytes()
        quiet_loading_bars()
    serve(config)
    return 0
