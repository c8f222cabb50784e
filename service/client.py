"""A typed Python client of the ltd HTTP API (no torch needed): labelsets, jobs and models.

    from service.client import Client

    client = Client("http://127.0.0.1:8000")           # token: argument, LTD_API_KEY, or ~/.config/ltd/token
    rows = client.labelsets.labels("demo-ssd-t2", [0, 1, 2])  # float32 (3, C) soft labels
    job = client.jobs.submit({"kind": "distill", "labelset_id": "demo-ssd-t2"})
    job.wait(progress=True)
    client.models.predict(job.id, ["dog.png"])

Requests and answers are the server's own pydantic schemas (`service/schemas.py`); an HTTP error becomes an
`ApiError` carrying the server's status, error type and message. The shape follows Ray's JobSubmissionClient.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import TypeAdapter

from service import schemas

TERMINAL = ("succeeded", "failed", "cancelled")
_JOB_IN = TypeAdapter(schemas.JobIn)


class ApiError(Exception):
    """An HTTP error answer: `status` (e.g. 404), `type` (e.g. labelset_not_found) and the server's `detail`."""

    def __init__(self, status: int, type_: str, detail: Any):
        super().__init__(f"{status} {type_}: {detail}")
        self.status, self.type, self.detail = status, type_, detail


class Client:
    """One connection to an `ltd serve`; `token` defaults to LTD_API_KEY, else this machine's token file."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 60.0):
        if token is None:
            from service.auth import client_key

            token = client_key()
        self.http = httpx.Client(base_url=url, timeout=timeout, headers={"X-API-Key": token} if token else {})
        self.labelsets, self.jobs, self.models = Labelsets(self), Jobs(self), Models(self)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The answer of one request; error answers raise ApiError with the server's message."""
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                raise ApiError(response.status_code, body.get("type", "http_error"), body.get("detail"))
            except ValueError:
                raise ApiError(response.status_code, "http_error", response.text) from None
        return response

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Labelsets:
    def __init__(self, client: Client):
        self._c = client

    def list(self, deleted: bool = False) -> list[schemas.LabelsetPublic] | list[schemas.TrashedLabelset]:
        """Published labelsets, or with `deleted` the trash."""
        body = self._c.request("GET", "/v1/labelsets", params={"deleted": deleted}).json()
        model = schemas.TrashPublic if deleted else schemas.LabelsetsPublic
        return model.model_validate(body).data

    def get(self, labelset_id: str) -> schemas.LabelsetDetail:
        return schemas.LabelsetDetail.model_validate(self._c.request("GET", f"/v1/labelsets/{labelset_id}").json())

    def labels(self, labelset_id: str, image_ids: Sequence[int], temperature: float | None = None,
               top_k: int | None = None, as_numpy: bool = True) -> np.ndarray | schemas.BatchLabelsOut:
        """Soft labels of these training images, in their order: float32 (n, C) rows (the npy wire format), or the
        JSON answer (`as_numpy=False`; with `top_k`, the k largest of each row and their classes)."""
        body = schemas.BatchLabelsIn(image_ids=list(image_ids), temperature=temperature, top_k=top_k)
        path = f"/v1/labelsets/{labelset_id}/labels:batch"
        if as_numpy and top_k is None:
            response = self._c.request("POST", path, json=body.model_dump(exclude_none=True),
                                       headers={"Accept": "application/octet-stream"})
            return np.load(io.BytesIO(response.content)).astype(np.float32)
        answer = schemas.BatchLabelsOut.model_validate(
            self._c.request("POST", path, json=body.model_dump(exclude_none=True)).json())
        return answer

    def delete(self, labelset_id: str) -> schemas.TrashedLabelset:
        """Move it into the trash (restorable until `purge_after`)."""
        return schemas.TrashedLabelset.model_validate(
            self._c.request("DELETE", f"/v1/labelsets/{labelset_id}").json())

    def restore(self, labelset_id: str) -> schemas.LabelsetDetail:
        return schemas.LabelsetDetail.model_validate(
            self._c.request("POST", f"/v1/labelsets/{labelset_id}:restore").json())


class Job:
    """A submitted job: poll it, wait for it, read its log, cancel or retry it."""

    def __init__(self, client: Client, job_id: str):
        self._c, self.id = client, job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> schemas.JobPublic:
        return schemas.JobPublic.model_validate(self._c.request("GET", f"/v1/jobs/{self.id}").json())

    def wait(self, progress: bool = False, poll: float = 1.0, timeout: float | None = None) -> schemas.JobPublic:
        """Poll until the job ends; `progress` draws a bar fed by the epochs the job reports."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        try:
            while True:
                job = self.status()
                if progress:
                    bar = _update_bar(bar, job)
                if job.state in TERMINAL:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {job.state} after {timeout} s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    def logs(self, follow: bool = False, poll: float = 1.0, tail: int = 10_000) -> Iterator[str]:
        """The log's lines; with `follow`, new lines as they come until the job ends."""
        seen = 0
        while True:
            ended = follow and self.status().state in TERMINAL  # read the state first: no line is lost at the end
            lines = self._c.request("GET", f"/v1/jobs/{self.id}/logs", params={"tail": tail}).text.splitlines()
            yield from lines[seen:] if len(lines) >= seen else lines
            seen = len(lines)
            if not follow or ended:
                return
            time.sleep(poll)

    def cancel(self) -> schemas.JobPublic:
        return schemas.JobPublic.model_validate(self._c.request("POST", f"/v1/jobs/{self.id}:cancel").json())

    def retry(self) -> schemas.JobPublic:
        return schemas.JobPublic.model_validate(self._c.request("POST", f"/v1/jobs/{self.id}:retry").json())


def _update_bar(bar, job: schemas.JobPublic):
    from tqdm.auto import tqdm

    p = job.progress or {}
    total, done = p.get("epochs") or p.get("num_chunks"), p.get("epoch") or p.get("chunks_done") or 0
    if bar is None:
        bar = tqdm(total=total, desc=f"{job.kind} {job.id}", unit="ep" if "epochs" in p else "chunk")
    if total and bar.total != total:
        bar.reset(total=total)
    bar.n = done
    bar.set_postfix_str(f"{job.state} stage {p['stage']}" if "stage" in p else job.state)
    return bar


class Jobs:
    def __init__(self, client: Client):
        self._c = client

    def submit(self, request: dict | schemas.TrainJobIn | schemas.LabelsJobIn | schemas.DistillJobIn) -> Job:
        """Submit a train, labels or distill job (validated here first, with the server's own schema)."""
        body = _JOB_IN.validate_python(request) if isinstance(request, dict) else request
        answer = self._c.request("POST", "/v1/jobs", json=body.model_dump(mode="json", exclude_none=True))
        return Job(self._c, answer.json()["id"])

    def get(self, job_id: str) -> Job:
        job = Job(self._c, job_id)
        job.status()  # ApiError 404 for an unknown id
        return job

    def list(self, state: str | None = None, kind: str | None = None, limit: int = 100) -> list[schemas.JobPublic]:
        params = {k: v for k, v in (("state", state), ("kind", kind), ("limit", limit)) if v is not None}
        return schemas.JobsPublic.model_validate(self._c.request("GET", "/v1/jobs", params=params).json()).data


class Models:
    def __init__(self, client: Client):
        self._c = client

    def list(self) -> list[schemas.ModelPublic]:
        return schemas.ModelsPublic.model_validate(self._c.request("GET", "/v1/models").json()).data

    def get(self, model_id: str) -> schemas.ModelPublic:
        return schemas.ModelPublic.model_validate(self._c.request("GET", f"/v1/models/{model_id}").json())

    def predict(self, model_id: str, images: Sequence[Any], top_k: int | None = None) -> schemas.PredictOut:
        """Classify images given as file paths, bytes (PNG/JPEG) or PIL images."""
        files = [("files", _image_file(image, i)) for i, image in enumerate(images)]
        params = {"top_k": top_k} if top_k else {}
        answer = self._c.request("POST", f"/v1/models/{model_id}:predict", files=files, params=params)
        return schemas.PredictOut.model_validate(answer.json())


def _image_file(image, index: int) -> tuple[str, bytes]:
    if isinstance(image, (str, Path)):
        return Path(image).name, Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray)):
        return f"image{index}.png", bytes(image)
    buffer = io.BytesIO()  # a PIL image
    image.save(buffer, "PNG")
    return f"image{index}.png", buffer.getvalue()
