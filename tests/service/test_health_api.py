"""Health, readiness, Prometheus metrics, and reads behind the key when the deployment asks for it."""

import json
import logging
import shutil
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image


def test_health_and_readiness(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz").json()
    assert ready["status"] == "ready"
    assert {k: ready["checks"][k] for k in ("job_db", "store_root", "runs_root")} == dict.fromkeys(
        ("job_db", "store_root", "runs_root"), "ok")


def test_metrics_count_requests_label_rows_and_jobs(api):
    api.post("/v1/labelsets/known/labels:batch", json={"image_ids": [1, 2, 3]})
    api.get("/v1/labelsets/known/labels/4")
    api.get("/v1/labelsets/known/labels/400")
    response = api.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    route = 'route="/v1/labelsets/{labelset_id}/labels/{image_id}"'
    assert f'ltd_http_requests_total{{method="GET",{route},status="404"}}' in text  # the template, not the raw path
    rows = next(line for line in text.splitlines() if line.startswith('ltd_label_rows_read_total{labelset="known"}'))
    assert float(rows.split()[-1]) >= 4
    assert 'ltd_jobs{state="running"}' in text and "ltd_http_request_duration_seconds_bucket" in text


def test_read_key_required_keeps_reads_behind_the_key_and_never_logs_it(api_roots, live_server, caplog):
    from service.app import create_app
    from service.settings import Settings

    key = "s3cret-read-key-value"
    settings = Settings(store_root=api_roots["store"], runs_root=api_roots["runs"], api_key=key,
                        read_key_required=True, db_path=api_roots["runs"].parent / "other.sqlite3")
    with caplog.at_level(logging.DEBUG), live_server(create_app(settings)) as url:
        with httpx.Client(base_url=url) as client:
            assert client.get("/v1/labelsets").status_code == 401
            assert client.get("/v1/labelsets/known/labels/1", headers={"X-API-Key": key[:-1]}).status_code == 401
            assert client.get("/v1/labelsets/known/labels/1", headers={"X-API-Key": key}).status_code == 200
            assert client.get("/v1/models", headers={"X-API-Key": key}).json()["count"] == 2
            assert client.get("/healthz").status_code == 200  # probes stay open
    assert key not in caplog.text and key not in repr(settings)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_printed_example_requests_work_as_printed(api, api_roots, tmp_path):
    from service.cli import example_requests
    from service.settings import Settings

    image = tmp_path / "dog.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    lines = example_requests(str(api.base_url), Settings(store_root=api_roots["store"], runs_root=api_roots["runs"]),
                             image=image)
    assert len(lines) == 5 and "known" in lines[2] and "run1:predict" in lines[4]
    for line in lines:
        out = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=30, check=True).stdout
        assert "detail" not in json.loads(out), (line, out)
