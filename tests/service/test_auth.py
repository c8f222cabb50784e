"""Never open by default: without LTD_API_KEY the service generates a token, keeps it 0600 and checks it."""

from __future__ import annotations

import json
import logging
import stat

import httpx
import pytest
from typer.testing import CliRunner

from service.auth import client_key, is_loopback, load_or_create_token
from tests.service.conftest import api_settings


def test_the_token_is_made_once_private_and_reused(tmp_path):
    path = tmp_path / "cfg" / "ltd" / "token"
    token = load_or_create_token(path)
    assert len(token) >= 40 and load_or_create_token(path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_token(path)


def test_loopback_binds_only():
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.5", "::", "example.org", ""]))


def test_a_service_without_a_configured_key_checks_its_generated_token(api_roots, live_server, tmp_path, caplog):
    from service.app import create_app

    caplog.set_level(logging.INFO, logger="ltd.audit")
    token_file = tmp_path / "token"
    settings = api_settings(api_roots, api_key=None, token_file=token_file)
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as api:
        token = token_file.read_text().strip()
        assert client_key(settings) == token  # what `ltd` commands and the client will send
        before = api.get("/v1/labelsets").json(), api.get("/v1/jobs").json()
        for headers in ({}, {"X-API-Key": token + "x"}):
            refused = api.delete("/v1/labelsets/known", headers=headers)
            assert refused.status_code == 401 and refused.json()["type"] == "unauthorized"
            assert refused.headers["WWW-Authenticate"].startswith("APIKey")
            assert api.post("/v1/jobs", json={"kind": "train", "config": {}}, headers=headers).status_code == 401
        assert (api.get("/v1/labelsets").json(), api.get("/v1/jobs").json()) == before  # nothing changed
        assert api.delete("/v1/labelsets/absent", headers={"X-API-Key": token}).status_code == 404  # key accepted
        metrics = api.get("/metrics").text
        assert 'ltd_auth_failures_total{method="DELETE",section="labelsets"} 2.0' in metrics
        assert 'ltd_auth_failures_total{method="POST",section="jobs"} 2.0' in metrics
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ltd.audit"]
    assert [(a["method"], a["status"], a["outcome"]) for a in audit] == [
        ("DELETE", 401, "refused"), ("POST", 401, "refused"), ("DELETE", 401, "refused"), ("POST", 401, "refused"),
        ("DELETE", 404, "error")]  # one line per mutation attempt; reads are not audited
    assert audit[0]["ids"] == {"labelset_id": "known"} and audit[0]["client"].startswith("127.0.0.1:")
    assert audit[0]["endpoint"] == "/v1/labelsets/{labelset_id}" and token not in caplog.text


def test_no_auth_opens_mutations_and_is_refused_off_loopback(api_roots, live_server, tmp_path, monkeypatch):
    from service.app import create_app
    from service.cli import app

    settings = api_settings(api_roots, api_key=None, no_auth=True, token_file=tmp_path / "token")
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as api:
        assert api.delete("/v1/labelsets/absent").status_code == 404  # past the key check
    assert not (tmp_path / "token").exists()
    monkeypatch.delenv("LTD_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--no-auth", "--host", "0.0.0.0", "--store", str(tmp_path / "s")])
    assert result.exit_code == 2 and "loopback binds only" in result.output
