"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import JobsDep, MetricsDep, RunnerDep, SettingsDep
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> Health:
    """The process answers."""
    return Health()


@router.get("/readyz", summary="Readiness", responses={503: {"model": Readiness, "description": "Not ready"}})
def readyz(response: Response, settings: SettingsDep, jobs: JobsDep, runner: RunnerDep) -> Readiness:
    """The job database answers and the store and runs roots are readable folders (Ray joins on the first job)."""
    checks = {}
    try:
        jobs.counts()
        checks["job_db"] = "ok"
    except Exception as err:  # noqa: BLE001 - any database failure means "not ready", said in the answer
        checks["job_db"] = f"error: {type(err).__name__}"
    for name, path in (("store_root", settings.store_root), ("runs_root", settings.runs_root)):
        checks[name] = "ok" if path.is_dir() else "missing"
    checks["ray"] = "connected" if runner.ray_connected else "not started (joins on the first job)"
    ready = all(checks[k] == "ok" for k in ("job_db", "store_root", "runs_root"))
    response.status_code = 200 if ready else 503
    return Readiness(status="ready" if ready else "not_ready", checks=checks)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def prometheus(metrics: MetricsDep, jobs: JobsDep) -> Response:
    """Request latency, label reads, inference latency and job counts in the Prometheus text format."""
    return Response(metrics.render(jobs.counts()), media_type=metrics.content_type)
