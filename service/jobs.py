"""Job records in SQLite (stdlib sqlite3, WAL): states, results and errors that survive a restart of the service."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from service.errors import JobNotFoundError, JobStateError

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["train", "labels", "distill"]
STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE: tuple[JobState, ...] = ("queued", "running")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id       TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,
    state    TEXT NOT NULL,
    request  TEXT NOT NULL,  -- the validated request as the client sent it (JSON)
    payload  TEXT NOT NULL,  -- what the worker runs: resolved config, absolute paths (JSON)
    attempt  INTEGER NOT NULL DEFAULT 1,
    created  REAL NOT NULL,
    started  REAL,
    finished REAL,
    error    TEXT,
    result   TEXT            -- metrics and outputs of a succeeded job (JSON)
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created);
"""


@dataclass(frozen=True)
class JobRecord:
    """One row of the jobs table, decoded."""

    id: str
    kind: JobKind
    state: JobState
    request: dict[str, Any]
    payload: dict[str, Any]
    attempt: int
    created: float
    started: float | None
    finished: float | None
    error: str | None
    result: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        fields = dict(row)
        for key in ("request", "payload", "result"):
            fields[key] = json.loads(fields[key]) if fields[key] is not None else None
        return cls(**fields)


JOB_ID_PATTERN = r"^[0-9a-f]{12}$"  # what new_job_id makes; the API checks job ids in paths against it


def new_job_id() -> str:
    """12 hex digits: a safe folder name under the runs root and a model id prefix."""
    return uuid.uuid4().hex[:12]


class JobStore:
    """The jobs table. Every write is one autocommitted statement, so a killed service never leaves half a record.

    A connection per call keeps the store safe to use from the event loop, the thread pool and the runner thread.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the runner's writes
            db.executescript(SCHEMA)

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return closing(db)

    def create(self, job_id: str, kind: JobKind, request: dict, payload: dict) -> JobRecord:
        with self._connect() as db:
            db.execute("INSERT INTO jobs (id, kind, state, request, payload, created) VALUES (?, ?, 'queued', ?, ?, ?)",
                       (job_id, kind, json.dumps(request), json.dumps(payload), time.time()))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return JobRecord.from_row(row)

    def list(self, *, state: str | None = None, kind: str | None = None, limit: int = 100,
             offset: int = 0) -> tuple[list[JobRecord], int]:
        """Newest first, filtered; also the count of all matching records (for paging)."""
        where = " AND ".join(f"{col} = :{col}" for col, v in (("state", state), ("kind", kind)) if v is not None)
        where = f"WHERE {where}" if where else ""
        args = {"state": state, "kind": kind, "limit": limit, "offset": offset}
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY created DESC, rowid DESC "
                              "LIMIT :limit OFFSET :offset", args).fetchall()
            total = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
        return [JobRecord.from_row(r) for r in rows], total

    def counts(self) -> dict[str, int]:
        """Records per state (every state present, zeros included)."""
        with self._connect() as db:
            rows = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state: rows.get(state, 0) for state in STATES}

    def mark_running(self, job_id: str, started: float | None = None) -> bool:
        """queued -> running (the worker has started); False if the job left `queued` meanwhile."""
        return self._transition(job_id, ("queued",), "running", started=started or time.time())

    def finish(self, job_id: str, state: JobState, *, error: str | None = None, result: dict | None = None) -> bool:
        """An active job -> succeeded | failed | cancelled; False (nothing written) if it had already finished.

        The condition on the current state settles the race between a cancel request and the task's own end.
        """
        return self._transition(job_id, ACTIVE, state, finished=time.time(), error=error,
                                result=None if result is None else json.dumps(result))

    def requeue(self, job_id: str) -> JobRecord:
        """failed | cancelled -> queued with attempt + 1, for a resubmission that resumes in the same run folder."""
        if not self._transition(job_id, ("failed", "cancelled"), "queued", started=None, finished=None, error=None,
                                result=None, attempt_inc=True):
            raise JobStateError(f"job {job_id!r} is {self.get(job_id).state}; only failed or cancelled jobs resume")
        return self.get(job_id)

    def fail_interrupted(self) -> list[str]:
        """At start-up: jobs a dead service left queued or running are failed, with the reason and how to resume."""
        now = time.time()
        with self._connect() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')")]
            db.execute("UPDATE jobs SET error = 'the service stopped while this job was ' || state || "
                       "'; POST /v1/jobs/' || id || ':retry resumes it from its last checkpoint', "
                       "state = 'failed', finished = ? WHERE state IN ('queued', 'running')", (now,))
        return ids

    def _transition(self, job_id: str, from_states: tuple[str, ...], to_state: str, attempt_inc: bool = False,
                    **fields) -> bool:
        sets = ", ".join([f"{k} = :{k}" for k in fields] + ["state = :to_state"]
                         + (["attempt = attempt + 1"] if attempt_inc else []))
        marks = ", ".join(f":s{i}" for i in range(len(from_states)))
        args = {**fields, "to_state": to_state, "id": job_id, **{f"s{i}": s for i, s in enumerate(from_states)}}
        with self._connect() as db:
            changed = db.execute(f"UPDATE jobs SET {sets} WHERE id = :id AND state IN ({marks})", args).rowcount
        if not changed:
            self.get(job_id)  # raises JobNotFoundError for an unknown id
        return bool(changed)
