"""Runs as Ray tasks on a real local Ray: a failed run does not take the others down."""

import json

import pytest

from trainer.config import load_config

TINY = ["data.name=synthetic", "data.imbalance_factor=20", "data.max_per_class=60", "data.test_per_class=10",
        "model.arch=resnet8", "stage1.optim.epochs=1", "stage1.optim.warmup_epochs=0", "stage2.optim.epochs=1",
        "stage1.optim.batch_size=64"]


def test_a_failed_run_does_not_fail_the_run_waiting_for_its_stage1(ray_local, tmp_path):
    """tau_norm without a validation split fails in stage II, after publishing its stage I; the LWS run that waits
    for it still runs (from that stage I), and the error names only the failed run."""
    from trainer.workers import RunsFailedError, run_pipelines

    cache = tmp_path / "cache"
    failing, waiting = (load_config(None, [*TINY, f"method={method}", f"out_dir={tmp_path / method}",
                                           f"stage1_cache={cache}"]) for method in ("tau_norm", "lws"))
    with pytest.raises(RunsFailedError) as raised:
        run_pipelines([failing, waiting])
    message = str(raised.value)
    assert "1 of 2 runs failed" in message and str(tmp_path / "tau_norm") in message and "validation split" in message
    assert str(tmp_path / "lws") not in message
    report = json.loads((tmp_path / "lws" / "metrics.json").read_text())
    assert report["stage1_reused"] == str(next(cache.glob("stage1-*.pt")))
    assert set(report["stages"]) == {"I", "II"}  # ran to the end
