"""Service fixtures: a live uvicorn on 127.0.0.1 (in a thread of the test process), and a job poller."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
import uvicorn


@contextmanager
def _serve(app):
    """Run `app` on a free loopback port until the block ends; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def live_server():
    """`with live_server(create_app(settings)) as url:` serves the app on 127.0.0.1 for the block."""
    return _serve


def wait_for_job(client: httpx.Client, job_id: str, states=("succeeded", "failed", "cancelled"),
                 timeout: float = 300, until=None) -> dict:
    """Poll GET /v1/jobs/{id} until the job reaches one of `states` (or `until(job)` holds)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states or (until is not None and until(job)):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s: {job}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def poll_job():
    return wait_for_job


KEY = "test-key-3f9a"
CLASSES = ["cat", "dog", "owl", "eel", "yak"]


def write_labelset(root, labelset_id: str, logits: np.ndarray, temperature: float = 2.0, chunk_rows: int = 32,
                   publish: bool = True, **spec_fields):
    """A labelset with the given (N, C) teacher logits and hard labels i % C, written through the store's writer;
    `spec_fields` go into its LabelsetSpec (e.g. top_k=2, dense=False)."""
    from store import LabelsetSpec, LabelsetWriter

    n, c = logits.shape
    spec = LabelsetSpec(teacher_checkpoint_hash="0" * 64, dataset_name="synthetic", dataset_fingerprint="f" * 16,
                        num_images=n, num_classes=c, temperature=temperature, class_names=CLASSES[:c],
                        class_counts=[n // c] * c, chunk_rows=chunk_rows, **spec_fields)
    writer = LabelsetWriter.create(root, labelset_id, spec)
    labels = np.arange(n) % c
    for chunk in range(writer.num_chunks):
        a, b = writer.chunk_bounds(chunk)
        writer.write_chunk(chunk, logits[a:b], labels[a:b])
        if not publish:
            break  # leave it staged, half written
    return writer.publish() if publish else writer


def write_model(path, role: str = "classifier", image_size: int = 16, resize: int | None = None):
    """An untrained ResNet-8 classifier saved as a self-describing model file (trainer.export)."""
    from trainer.export import ModelSpec, save_model
    from trainer.models import Classifier, build_backbone

    backbone = build_backbone("resnet8", 3)
    model = Classifier(backbone, torch.nn.Linear(backbone.feature_dim, len(CLASSES))).eval()
    spec = ModelSpec(arch="resnet8", in_channels=3, num_classes=len(CLASSES), head="linear", class_names=CLASSES,
                     mean=[0.5, 0.4, 0.3], std=[0.25, 0.2, 0.3], image_size=image_size, role=role, method="ce",
                     fingerprint="f" * 16, metrics={"overall": 20.0, "many": 30.0, "medium": 10.0, "few": 0.0},
                     resize=resize)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, model, spec)


@pytest.fixture(scope="session")
def api_roots(tmp_path_factory):
    """A store with labelset 'known' (N=100, C=5, T=2, 4 chunks) and runs/run1 with model.pt and teacher.pt."""
    root = tmp_path_factory.mktemp("service_api")
    logits = np.random.default_rng(0).normal(0.0, 2.0, (100, 5)).astype(np.float16)
    write_labelset(root / "store", "known", logits)
    write_model(root / "runs" / "run1" / "model.pt")
    write_model(root / "runs" / "run1" / "teacher.pt", role="teacher")
    return {"store": root / "store", "runs": root / "runs", "logits": logits.astype(np.float32)}


def api_settings(roots, **overrides):
    from service.settings import Settings

    defaults = dict(store_root=roots["store"], runs_root=roots["runs"], api_key=KEY, max_batch_ids=500,
                    max_upload_bytes=256 * 1024, max_upload_files=8, max_image_pixels=256 * 256)
    return Settings(**{**defaults, **overrides})


@pytest.fixture(scope="session")
def api(api_roots, live_server):
    """A live server over `api_roots` with key KEY (reads open); yields an httpx client bound to it."""
    from service.app import create_app

    with live_server(create_app(api_settings(api_roots))) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def api_key():
    return KEY


@pytest.fixture(scope="session")
def make_labelset():
    """`make_labelset(root, id, logits, ...)`: write (and by default publish) a labelset of these logits."""
    return write_labelset


@pytest.fixture(scope="session")
def make_model():
    """`make_model(path, role=..., image_size=...)`: save an untrained ResNet-8 model file."""
    return write_model
