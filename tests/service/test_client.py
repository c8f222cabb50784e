"""The Python client against a live server: every call, and the server's errors as ApiError (a real job is
submitted, followed and waited on through it in test_jobs_flow.py)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from service.client import ApiError, Client
from store import LabelsetReader
from tests.service.test_models_api import png_header


@pytest.fixture
def client(api, api_key):
    with Client(str(api.base_url), token=api_key) as c:
        yield c


def test_the_client_imports_without_torch():
    code = "import sys, service.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_labelsets_read_as_the_store_holds_them(client, api_roots):
    import store

    # the session store is shared: other modules may have added labelsets, so compare with what it holds now
    listed = [s.labelset_id for s in client.labelsets.list()]
    assert "known" in listed and listed == [s.labelset_id for s in store.list_labelsets(api_roots["store"])]
    detail = client.labelsets.get("known")
    assert detail.num_classes == 5 and detail.content["overall"]["rows"] == 100
    ids = [99, 0, 31, 32]
    rows = client.labelsets.labels("known", ids)
    expected = LabelsetReader(api_roots["store"], "known").soft_labels(np.array(ids))
    assert rows.dtype == np.float32 and rows.shape == (4, 5)
    np.testing.assert_allclose(rows, expected, atol=1e-3)
    top = client.labelsets.labels("known", ids, top_k=2)
    assert [r.image_id for r in top.data] == ids and all(len(r.classes) == 2 for r in top.data)
    assert top.data[0].classes[0] == int(np.argmax(expected[0]))


def test_server_errors_become_api_errors_with_its_message(client, api, api_roots, make_labelset):
    with pytest.raises(ApiError) as err:
        client.labelsets.get("absent")
    assert (err.value.status, err.value.type) == (404, "labelset_not_found") and "absent" in str(err.value)
    with pytest.raises(ApiError) as err:
        client.labelsets.labels("known", [100])
    assert err.value.status == 404
    make_labelset(api_roots["store"], "client-doomed", np.zeros((10, 5), np.float16), chunk_rows=10)
    with Client(str(api.base_url), token="wrong") as stranger, pytest.raises(ApiError) as err:
        stranger.labelsets.delete("client-doomed")
    assert err.value.status == 401
    trashed = client.labelsets.delete("client-doomed")
    assert trashed.restore.endswith("client-doomed:restore")
    assert "client-doomed" in [t.labelset_id for t in client.labelsets.list(deleted=True)]
    assert client.labelsets.restore("client-doomed").num_images == 10
    with pytest.raises(ApiError) as err:
        client.labelsets.restore("client-doomed")  # nothing left in the trash
    assert err.value.status == 404
    client.labelsets.delete("client-doomed")
    with pytest.raises(ApiError) as err:
        client.models.predict("run1", [png_header(100_000, 100_000)])
    assert (err.value.status, err.value.type) == (413, "payload_too_large")
    with pytest.raises(ApiError) as err:
        client.jobs.submit({"kind": "labels", "teacher": "run1/teacher", "labelset_id": "known"})
    assert (err.value.status, err.value.type) == (409, "labelset_exists")


def test_models_predict_paths_bytes_and_pil_images_alike(client, tmp_path):
    assert "run1" in [m.id for m in client.models.list()] and client.models.get("run1").num_classes == 5
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    path = tmp_path / "a.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    out = client.models.predict("run1", [path, buffer.getvalue(), image], top_k=2).data
    assert [p.file for p in out] == ["a.png", "image1.png", "image2.png"]
    assert out[0].top_k == out[1].top_k == out[2].top_k and len(out[0].top_k) == 2


def test_the_cli_over_http_reads_labels_and_reports_server_errors(api, api_key, api_roots, monkeypatch):
    import json

    from typer.testing import CliRunner

    from service.cli import app

    runner, url = CliRunner(), str(api.base_url)
    monkeypatch.setenv("LTD_API_KEY", api_key)
    got = runner.invoke(app, ["labels", "get", "known", "0", "5", "--top-k", "2", "--url", url])
    assert got.exit_code == 0, got.output
    rows = [json.loads(line) for line in got.output.splitlines()]
    expected = LabelsetReader(api_roots["store"], "known").soft_labels(np.array([0, 5]))
    assert [r["image_id"] for r in rows] == [0, 5] and rows[1]["classes"][0] == int(np.argmax(expected[1]))
    assert runner.invoke(app, ["jobs", "list", "--url", url]).exit_code == 0
    missing = runner.invoke(app, ["jobs", "status", "000000000000", "--url", url])
    assert missing.exit_code == 1 and "404 job_not_found" in missing.output
    taken = runner.invoke(app, ["jobs", "submit", "--kind", "labels", "--teacher", "run1/teacher", "--labelset",
                                "known", "--url", url])
    assert taken.exit_code == 2 and "409 labelset_exists" in taken.output
    monkeypatch.setenv("LTD_API_KEY", "wrong")
    refused = runner.invoke(app, ["jobs", "cancel", "000000000000", "--url", url])
    assert refused.exit_code == 1 and "401 unauthorized" in refused.output
