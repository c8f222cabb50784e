"""The SQLite job records: state transitions, the cancel/finish race, resubmission, and recovery after a crash."""

import sqlite3

import pytest

from service.errors import JobNotFoundError, JobStateError
from service.jobs import JobStore


@pytest.fixture
def jobs(tmp_path):
    return JobStore(tmp_path / "db" / "jobs.sqlite3")


def test_lifecycle_and_persistence(jobs, tmp_path):
    job = jobs.create("a1", "train", {"kind": "train"}, {"run_dir": "/r/a1"})
    assert (job.state, job.attempt, job.started, job.result) == ("queued", 1, None, None)
    assert jobs.mark_running("a1", started=123.0) and jobs.get("a1").started == 123.0
    assert not jobs.mark_running("a1")  # already running: nothing changes
    assert jobs.finish("a1", "succeeded", result={"metrics": {"final": {"overall": 50.0}}})
    assert not jobs.finish("a1", "cancelled")  # a late cancel does not overwrite the end
    reopened = JobStore(tmp_path / "db" / "jobs.sqlite3").get("a1")
    assert reopened.state == "succeeded" and reopened.result["metrics"]["final"]["overall"] == 50.0
    assert reopened.request == {"kind": "train"} and reopened.payload == {"run_dir": "/r/a1"}


def test_retry_only_after_failure_or_cancel(jobs):
    jobs.create("b1", "labels", {}, {})
    with pytest.raises(JobStateError, match="queued"):
        jobs.requeue("b1")
    jobs.finish("b1", "failed", error="worker died")
    again = jobs.requeue("b1")
    assert (again.state, again.attempt, again.error, again.finished) == ("queued", 2, None, None)
    with pytest.raises(JobNotFoundError):
        jobs.requeue("nope")


def test_jobs_left_active_by_a_dead_service_are_failed_with_the_reason(jobs, tmp_path):
    for job_id, state in (("q", "queued"), ("r", "running"), ("s", "succeeded")):
        jobs.create(job_id, "train", {}, {})
        if state == "running":
            jobs.mark_running(job_id)
        if state == "succeeded":
            jobs.finish(job_id, "succeeded", result={})
    restarted = JobStore(tmp_path / "db" / "jobs.sqlite3")
    assert sorted(restarted.fail_interrupted()) == ["q", "r"]
    assert restarted.get("r").state == "failed" and "while this job was running" in restarted.get("r").error
    assert "POST /v1/jobs/q:retry" in restarted.get("q").error
    assert restarted.get("s").state == "succeeded"
    assert restarted.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 2, "cancelled": 0}


def test_list_filters_pages_and_counts(jobs):
    for i in range(5):
        jobs.create(f"j{i}", "train" if i % 2 else "distill", {}, {})
    page, total = jobs.list(kind="train", limit=1)
    assert total == 2 and len(page) == 1 and page[0].id == "j3"  # newest first
    assert [j.id for j in jobs.list(limit=2, offset=1)[0]] == ["j3", "j2"]
    assert jobs.list(state="failed") == ([], 0)


def test_database_is_real_sqlite_in_wal_mode(jobs):
    with sqlite3.connect(jobs.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
