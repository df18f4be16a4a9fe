"""The web app and JSON HTTP API of `controlnext serve` (needs the `web` extra: gradio, FastAPI, uvicorn).

    from controlnext.web import WebConfig, create_app
    app = create_app(WebConfig(models_dir=["models"]))  # an ASGI app: the UI at /, the API under /api

Importing this package is cheap; the heavy parts load when used.
"""

from .config import WebConfig


def create_app(*args, **kwargs):
    """See `controlnext.web.app.create_app`."""
    from .app import create_app as create

    return create(*args, **kwargs)


def serve(config: WebConfig) -> None:
    """Run the web app with uvicorn until interrupted."""
    from .app import serve as run

    run(config)


def __getattr__(name: str):
    if name in ("ModelCatalog", "ModelEntry"):
        from . import catalog

        return getattr(catalog, name)
    raise AttributeError(name)


__all__ = ["ModelCatalog", "ModelEntry", "WebConfig", "create_app", "serve"]
