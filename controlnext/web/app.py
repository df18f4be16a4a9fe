"""One FastAPI app serving the JSON API under /api and the gradio web UI at /."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import MissingDependencyError
from .catalog import ModelCatalog
from .config import WebConfig


def require_web_packages() -> None:
    """Raise MissingDependencyError unless the `web` extra (gradio, which brings FastAPI and uvicorn) is installed."""
    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("gradio", "gradio"),
                            ("swagger_ui", "swagger-ui-py")):
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError(package, "web") from None


def tiny_demo_models(folder: Path) -> tuple[Path, Path]:
    """Write a tiny random base model and control (once) and return their folders."""
    from ..control.loading import save_controlnext
    from ..testing import save_tiny_pipeline, tiny_controlnext

    base, control = folder / "tiny-random-base", folder / "tiny-random-control"
    if not (base / "model_index.json").is_file():
        save_tiny_pipeline(base)
    if not (control / "control.json").is_file():
        save_controlnext(control, tiny_controlnext(seed=3))
    return base, control


def tiny_demo_video_models(folder: Path) -> tuple[Path, Path]:
    """Write a tiny random Stable Video Diffusion model and pose control (once) and return their folders."""
    from ..control.loading import save_controlnext
    from ..testing import save_tiny_svd_pipeline, tiny_svd_controlnext

    base, control = folder / "tiny-random-video-base", folder / "tiny-random-video-control"
    if not (base / "model_index.json").is_file():
        save_tiny_svd_pipeline(base, num_frames=4)
    if not (control / "control.json").is_file():
        save_controlnext(control, tiny_svd_controlnext(seed=3))
    return base, control


def create_app(config: WebConfig | None = None, catalog: ModelCatalog | None = None):
    """The FastAPI app of `controlnext serve`; `app.state` holds its engine, worker and catalog."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline first: no calls home
    require_web_packages()
    from fastapi import FastAPI

    from .. import __version__
    from ..devices import default_dtype, resolve_device
    from ..pipelines.base import resolve_dtype
    from .api import BodySizeLimit, add_api_routes
    from .engine import Engine
    from .worker import ModelWorker

    config = config or WebConfig()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if catalog is None:
        demo = []
        if config.tiny_demo:
            base, control = tiny_demo_models(Path(tempfile.gettempdir()) / "controlnext-tiny-demo")
            demo = [("base", base), ("control", control)]
        catalog = ModelCatalog.discover(
            config.models_dir, config.base, config.control, config.lora, demo, include_embedded=not config.hide_embedded
        )
    device = resolve_device(config.device)
    dtype = config.dtype or default_dtype(device)
    resolve_dtype(dtype, device)  # refuses fp16 on a CPU before the server starts
    engine = Engine(catalog, device=device, dtype=dtype, cache_size=config.cache_size)
    worker = ModelWorker(config.queue_size)

    app = FastAPI(
        title="controlnext", version=__version__, docs_url=None, redoc_url=None,  # /docs below, with no CDN
        description="Controllable image generation with ControlNeXt and ControlNet. Images travel as base64 PNG.",
    )
    app.state.engine, app.state.worker, app.state.catalog = engine, worker, catalog
    add_offline_docs(app)
    add_api_routes(app, engine, worker)
    app.add_middleware(BodySizeLimit, max_bytes=int(config.max_body_mb * 1e6))
    if config.api_only:
        return app

    import gradio as gr

    from .ui import PAGE, build_ui

    output_dir = Path(config.output_dir or tempfile.mkdtemp(prefix="controlnext-web-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    video_base, video_controls = config.video_base, list(config.video_control)
    if config.tiny_demo and not video_base:
        video_base, control = tiny_demo_video_models(Path(tempfile.gettempdir()) / "controlnext-tiny-demo")
        video_controls.append(str(control))
    ui = build_ui(engine, worker, catalog, output_dir, units=config.ui_units,
                  video=(str(video_base), video_controls) if video_base else None)
    ui.queue(max_size=config.queue_size, default_concurrency_limit=1)
    return gr.mount_gradio_app(
        app, ui, path="/", allowed_paths=[str(output_dir)], max_file_size=int(config.max_body_mb * 1e6),
        ssr_mode=False, footer_links=[], **PAGE,  # the API is ours, at /docs
    )


DOCS_ASSETS = "/docs-assets"


def add_offline_docs(app) -> None:
    """The interactive API page at /docs, its Swagger UI scripts served from the installed swagger-ui-py package
    (FastAPI's own page loads them from a CDN, so it stays blank offline)."""
    import importlib.util

    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    assets = Path(importlib.util.find_spec("swagger_ui").origin).parent / "static"  # Swagger UI 5: OpenAPI 3.1
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title="controlnext API", swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css", swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


def serve(config: WebConfig) -> None:
    """Run the app with uvicorn until interrupted."""
    require_web_packages()
    import uvicorn

    app = create_app(config)
    print(f"controlnext: web UI at http://{config.host}:{config.port}/ , API docs at /docs", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
