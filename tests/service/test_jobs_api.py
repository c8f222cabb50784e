"""Job endpoints without Ray: every bad submission is a precise 4xx and leaves no record; unknown ids are 404."""

import pytest


@pytest.fixture
def submit(api, api_key):
    def post(body, key=api_key):
        return api.post("/v1/jobs", json=body, headers={"X-API-Key": key} if key else {})

    return post


def test_submission_needs_the_key(api, submit):
    before = api.get("/v1/jobs").json()["count"]
    for key in (None, "wrong"):
        response = submit({"kind": "train"}, key=key)
        assert response.status_code == 401 and response.json()["type"] == "unauthorized"
        assert response.headers["www-authenticate"] == "APIKey"
    assert api.get("/v1/jobs").json()["count"] == before


@pytest.mark.parametrize("body, status, kind, says", [
    ({"kind": "train", "config": {"epochs": 3}}, 422, "validation_error", "epochs"),
    ({"kind": "train", "overrides": ["stage1.optim.epochs=3"]}, 422, "validation_error", "lower warmup_epochs"),
    ({"kind": "train", "overrides": ["no-equals-sign"]}, 422, "job_config", "key.path=value"),
    ({"kind": "train", "overrides": ["data.root=/etc"]}, 422, "job_config", "no dataset paths"),
    ({"kind": "evaluate"}, 422, "validation_error", "kind"),
    ({"kind": "labels", "teacher": "nope/teacher", "labelset_id": "new"}, 404, "model_not_found", "nope/teacher"),
    ({"kind": "labels", "teacher": "../../etc", "labelset_id": "new"}, 422, "invalid_id", "invalid model id"),
    ({"kind": "labels", "teacher": "run1/teacher", "labelset_id": "../x"}, 422, "validation_error", "labelset_id"),
    ({"kind": "labels", "teacher": "run1/teacher", "labelset_id": "known"}, 409, "labelset_exists", "known"),
    ({"kind": "labels", "teacher": "run1/teacher", "labelset_id": "new"}, 422, "job_config", "config.yaml"),
    ({"kind": "distill", "labelset_id": "absent"}, 404, "labelset_not_found", "absent"),
    ({"kind": "distill", "labelset_id": "known", "config": {"method": "ce"}}, 422, "job_config", "method must be"),
])
def test_bad_submissions_are_precise_4xx_and_leave_no_record(api, submit, body, status, kind, says):
    before = api.get("/v1/jobs").json()["count"]
    response = submit(body)
    assert response.status_code == status, response.text
    assert response.json()["type"] == kind and says in str(response.json()["detail"])
    assert api.get("/v1/jobs").json()["count"] == before


def test_unknown_jobs(api, api_key):
    keyed = {"X-API-Key": api_key}
    assert api.get("/v1/jobs/feedbeef0000").json()["type"] == "job_not_found"
    assert api.get("/v1/jobs/feedbeef0000/logs").status_code == 404
    assert api.post("/v1/jobs/feedbeef0000:cancel", headers=keyed).status_code == 404
    assert api.post("/v1/jobs/feedbeef0000:retry", headers=keyed).status_code == 404
    assert api.post("/v1/jobs/feedbeef0000:cancel").status_code == 401
    assert api.get("/v1/jobs", params={"state": "exploded"}).status_code == 422


def test_jobs_write_only_under_the_services_roots(tmp_path):
    """A client's out_dir and stage1_cache never reach the worker: the job writes its run folder, and shares stage Is
    in runs_root/stage1_cache (or not at all with share_stage1 off)."""
    from service.planning import plan_job
    from service.schemas import TrainJobIn
    from service.settings import Settings

    request = TrainJobIn(kind="train", config={"out_dir": "/etc/out", "stage1_cache": "/etc/cache"})
    runs = tmp_path / "runs"
    for share, cache in ((True, str((runs / "stage1_cache").resolve())), (False, None)):
        settings = Settings(runs_root=runs, store_root=tmp_path / "store", share_stage1=share)
        config = plan_job(request, "0123456789ab", settings, models=None)["config"]
        assert config["out_dir"] == str((runs / "0123456789ab").resolve()) and config["stage1_cache"] == cache
