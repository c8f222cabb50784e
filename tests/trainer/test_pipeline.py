"""End to end on real data: every method trains through the one engine; SSD beats plain CE on the tail."""

import json

import pytest

from trainer.config import load_config
from trainer.stages import run_pipeline

TINY = ["data.name=synthetic", "data.imbalance_factor=20", "data.max_per_class=120", "data.test_per_class=40",
        "model.arch=resnet8", "stage1.optim.epochs=2", "stage1.optim.warmup_epochs=0", "stage1.moco.queue_size=128",
        "stage2.optim.epochs=1", "stage3.optim.epochs=2", "stage3.optim.warmup_epochs=0", "stage4.optim.epochs=1",
        "stage1.optim.batch_size=64", "stage3.optim.batch_size=64"]


@pytest.mark.parametrize("method", ["ce", "focal", "cb", "ldam_drw", "balanced_softmax", "logit_adjust",
                                    "crt", "lws", "tau_norm", "ncm", "ssd"])
def test_every_method_runs_and_reports(method, tiny_lt, tmp_path):
    extra = ["data.val_per_class=5"] if method == "tau_norm" else []
    cfg = load_config(None, [*TINY, f"method={method}", f"out_dir={tmp_path}", *extra])
    data = tiny_lt if not extra else None
    report = run_pipeline(cfg, data=data)
    final = report["final"]
    assert 0 <= final["overall"] <= 100 and len(final["per_class"]) == 10
    assert json.loads((tmp_path / "metrics.json").read_text())["final"]["overall"] == final["overall"]
    for name in ("model.pt", "config.yaml", "per_class_accuracy.png", "label_distributions.png"):
        assert (tmp_path / name).stat().st_size > 0
    stages = {"joint": {"I"}, "decoupled": {"I", "II"}, "ssd": {"I", "II", "III", "III_hard_head", "IV"}}
    assert set(report["stages"]) == stages[cfg.pipeline]


def test_rerun_of_finished_run_trains_nothing_and_gives_same_numbers(tiny_lt, tmp_path):
    cfg = load_config(None, [*TINY, "method=lws", f"out_dir={tmp_path}"])
    first = run_pipeline(cfg, data=tiny_lt)
    second = run_pipeline(cfg, data=tiny_lt)
    assert first["final"] == second["final"]


@pytest.mark.slow
def test_ssd_beats_ce_on_few_shot_classes(tmp_path):
    """The embedded demo's recipe (Fashion-MNIST-LT where installed), shortened to fit CI."""
    shorter = ["stage1.optim.epochs=15", "stage3.optim.epochs=15", "stage1.optim.warmup_epochs=1",
               "stage3.optim.warmup_epochs=1"]
    reports = {}
    for method in ("ce", "ssd"):
        cfg = load_config(f"configs/embedded/{method}.yaml", [*shorter, f"out_dir={tmp_path / method}"])
        reports[method] = run_pipeline(cfg)["final"]
    assert reports["ssd"]["few"] > reports["ce"]["few"] + 5
    assert reports["ssd"]["overall"] > reports["ce"]["overall"]
