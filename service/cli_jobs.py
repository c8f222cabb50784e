"""`ltd jobs …`: the service's jobs from a terminal, over HTTP through the Python client (service/client.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from service.client import ApiError, Client, Job

jobs_app = typer.Typer(help="Jobs of a running `ltd serve`: submit, list, status, logs, cancel, retry.",
                       no_args_is_help=True)
UrlOpt = Annotated[str, typer.Option("--url", envvar="LTD_URL", help="Service base URL")]
DEFAULT_URL = "http://127.0.0.1:8000"


def calling(action):
    """Run `action(client)`; a server error prints its message and exits 1 (2 for a rejected request)."""

    def run(url: str):
        try:
            with Client(url) as client:
                return action(client)
        except ApiError as err:
            typer.secho(f"{err.status} {err.type}: {err.detail}", fg="red", err=True)
            raise typer.Exit(2 if err.status in (400, 409, 413, 422) else 1) from err

    return run


def _echo(model) -> None:
    typer.echo(model.model_dump_json(indent=1))


@jobs_app.command("submit")
def submit(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Overrides such as stage1.optim.epochs=5")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config (see configs/)")] = None,
    kind: Annotated[str, typer.Option(help="train, labels or distill")] = "train",
    labelset: Annotated[Optional[str], typer.Option(help="labels: the new labelset's id; distill: the one to "
                                                         "learn from")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="labels: the teacher's model id ('<job>/teacher')")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job with a progress bar")] = False,
    url: UrlOpt = DEFAULT_URL,
):
    """Submit a job; prints its id (with --wait, its final record; exit 1 if it did not succeed)."""
    import yaml

    request: dict = {"kind": kind, "overrides": overrides or []}
    if config is not None:
        request["config"] = yaml.safe_load(config.read_text()) or {}
    if labelset is not None:
        request["labelset_id"] = labelset
    if teacher is not None:
        request["teacher"] = teacher

    def action(client: Client):
        try:
            job = client.jobs.submit(request)
        except ValueError as err:  # refused by the server's schema before sending
            typer.secho(str(err), fg="red", err=True)
            raise typer.Exit(2) from err
        typer.echo(job.id)
        if wait:
            done = job.wait(progress=True)
            _echo(done)
            if done.state != "succeeded":
                raise typer.Exit(1)

    calling(action)(url)


@jobs_app.command("list")
def list_jobs(state: Optional[str] = None, kind: Optional[str] = None, url: UrlOpt = DEFAULT_URL):
    """One line per job, newest first: id, kind, state, progress."""

    def action(client: Client):
        for job in client.jobs.list(state=state, kind=kind):
            typer.echo(f"{job.id}  {job.kind:<8} {job.state:<10} {json.dumps(job.progress or {})}")

    calling(action)(url)


@jobs_app.command("status")
def status(job_id: str, url: UrlOpt = DEFAULT_URL):
    """A job's record as JSON."""
    calling(lambda client: _echo(client.jobs.get(job_id).status()))(url)


@jobs_app.command("logs")
def logs(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends")] = False,
         url: UrlOpt = DEFAULT_URL):
    """A job's log (progress, per-epoch lines, a failure's traceback)."""

    def action(client: Client):
        for line in client.jobs.get(job_id).logs(follow=follow):
            typer.echo(line)

    calling(action)(url)


@jobs_app.command("cancel")
def cancel(job_id: str, url: UrlOpt = DEFAULT_URL):
    """Cancel a queued or running job."""
    calling(lambda client: _echo(Job(client, job_id).cancel()))(url)


@jobs_app.command("retry")
def retry(job_id: str, url: UrlOpt = DEFAULT_URL):
    """Resume a failed or cancelled job from its checkpoints."""
    calling(lambda client: _echo(Job(client, job_id).retry()))(url)


def labels_get(labelset_id: str, image_ids: list[int], temperature: Optional[float] = None,
               top_k: Optional[int] = None, url: UrlOpt = DEFAULT_URL):
    """Soft labels of training images from a running service, one JSON row per image."""

    def action(client: Client):
        answer = client.labelsets.labels(labelset_id, image_ids, temperature=temperature, top_k=top_k,
                                         as_numpy=False)
        for row in answer.data:
            typer.echo(row.model_dump_json())

    calling(action)(url)
