"""The schemathesis CLI, `--checks all`, against a live server over a real store with a real labelset and model.

With the key: no 5xx, no answer outside the schema, no schema-valid request refused, no 405 or OPTIONS with a wrong
`Allow`. Without it: the whole run, deletes and uploads included, leaves every list and every file as it was.
(test_api_contract.py drives each operation through hypothesis in-process; this is the tool as a user runs it.)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import api_settings, write_labelset, write_model

# what a schema cannot say about a file's bytes: an upload that is not a model (400), or not an image (400), or
# too many files (413) is a correct refusal of a schema-valid request
CONFIG = """
[[operations]]
include-name = "PUT /v1/models/{model_id}"
checks.positive_data_acceptance.expected-statuses = [201, 400, 401, 404, 409, 413]

[[operations]]
include-name = "POST /v1/models/{model_id}:predict"
checks.positive_data_acceptance.expected-statuses = [200, 400, 404, 413]
checks.negative_data_rejection.expected-statuses = [400, 401, 404, 413, 422]
"""


def _roots(root: Path) -> dict:
    logits = np.random.default_rng(0).normal(0.0, 2.0, (64, 5)).astype(np.float16)
    write_labelset(root / "store", "known", logits)
    write_model(root / "runs" / "run1" / "model.pt")
    write_model(root / "runs" / "run1" / "teacher.pt", role="teacher")
    return {"store": root / "store", "runs": root / "runs"}


def _schemathesis(url: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("schemathesis")
    command = [str(exe), "--config-file", str(config), "run", f"{url}/openapi.json", "--checks", "all",
               "--max-examples", "20", "--seed", "0", "--workers", "1", "--generation-database", "none",
               "--phases", "examples,coverage,fuzzing,stateful", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _files(*roots: Path) -> dict[str, str]:
    """Every file under the roots (the jobs database aside: reads may touch its journal) with its sha256."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("jobs.db")}


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "schemathesis.toml"
    path.write_text(CONFIG)
    return path


def test_with_the_key_every_check_passes(tmp_path, live_server, api_key, config):
    from service.app import create_app

    roots = _roots(tmp_path / "keyed")
    with live_server(create_app(api_settings(roots, max_upload_bytes=2**20))) as url:
        # job submission is left out here: a schema-valid config would start real training
        run = _schemathesis(url, config, "-H", f"X-API-Key: {api_key}", "--exclude-name", "POST /v1/jobs")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]


def test_without_the_key_nothing_changes(tmp_path, live_server, config):
    from service.app import create_app

    roots = _roots(tmp_path / "open")
    with live_server(create_app(api_settings(roots, max_upload_bytes=2**20))) as url:
        with httpx.Client(base_url=url, timeout=30) as api:
            def lists():
                return [api.get(path).json() for path in ("/v1/labelsets", "/v1/labelsets?deleted=true",
                                                          "/v1/jobs", "/v1/models")]
            before, files = lists(), _files(roots["store"], roots["runs"])
            run = _schemathesis(url, config)  # every operation, job submission included
            assert lists() == before
    assert _files(roots["store"], roots["runs"]) == files
    assert "401" in run.stdout  # the mutations were tried, and refused
    assert "500" not in run.stdout and "Server error" not in run.stdout, run.stdout[-8000:]


@pytest.mark.parametrize("path, allow", [
    ("/v1/labelsets/known", "DELETE, GET, OPTIONS"), ("/v1/models/run1", "GET, OPTIONS, PUT"),
    ("/v1/models/run1:predict", "OPTIONS, POST"), ("/v1/jobs/feedbeef0000:cancel", "OPTIONS, POST"),
    ("/v1/labelsets", "GET, OPTIONS")])
def test_allow_names_every_method_of_the_path(api, path, allow):
    """OPTIONS answers 204 with the path's methods; a method the path lacks is a 405 with the same list."""
    options = api.options(path)
    assert (options.status_code, options.headers["allow"]) == (204, allow)
    wrong = api.patch(path)
    assert (wrong.status_code, wrong.headers["allow"], wrong.json()["type"]) == (405, allow, "method_not_allowed")
