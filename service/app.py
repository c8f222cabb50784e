"""Assembles the FastAPI app: lifespan (job DB, runner, caches), middleware, routers, and the one error table."""

from __future__ import annotations

import json
import logging
import re
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.routing import Match

import store
from service import errors
from service.auth import with_key
from service.inference import ModelRegistry
from service.jobs import JobStore
from service.labels import ReaderCache
from service.metrics import MetricsMiddleware, ServiceMetrics
from service.routes import health, jobs, labelsets, models
from service.runner import JobRunner
from service.settings import Settings, get_settings
from store import errors as store_errors

log = logging.getLogger(__name__)

# typed error -> status; the most specific class in an exception's MRO wins (Starlette looks handlers up that way)
ERRORS: dict[type[Exception], int] = {
    store_errors.LabelsetNotFoundError: 404,
    store_errors.ImageIdError: 404,
    store_errors.InvalidLabelsetIdError: 422,
    store_errors.LabelsetExistsError: 409,
    store_errors.IncompleteLabelsetError: 409,
    store_errors.DenseNotStoredError: 409,  # a top-k labelset cannot be re-tempered: a state, not a bad request
    store_errors.CorruptChunkError: 500,  # our data is damaged: not the client's fault, and said so
    store_errors.StoreError: 400,
    errors.UnauthorizedError: 401,
    errors.InvalidIdError: 422,
    errors.ModelNotFoundError: 404,
    errors.ModelExistsError: 409,
    errors.ModelFileError: 400,
    errors.JobNotFoundError: 404,
    errors.JobStateError: 409,
    errors.PayloadTooLargeError: 413,
    errors.ImageDecodeError: 400,
    errors.JobConfigError: 422,
}
DESCRIPTION = """Soft labels of long-tailed training sets, distillation jobs (SSD) on Ray, and the trained classifiers.

Typical flow: `POST /v1/jobs` a **train** job (an SSD run also saves its teacher), then a **labels** job with
`teacher = "<train job id>/teacher"`, then a **distill** job on the new labelset; poll `GET /v1/jobs/{id}`;
read labels at `GET /v1/labelsets/{id}/labels/{image_id}`; classify images at `POST /v1/models/{id}:predict`.
Mutating endpoints always need the `X-API-Key` header: `LTD_API_KEY`, or the token the service generated at
its first start (`~/.config/ltd/token`, printed by `ltd serve`). Errors are JSON `{"detail", "type"}`.
"""
TAGS = [
    {"name": "labelsets", "description": "Stored soft labels: one row per training image, per teacher and T"},
    {"name": "jobs", "description": "Teacher training, label generation and distillation, run on Ray"},
    {"name": "models", "description": "Trained classifiers under the runs root, and prediction"},
    {"name": "health", "description": "Liveness, readiness, Prometheus metrics"},
]


def _error_type(exc: Exception) -> str:
    """LabelsetNotFoundError -> labelset_not_found."""
    name = type(exc).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def error_response(status: int, detail, type_: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "type": type_}, status_code=status, headers=headers)


def _typed_handler(status: int):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        headers = None
        if status == 401:
            headers = {"WWW-Authenticate": "APIKey"}
            request.state.metrics.auth_failures.labels(request.method, request.url.path.split("/")[2]
                                                       if request.url.path.count("/") > 1 else "").inc()
        if status >= 500:
            log.error("%s on %s: %s", type(exc).__name__, request.url.path, exc)
        return error_response(status, str(exc), _error_type(exc), headers)

    return handle


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, jsonable_encoder(exc.errors()), "validation_error")


async def _model_validation(request: Request, exc: ValidationError) -> JSONResponse:
    """A config that fails validation after overrides were applied: the client's mistake, a 422."""
    return error_response(422, json.loads(exc.json(include_url=False, include_context=False)), "validation_error")


HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(app, scope) -> set[str]:
    """Every method some route serves at this request's path (Starlette's own 405 names only the first matching
    route's); asked through the routes' public `matches`, so nested routers count too."""
    return {method for method in METHODS
            if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.routes)}


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Framework errors: unknown paths, wrong methods, bodies over max_body_size, unparsable bodies.

    A 405 lists in `Allow` every method of the path, and OPTIONS on a known path answers 204 with that list
    (RFC 9110), so a client can discover what a resource supports."""
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        allow = ", ".join(sorted(allowed_methods(request.app, request.scope) | {"OPTIONS"}))
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allow})
        headers = {**(headers or {}), "Allow": allow}
    kind = HTTP_TYPES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, exc.detail, kind, headers)


class DeclaredLengthLimit:
    """413 with our JSON error body for a Content-Length over the limit, before any byte is read.

    Starlette's RequestBodyLimitMiddleware (inside this one) counts the bytes of bodies sent without a length, and
    its 413 goes through our handlers; but for a declared length it answers in plain text, so this check runs first.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.max_bytes:
                detail = f"request body over {self.max_bytes} bytes"
                await error_response(413, detail, "payload_too_large")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service; `settings` default to the LTD_* environment (uvicorn --factory calls this with none)."""
    settings = settings or get_settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.store_root.mkdir(parents=True, exist_ok=True)
        settings.runs_root.mkdir(parents=True, exist_ok=True)
        purged = store.purge(settings.store_root)
        if purged:
            log.info("purged %d labelset(s) past their trash retention: %s", len(purged),
                     [e.trash_id for e in purged])
        jobs_db = JobStore(settings.jobs_db)
        lost = jobs_db.fail_interrupted()
        if lost:
            log.warning("marked %d job(s) failed that a previous service left unfinished: %s", len(lost), lost)
        runner = JobRunner(jobs_db, settings.ray_address, jobs_per_device=settings.jobs_per_device)
        runner.start()
        state = {
            "settings": with_key(settings),  # never open by default: LTD_API_KEY, else the token file
            "metrics": metrics, "jobs": jobs_db, "runner": runner,
            "readers": ReaderCache(settings.store_root, settings.reader_cache_size, settings.reader_cache_mib),
            "models": ModelRegistry(settings.runs_root, settings.device, settings.model_cache_size,
                                    settings.inference_threads, settings.predict_batching, settings.predict_max_batch,
                                    settings.predict_max_wait_ms / 1000),
        }
        try:
            yield state
        finally:
            state["models"].close()
            runner.stop()
            if runner.started_ray:
                import ray

                ray.shutdown()

    app = FastAPI(title="ltd: long-tailed soft-label distillation", version="1", description=DESCRIPTION,
                  openapi_tags=TAGS, lifespan=lifespan)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_upload_bytes)  # innermost
    app.add_middleware(DeclaredLengthLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: it also times the 413s
    for exc_type, status in ERRORS.items():
        app.add_exception_handler(exc_type, _typed_handler(status))
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _model_validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for router in (labelsets.router, jobs.router, models.router, health.router):
        app.include_router(router)
    return app
