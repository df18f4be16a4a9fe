"""The JSON HTTP API: generate, annotate, list models, health; its OpenAPI schema is at /openapi.json."""

from __future__ import annotations

import asyncio
import base64
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import __version__
from ..errors import ControlNextError
from ..metadata import png_with_parameters
from ..request import SCHEDULER_NAMES, TASKS
from .engine import Engine, available_annotators
from .schemas import (
    AnnotateRequest,
    AnnotateResponse,
    ErrorResponse,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelInfo,
    ModelsResponse,
    QueueInfo,
    describe_errors,
    encode_png,
    public_errors,
)
from .worker import ModelWorker, QueueFull

logger = logging.getLogger(__name__)
ERRORS = {
    400: {"model": ErrorResponse, "description": "the request names something this server cannot use"},
    413: {"model": ErrorResponse, "description": "the request body is too large"},
    422: {"model": ErrorResponse, "description": "a parameter is missing, of the wrong type or out of range"},
    500: {"model": ErrorResponse, "description": "generation failed inside the server (see its log)"},
    503: {"model": ErrorResponse, "description": "the queue is full; retry after the Retry-After header's seconds"},
}


def add_api_routes(app: FastAPI, engine: Engine, worker: ModelWorker) -> None:
    """Register the /api routes and the error answers on `app`."""

    @app.get("/api/health", response_model=HealthResponse, tags=["api"])
    async def health() -> HealthResponse:
        """Whether the server answers, and how full its queue is."""
        return HealthResponse(
            status="ok", version=__version__, device=str(engine.device),
            queue=QueueInfo(pending=worker.pending, capacity=worker.capacity), loaded_pipelines=engine.loaded,
        )

    @app.get("/api/models", response_model=ModelsResponse, tags=["api"])
    async def models() -> ModelsResponse:
        """The base models, controls, LoRAs, annotators and schedulers a request may name."""
        catalog = engine.catalog

        def infos(kind):
            return [ModelInfo(name=e.name, path=e.path, source=e.source) for e in catalog.entries(kind)]

        return ModelsResponse(
            bases=infos("base"), controls=infos("control"), loras=infos("lora"),
            annotators=available_annotators(), schedulers=list(SCHEDULER_NAMES), tasks=list(TASKS),
        )

    @app.post("/api/annotate", response_model=AnnotateResponse, responses=ERRORS, tags=["api"])
    async def annotate(request: AnnotateRequest) -> AnnotateResponse:
        """Make a condition image from an image with an annotator (runs in the model's queue)."""
        future = worker.submit(lambda: encode_png(engine.annotate(request.annotator, request.image, request.options)))
        return AnnotateResponse(image=await outcome(future))

    @app.post("/api/generate", response_model=GenerateResponse, responses=ERRORS, tags=["api"])
    async def generate(request: GenerateRequest) -> GenerateResponse:
        """Generate images; each PNG carries its parameters (read them back with controlnext.metadata.read_parameters)."""
        return await outcome(worker.submit(generate_response, engine, request))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = public_errors(error.errors())
        return JSONResponse({"error": describe_errors(errors), "detail": errors}, status_code=422)

    @app.exception_handler(ControlNextError)
    async def refused(_: Request, error: ControlNextError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(JobFailed)
    async def failed(_: Request, error: JobFailed) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=500)

    @app.exception_handler(QueueFull)
    async def busy(_: Request, error: QueueFull) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=503, headers={"Retry-After": str(error.retry_after)})


class JobFailed(Exception):
    """A job failed for a reason other than the request (a bug, memory): answered 500, logged in full."""


async def outcome(future):
    """The job's result; user errors pass through, anything else becomes JobFailed (logged with its traceback)."""
    try:
        return await asyncio.wrap_future(future)
    except (ControlNextError, QueueFull):
        raise
    except Exception as error:
        logger.exception("a job failed")
        message = (str(error).splitlines() or [""])[0][:300]
        raise JobFailed(f"internal error: {type(error).__name__}: {message}") from None


def generate_response(engine: Engine, request: GenerateRequest) -> GenerateResponse:
    """Generate and encode on the worker thread, so the event loop only sends the answer."""
    began = time.perf_counter()
    generated = engine.generate(request)
    seconds = time.perf_counter() - began
    images = [
        GeneratedImage(image=base64.b64encode(png_with_parameters(image, parameters)).decode("ascii"),
                       seed=parameters["seed"], parameters=parameters)
        for image, parameters in zip(generated.images, generated.parameters)
    ]
    return GenerateResponse(images=images, seconds=round(seconds, 3), notes=generated.notes)


class BodySizeLimit:
    """ASGI middleware: answer 413 to request bodies over `max_bytes`, before the app parses them.

    The body is read first (at most `max_bytes` are kept); an oversized one is read on and dropped up to
    DRAIN_FACTOR times the limit, so that the client finishes sending and reads the 413.
    """

    DRAIN_FACTOR = 8

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_bytes:
                while more and size <= self.DRAIN_FACTOR * self.max_bytes:
                    message = await receive()
                    size += len(message.get("body", b""))
                    more = message.get("more_body", False) and message["type"] == "http.request"
                return await self._too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
        body_sent = False

        async def replay():
            nonlocal body_sent
            if body_sent:
                return await receive()
            body_sent = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse({"error": f"request body too large; at most {self.max_bytes / 1e6:g} MB"}, status_code=413)
        await response(scope, receive, send)
