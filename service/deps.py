"""Dependencies declared once as Annotated aliases: app state from the lifespan, and the API-key checks."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Path, Request, Security
from fastapi.security import APIKeyHeader

from service.errors import UnauthorizedError
from service.inference import MODEL_ID_PATTERN, ModelRegistry
from service.jobs import JOB_ID_PATTERN, JobStore
from service.labels import ReaderCache
from service.metrics import ServiceMetrics
from service.runner import JobRunner
from service.settings import Settings
from store.layout import LABELSET_ID_PATTERN

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="Needed on mutating endpoints when LTD_API_KEY is set (and on reads when "
                                          "LTD_READ_KEY_REQUIRED is true)")


async def _settings(request: Request) -> Settings:
    return request.state.settings


async def _readers(request: Request) -> ReaderCache:
    return request.state.readers


async def _models(request: Request) -> ModelRegistry:
    return request.state.models


async def _jobs(request: Request) -> JobStore:
    return request.state.jobs


async def _runner(request: Request) -> JobRunner:
    return request.state.runner


async def _metrics(request: Request) -> ServiceMetrics:
    return request.state.metrics


# async: FastAPI runs sync dependencies in the thread pool, a hop per dependency that these lookups do not need
SettingsDep = Annotated[Settings, Depends(_settings)]
ReadersDep = Annotated[ReaderCache, Depends(_readers)]
ModelsDep = Annotated[ModelRegistry, Depends(_models)]
JobsDep = Annotated[JobStore, Depends(_jobs)]
RunnerDep = Annotated[JobRunner, Depends(_runner)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
ApiKey = Annotated[str | None, Security(api_key_header)]
# reads document the header as an optional parameter, not a security requirement: by default they are open
ReadApiKey = Annotated[str | None, Header(alias="X-API-Key",
                                          description="Needed only when LTD_READ_KEY_REQUIRED is set")]


def _check_key(settings: Settings, given: str | None) -> None:
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    # compare_digest takes the same time wherever the first difference is: no timing hint about the key
    if given is None or not secrets.compare_digest(given.encode(), expected):
        raise UnauthorizedError("missing or wrong X-API-Key header")


async def require_write_key(settings: SettingsDep, key: ApiKey) -> None:
    """Mutating endpoints: the configured key must be sent."""
    _check_key(settings, key)


async def require_read_key(request: Request, key: ReadApiKey = None) -> None:
    """Read endpoints: the key is checked only when LTD_READ_KEY_REQUIRED is set."""
    settings = request.state.settings  # not SettingsDep: one sub-dependency less on the hottest path
    if settings.read_key_required:
        _check_key(settings, key)


WriteKey = Depends(require_write_key)
ReadKey = Depends(require_read_key)


# path parameters, described once for /docs. The id patterns are documented (json_schema_extra) but checked by the
# store and the model registry with the same regex, so a malformed id gets their typed 422 rather than a generic one.
LabelsetId = Annotated[str, Path(description="Labelset id, a folder name under the store root",
                                  examples=["fmnist-ssd-t2"],
                                  json_schema_extra={"pattern": LABELSET_ID_PATTERN.pattern})]
ImageId = Annotated[int, Path(description="Training image id: the row, 0..num_images-1", examples=[7])]
ModelId = Annotated[str, Path(description="Run folder under the runs root ('<job id>'), or '<job id>/teacher'",
                              examples=["3f2a9c01d4e5"], json_schema_extra={"pattern": MODEL_ID_PATTERN.pattern})]
JobId = Annotated[str, Path(description="Job id returned by POST /v1/jobs", examples=["3f2a9c01d4e5"],
                            pattern=JOB_ID_PATTERN)]
