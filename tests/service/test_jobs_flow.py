"""Jobs on a real local Ray through a live server: train -> labels -> distill, then labels and predictions served;
cancel; and a killed `ltd serve` that loses no job record and resumes the job on retry."""

import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.client import ApiError, Client
from service.jobs import JobStore
from trainer.augment import normalize, to_float
from trainer.config import RunConfig
from trainer.datasets import load_dataset
from trainer.export import load_model

TINY = {"method": "ssd", "model": {"arch": "resnet8"},
        "data": {"name": "synthetic", "imbalance_factor": 20, "max_per_class": 60, "test_per_class": 20},
        "stage1": {"optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 64}, "moco": {"queue_size": 64}},
        "stage2": {"optim": {"epochs": 1}}, "stage3": {"optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 64}},
        "stage4": {"optim": {"epochs": 1}}}


def ce_config(epochs: int) -> dict:
    return {**TINY, "method": "ce", "stage1": {"optim": {"epochs": epochs, "warmup_epochs": 0, "batch_size": 64}}}


@pytest.fixture(scope="module")
def flow(tmp_path_factory, live_server, ray_local, api_key):
    """A live server whose jobs run on the session's local Ray (2 CPUs); yields (client, store root, runs root)."""
    from service.app import create_app
    from service.settings import Settings

    root = tmp_path_factory.mktemp("flow")
    settings = Settings(store_root=root / "store", runs_root=root / "runs", api_key=api_key)
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30,
                                                                headers={"X-API-Key": api_key}) as client:
        yield client, settings.store_root, settings.runs_root


def submit(client, body) -> str:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["state"] in ("queued", "running", "succeeded")
    return response.json()["id"]


def png(chw_uint8: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(chw_uint8.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_train_labels_distill_then_serve_labels_and_predictions(flow, poll_job):
    client, store_root, runs_root = flow
    train_id = submit(client, {"kind": "train", "config": TINY})
    train = poll_job(client, train_id)
    assert train["state"] == "succeeded", train
    assert train["outputs"]["models"] == [train_id, f"{train_id}/teacher"]
    assert set(train["metrics"]["stages"]) == {"I", "II", "III", "III_hard_head", "IV"}
    assert train["progress"]["stage"] == "IV" and train["progress"]["epoch"] == train["progress"]["epochs"] == 1
    log = client.get(f"/v1/jobs/{train_id}/logs").text
    assert "attempt 1 started" in log and "stage I " in log
    assert len(list((runs_root / "stage1_cache").glob("stage1-*.pt"))) == 1  # for the next job of this recipe

    labels_id = submit(client, {"kind": "labels", "teacher": f"{train_id}/teacher", "labelset_id": "flow-t3",
                                "temperature": 3.0})
    second = client.post("/v1/jobs", json={"kind": "labels", "teacher": f"{train_id}/teacher",
                                           "labelset_id": "flow-t3"})  # queued, running or published: never twice
    assert (second.status_code, second.json()["type"]) == (409, "labelset_exists"), second.text
    labels = poll_job(client, labels_id)
    assert labels["state"] == "succeeded", labels
    described = client.get("/v1/labelsets/flow-t3").json()
    assert described["temperature"] == 3.0 and described["num_images"] == labels["outputs"]["labelset"]["num_images"]

    # the served soft labels are the teacher's tempered softmax on the clean training images
    cfg = RunConfig.model_validate(TINY)
    data = load_dataset(cfg.data)
    teacher, spec = load_model(runs_root / train_id / "teacher.pt")
    ids = [0, 5, len(data.train) - 1]
    with torch.no_grad():
        x = normalize(to_float(data.train.images[ids]), spec.mean, spec.std)
        expected = torch.softmax(teacher(x) / 3.0, dim=1).numpy()
    rows = client.post("/v1/labelsets/flow-t3/labels:batch", json={"image_ids": ids}).json()["data"]
    np.testing.assert_allclose([r["probs"] for r in rows], expected, atol=5e-3)
    assert [r["hard_label"] for r in rows] == data.train.labels[ids].tolist()

    # the distill job through the Python client: submit, follow its log to the end, wait
    typed = Client(str(client.base_url), token=client.headers["X-API-Key"])
    job = typed.jobs.submit({"kind": "distill", "labelset_id": "flow-t3"})
    distill_id = job.id
    in_use = client.delete("/v1/labelsets/flow-t3")  # the queued or running distill job reads it
    assert in_use.status_code == 409 and distill_id in in_use.json()["detail"], in_use.text
    followed = list(job.logs(follow=True, poll=0.5))  # returns once the job has ended
    assert typed.jobs.get(distill_id).wait(progress=True, timeout=600).state == "succeeded"
    assert any("attempt 1 started" in line for line in followed) and any("stage III" in line for line in followed)
    with pytest.raises(ApiError) as err:
        job.cancel()  # a finished job cannot be cancelled
    assert err.value.status == 409
    distill = poll_job(client, distill_id)
    assert distill["state"] == "succeeded", distill
    assert distill["outputs"]["models"] == [distill_id] and "IV" in distill["metrics"]["stages"]
    assert train["metrics"]["stage1_reused"] is False and "stage1_reused" not in distill["metrics"]  # no stage I
    student = client.get(f"/v1/models/{distill_id}").json()
    assert student["role"] == "student" and student["metrics"] == distill["metrics"]["final"]

    # predictions of the served student equal its own forward pass on the same test images
    images = data.test.images[:4]
    files = [("files", (f"test{i}.png", png(img))) for i, img in enumerate(images)]
    predicted = client.post(f"/v1/models/{distill_id}:predict", params={"top_k": 3}, files=files).json()["data"]
    model, spec = load_model(runs_root / distill_id / "model.pt")
    with torch.no_grad():
        probs = torch.softmax(model(normalize(to_float(images), spec.mean, spec.std)), dim=1)
    top = probs.topk(3, dim=1)
    for row, classes, values in zip(predicted, top.indices.tolist(), top.values.tolist()):
        assert [c["class_id"] for c in row["top_k"]] == classes
        np.testing.assert_allclose([c["prob"] for c in row["top_k"]], values, atol=1e-5)
    assert client.get("/v1/jobs", params={"state": "succeeded"}).json()["count"] == 3


@pytest.mark.slow
def test_jobs_of_one_stage1_recipe_posted_together_train_it_once(flow, poll_job):
    """CE and LWS jobs posted at once (two requests in flight together) share stage I: the service sends one to
    train and publish it and holds the other back until then; that one starts from it, with the same numbers."""
    client, _, _ = flow
    with ThreadPoolExecutor(2) as pool:
        posted = list(pool.map(lambda method: client.post("/v1/jobs", json={
            "kind": "train", "config": {**ce_config(epochs=2), "method": method}}).json(), ("ce", "lws")))
    assert sorted(bool((job["progress"] or {}).get("waiting")) for job in posted) == [False, True], posted
    ids = [job["id"] for job in posted]
    jobs = [poll_job(client, job_id) for job_id in ids]
    assert [job["state"] for job in jobs] == ["succeeded", "succeeded"], jobs
    assert sorted(job["metrics"]["stage1_reused"] for job in jobs) == [False, True]
    assert jobs[0]["metrics"]["stages"]["I"] == jobs[1]["metrics"]["stages"]["I"]


@pytest.mark.slow
def test_a_job_waits_while_another_process_trains_its_stage1(flow, poll_job, tmp_path, claim_holder):
    """While another process holds the claim on a recipe's stage I, a train job of that recipe says it is waiting;
    when that process is killed without publishing, the job trains the stage I itself and publishes it."""
    from trainer.context import prepare
    from trainer.stages import stage1_cache_entry

    client, _, runs_root = flow
    config = {**ce_config(epochs=2), "seed": 7}  # a recipe no other test trains
    ctx = prepare(RunConfig.model_validate({**config, "out_dir": str(tmp_path)}))
    entry = stage1_cache_entry((runs_root / "stage1_cache").resolve(), ctx.meta("I"))
    holder = claim_holder(entry)
    job_id = submit(client, {"kind": "train", "config": config})
    job = poll_job(client, job_id, timeout=180, until=lambda job: (job["progress"] or {}).get("waiting"))
    assert job["state"] == "running" and job["progress"]["stage"] == "I", job
    assert not (runs_root / job_id / "stage1" / "checkpoint.pt").exists()  # waiting, not training
    holder.kill()  # it dies without publishing
    done = poll_job(client, job_id)
    assert done["state"] == "succeeded" and done["metrics"]["stage1_reused"] is False, done
    assert "waiting for another run" in client.get(f"/v1/jobs/{job_id}/logs").text
    assert entry.exists()


@pytest.mark.slow
def test_a_job_held_for_a_shared_stage1_leaves_its_slot_to_other_jobs(tmp_path, live_server, ray_local, api_key,
                                                                      poll_job):
    """With two job slots (jobs_per_device=2 on 2 CPUs), LWS and cRT jobs of the CE job's stage-I recipe are held
    back (queued, waiting for the CE job) instead of each holding a slot to wait in, so an unrelated job runs beside
    the CE job. A held job that is cancelled never runs; LWS starts once CE has published its stage I, and reuses it."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(store_root=tmp_path / "store", runs_root=tmp_path / "runs", api_key=api_key,
                        jobs_per_device=2)
    recipe = {**ce_config(epochs=40), "seed": 11}
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30,
                                                                headers={"X-API-Key": api_key}) as client:
        ce, lws, crt = (submit(client, {"kind": "train", "config": {**recipe, "method": m}}) for m in ("ce", "lws", "crt"))
        other = submit(client, {"kind": "train", "config": {**ce_config(epochs=1), "seed": 12}})
        for held in (lws, crt):
            job = client.get(f"/v1/jobs/{held}").json()
            assert job["state"] == "queued" and ce in job["progress"]["waiting"], job
        cancelled = client.post(f"/v1/jobs/{crt}:cancel").json()
        assert cancelled["state"] == "cancelled" and cancelled["progress"] is None, cancelled
        done = {name: poll_job(client, job_id) for name, job_id in (("ce", ce), ("lws", lws), ("other", other))}
        assert {job["state"] for job in done.values()} == {"succeeded"}, done
        ended = {name: (datetime.fromisoformat(job["started"]), datetime.fromisoformat(job["finished"]))
                 for name, job in done.items()}
        assert ended["other"][0] < min(ended["ce"][1], ended["lws"][0]), ended  # beside CE, not behind LWS
        assert ended["lws"][0] >= ended["ce"][1], ended  # CE (a joint method) published its stage I at its end
        assert (done["ce"]["metrics"]["stage1_reused"], done["lws"]["metrics"]["stage1_reused"]) == (False, True)
        assert done["lws"]["metrics"]["stages"]["I"] == done["ce"]["metrics"]["stages"]["I"]
        assert client.get(f"/v1/jobs/{crt}").json()["state"] == "cancelled"
        assert not (settings.runs_root / crt / "stage1").exists()  # never started
        running = submit(client, {"kind": "train", "config": {**ce_config(epochs=500), "seed": 13}})
        waiting = submit(client, {"kind": "train", "config": {**ce_config(epochs=500), "seed": 13, "method": "lws"}})
    # the service shut down with one job running and one held back: both records say how to go on
    records = JobStore(settings.jobs_db)
    assert records.get(running).state == records.get(waiting).state == "failed"
    assert "while this job waited for a shared stage I" in records.get(waiting).error
    assert f"/v1/jobs/{waiting}:retry" in records.get(waiting).error


@pytest.mark.slow
def test_a_held_job_whose_holder_is_cancelled_trains_the_stage1_itself(flow, poll_job):
    """The job a held job waits for is cancelled before publishing its stage I: the held job is not left waiting
    forever; the service sends it, and it trains the stage I itself."""
    client, _, runs_root = flow
    recipe = {**ce_config(epochs=30), "seed": 14}
    holder = submit(client, {"kind": "train", "config": recipe})
    held = submit(client, {"kind": "train", "config": {**recipe, "method": "lws"}})
    assert holder in client.get(f"/v1/jobs/{held}").json()["progress"]["waiting"]
    poll_job(client, holder, until=lambda job: job["state"] == "running", timeout=240)
    assert client.post(f"/v1/jobs/{holder}:cancel").json()["state"] == "cancelled"
    done = poll_job(client, held)
    assert done["state"] == "succeeded" and done["metrics"]["stage1_reused"] is False, done
    assert not (runs_root / holder / "metrics.json").exists()


@pytest.mark.slow
def test_cancel_stops_a_running_job(flow, poll_job):
    client, _, _ = flow
    job_id = submit(client, {"kind": "train", "config": ce_config(epochs=200)})
    poll_job(client, job_id, until=lambda job: job["state"] == "running", timeout=240)
    cancelled = client.post(f"/v1/jobs/{job_id}:cancel").json()
    assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled by request"
    time.sleep(1.5)  # the runner sees the task end; the record must stay cancelled
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    assert client.post(f"/v1/jobs/{job_id}:cancel").json()["type"] == "job_state"


def _start_server(port: int, env: dict, log_path) -> subprocess.Popen:
    out = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"ltd serve did not come up: {log_path.read_text()[-2000:]}")


@pytest.mark.slow
def test_killed_service_loses_no_job_and_a_retry_resumes_it(ray_local, tmp_path, api_key, poll_job):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "LTD_API_KEY": api_key, "LTD_STORE_ROOT": str(tmp_path / "store"),
           "LTD_RUNS_ROOT": str(tmp_path / "runs"), "LTD_RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "OMP_NUM_THREADS": "1"}
    url, headers = f"http://127.0.0.1:{port}", {"X-API-Key": api_key}
    server = _start_server(port, env, tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            # enough epochs that the kill lands mid-stage: a finished stage would leave nothing to resume
            job_id = submit(client, {"kind": "train", "config": ce_config(epochs=60)})
            checkpoint = tmp_path / "runs" / job_id / "stage1" / "checkpoint.pt"
            job = poll_job(client, job_id, timeout=240, until=lambda job: checkpoint.exists())
            assert job["state"] == "running", job
        server.send_signal(signal.SIGKILL)  # no shutdown handler runs: the record still says running
        server.wait(timeout=30)
        server = _start_server(port, env, tmp_path / "serve.log")
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            failed = client.get(f"/v1/jobs/{job_id}").json()
            assert failed["state"] == "failed" and "stopped while this job was running" in failed["error"]
            assert client.get("/v1/jobs").json()["count"] == 1
            retried = client.post(f"/v1/jobs/{job_id}:retry").json()
            assert retried["attempt"] == 2 and retried["state"] in ("queued", "running")
            done = poll_job(client, job_id, timeout=300)
            assert done["state"] == "succeeded", done
            log = client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 10_000}).text
        assert "attempt 2 started" in log and "resuming at epoch" in log
    finally:
        server.terminate()
        server.wait(timeout=30)
