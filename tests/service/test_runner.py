"""Which jobs the runner holds back for a shared stage I: the recipe key of a job, from its planned payload."""

import pytest

from service.jobs import JobRecord
from service.runner import stage1_recipe_key
from trainer.config import RunConfig

DATA = {"name": "synthetic", "imbalance_factor": 20, "max_per_class": 60}


def job(kind="train", cache="/runs/stage1_cache", **config) -> JobRecord:
    cfg = RunConfig.model_validate({"data": DATA, **config}).model_dump(mode="json")
    payload = {"run_dir": "/runs/x", "config": {**cfg, "stage1_cache": cache}}
    return JobRecord(id="x", kind=kind, state="queued", request={}, payload=payload, attempt=1, created=0.0,
                     started=None, finished=None, error=None, result=None)


def test_jobs_that_train_the_same_stage1_share_a_key():
    ce = stage1_recipe_key(job(method="ce"))
    assert ce is not None
    assert stage1_recipe_key(job(method="lws")) == stage1_recipe_key(job(method="ncm")) == ce  # decoupled: CE's
    assert stage1_recipe_key(job(method="ce", stage2={"optim": {"epochs": 3}})) == ce  # stage II is not stage I
    assert stage1_recipe_key(job(method="ce", seed=1)) != ce
    assert stage1_recipe_key(job(method="ce", stage1={"optim": {"epochs": 30}})) != ce
    assert stage1_recipe_key(job(method="ssd")) not in (None, ce)  # SSD's stage I adds MoCo


@pytest.mark.parametrize("kind, cache, config", [
    ("labels", "/runs/stage1_cache", {"method": "ssd"}),
    ("distill", "/runs/stage1_cache", {"method": "ssd"}),
    ("train", None, {"method": "ce"}),  # LTD_SHARE_STAGE1=false
    ("train", "/runs/stage1_cache", {"method": "ride"}),  # expert methods train no shared stage I
    ("train", "/runs/stage1_cache", {"method": "ce", "distributed": {"num_workers": 2}}),  # ranks report nothing here
])
def test_jobs_that_share_no_stage1_have_no_key(kind, cache, config):
    assert stage1_recipe_key(job(kind, cache, **config)) is None
