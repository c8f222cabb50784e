"""Jobs: launch teacher training, label generation or distillation on Ray; list, inspect, cancel, resume, logs."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Query
from fastapi.responses import PlainTextResponse

from service.deps import JobId, JobsDep, MetricsDep, ModelsDep, ReadKey, RunnerDep, SettingsDep, WriteKey
from service.errors import JobStateError
from store.errors import LabelsetExistsError
from service.jobs import ACTIVE, JobRecord, new_job_id
from service.planning import plan_job
from service.runner import LOG_FILE, job_progress
from service.schemas import JobIn, JobPublic, JobsPublic, error_responses
from service.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(400, 401, 404, 422))
MAX_LOG_BYTES = 1 << 20


def _time(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _public(job: JobRecord, settings: Settings) -> JobPublic:
    result = job.result or {}
    return JobPublic(id=job.id, kind=job.kind, state=job.state, attempt=job.attempt, created=_time(job.created),
                     started=_time(job.started), finished=_time(job.finished), error=job.error,
                     progress=job_progress(job, settings.store_root),
                     metrics=result.get("metrics"), outputs=result.get("outputs"), request=job.request)


_submit_lock = threading.Lock()


def _refuse_second_writer(jobs, labelset_id: str) -> None:
    """409 while another queued or running labels job writes this labelset id (they would share its staging)."""
    for state in ACTIVE:
        records, _ = jobs.list(state=state, kind="labels", limit=10_000)
        for other in records:
            if other.payload.get("labelset_id") == labelset_id:
                raise LabelsetExistsError(f"job {other.id} is already writing labelset {labelset_id!r}; wait for "
                                          "it, cancel it, or pick a new id")


@router.post("", summary="Submit a job", status_code=201, dependencies=[WriteKey],
             responses=error_responses(409, 413))
def submit_job(body: Annotated[JobIn, Body()], jobs: JobsDep, runner: RunnerDep, models: ModelsDep,
               settings: SettingsDep, metrics: MetricsDep) -> JobPublic:
    """Queue a train, labels or distill job on the Ray cluster; poll GET /v1/jobs/{id} for its state."""
    job_id = new_job_id()
    payload = plan_job(body, job_id, settings, models)
    with _submit_lock:  # the check and the insert as one step: two requests cannot both pass the check
        if body.kind == "labels":
            _refuse_second_writer(jobs, body.labelset_id)
        job = jobs.create(job_id, body.kind, body.model_dump(mode="json", exclude_none=True), payload)
    runner.submit(job)
    metrics.jobs_submitted.labels(body.kind).inc()
    return _public(jobs.get(job_id), settings)


@router.get("", summary="List jobs", dependencies=[ReadKey])
def list_jobs(jobs: JobsDep, settings: SettingsDep,
              state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
              kind: Literal["train", "labels", "distill"] | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> JobsPublic:
    """Job records, newest first, optionally filtered by state and kind."""
    records, total = jobs.list(state=state, kind=kind, limit=limit, offset=offset)
    return JobsPublic(data=[_public(j, settings) for j in records], count=total)


@router.get("/{job_id:segment}", summary="Get a job", dependencies=[ReadKey])
def get_job(job_id: JobId, jobs: JobsDep, settings: SettingsDep) -> JobPublic:
    """State, progress, metrics and error of one job."""
    return _public(jobs.get(job_id), settings)


@router.post("/{job_id:segment}:cancel", summary="Cancel a job",
             dependencies=[WriteKey], responses=error_responses(409))
def cancel_job(job_id: JobId, jobs: JobsDep, runner: RunnerDep, settings: SettingsDep) -> JobPublic:
    """Stop a queued or running job (its Ray task is force-cancelled); finished jobs answer 409."""
    job = jobs.get(job_id)
    # record first, then cancel: the runner then finds the job already cancelled and leaves it so
    if job.state not in ACTIVE or not jobs.finish(job_id, "cancelled", error="cancelled by request"):
        raise JobStateError(f"job {job_id!r} is {jobs.get(job_id).state}; only queued or running jobs cancel")
    runner.cancel(job_id)
    return _public(jobs.get(job_id), settings)


@router.post("/{job_id:segment}:retry", summary="Resume a failed or cancelled job", dependencies=[WriteKey],
             responses=error_responses(409))
def retry_job(job_id: JobId, jobs: JobsDep, runner: RunnerDep, settings: SettingsDep,
              metrics: MetricsDep) -> JobPublic:
    """Run a failed or cancelled job again in its own run folder: training resumes from its last epoch checkpoint,
    label generation writes only the chunks still missing."""
    job = jobs.requeue(job_id)
    runner.submit(job)
    metrics.jobs_submitted.labels(job.kind).inc()
    return _public(jobs.get(job_id), settings)


@router.get("/{job_id:segment}/logs", summary="Tail of a job's log", dependencies=[ReadKey], response_model=None,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Log lines"}})
def job_logs(job_id: JobId, jobs: JobsDep, settings: SettingsDep,
             tail: Annotated[int, Query(ge=1, le=10_000, description="Last lines to return")] = 200
             ) -> PlainTextResponse:
    """The last `tail` lines of the job's log (progress bars, per-epoch records, the traceback of a failure)."""
    jobs.get(job_id)  # 404 for an unknown id; known ids are folder names this service created
    path = settings.runs_root / job_id / LOG_FILE
    if not path.is_file():
        return PlainTextResponse("")
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - MAX_LOG_BYTES))
        text = f.read().decode("utf-8", errors="replace")
    # tqdm redraws its bar with \r: show each redraw as a line of its own
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return PlainTextResponse("".join(line + "\n" for line in lines[-tail:]))
