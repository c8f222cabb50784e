"""End to end on the embedded dataset (Fashion-MNIST-LT where installed): EQL and every multi-expert method train
through the one engine, report what their papers report, and their saved model rebuilds, predicts the same, and
becomes a labelset like any teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.config import DataConfig, load_config
from trainer.export import load_model
from trainer.context import evaluate, prepare
from trainer.stages import run_pipeline, teacher_logits

TINY = ["data.name=embedded", "data.imbalance_factor=50", "data.max_per_class=150", "data.test_per_class=30",
        "model.arch=resnet8", "stage1.optim.epochs=2", "stage1.optim.warmup_epochs=0", "stage1.optim.batch_size=64",
        "stage3.optim.epochs=2", "stage3.optim.warmup_epochs=0", "stage3.optim.batch_size=64",
        "experts.router_optim.epochs=1", "experts.router_optim.batch_size=64"]


@pytest.fixture(scope="module")
def embedded_tiny():
    from trainer.datasets import load_dataset

    return load_dataset(DataConfig(name="embedded", imbalance_factor=50, max_per_class=150, test_per_class=30))


@pytest.mark.parametrize("method", ["eql", "bbn", "ride", "lfme", "experts_ta"])
def test_method_trains_reports_and_its_model_file_rebuilds(method, embedded_tiny, tmp_path):
    cfg = load_config(None, [*TINY, f"method={method}", f"out_dir={tmp_path}"])
    report = run_pipeline(cfg, data=embedded_tiny)
    final = report["final"]
    assert 0 <= final["overall"] <= 100 and len(final["per_class"]) == 10
    assert json.loads((tmp_path / "metrics.json").read_text())["final"]["overall"] == final["overall"]
    stages = {"eql": {"I"}, "bbn": {"I"}, "ride": {"I", "router"}, "lfme": {"III"}, "experts_ta": {"I"}}[method]
    assert set(report["stages"]) == stages
    # the saved file rebuilds into images -> logits and gives exactly the reported per-class accuracy
    model, spec = load_model(tmp_path / "model.pt")
    assert spec.method == method and not model.training
    assert evaluate(prepare(cfg, embedded_tiny), model)["per_class"] == final["per_class"]
    if method == "ride":
        assert spec.head == "experts" and spec.head_args["router"] is not None
        assert 1.0 <= report["stages"]["router"]["experts_used"] <= 3.0
        assert report["stages"]["I"]["experts_used"] == 3.0 and len(report["experts"]["each"]) == 3
    if method == "experts_ta":
        each, counts = report["experts"]["each"], report["experts"]["disagreement"]
        assert len(each) == 3 and len(counts) == 3 and spec.head_args["n_experts"] == 3
        assert len({e["overall"] for e in each}) > 1  # own init and sampling order: different experts
        assert all(c["expert_right_average_wrong"] >= 0 for c in counts)
    if method == "bbn":
        assert set(report["branches"]) == {"conventional", "re_balancing"} and spec.head_args["kind"] == "bbn"
    if method == "lfme":
        assert spec.head == "linear"  # the student is a plain classifier
        weights = report["experts"]["final_expert_weights"]
        assert len(weights) == len(report["experts"]["groups"]) and all(0 <= w <= 1 for w in weights)
        assert sorted(c for g in report["experts"]["groups"] for c in g) == list(range(10))


def test_rerun_of_a_finished_multi_expert_run_trains_nothing(embedded_tiny, tmp_path):
    cfg = load_config(None, [*TINY, "method=ride", f"out_dir={tmp_path}"])
    first = run_pipeline(cfg, data=embedded_tiny)
    second = run_pipeline(cfg, data=embedded_tiny)
    assert first["final"] == second["final"] and first["stages"]["router"] == second["stages"]["router"]


def test_experts_ta_refuses_shared_layers():
    with pytest.raises(ValueError, match="cannot share layers"):
        load_config(None, ["method=experts_ta", "experts.share=stem"])


@pytest.mark.parametrize("method", ["ride", "experts_ta"])
def test_multi_expert_teacher_becomes_a_labelset_and_serves(method, embedded_tiny, tmp_path, ray_local):
    from PIL import Image

    from service.inference import _check_model_file, classify, to_model_input
    from store import LabelsetReader
    from trainer.workers import generate_labelset

    cfg = load_config(None, [*TINY, f"method={method}", f"out_dir={tmp_path / 'run'}"])
    run_pipeline(cfg, data=embedded_tiny)
    teacher_path = tmp_path / "run" / "model.pt"
    prov = generate_labelset(teacher_path, cfg, tmp_path / "store", f"{method}-t2", num_workers=1)
    assert prov.num_images == len(embedded_tiny.train)
    teacher, spec = load_model(teacher_path)
    expected = torch.softmax(teacher_logits(prepare(cfg, embedded_tiny), teacher) / 2.0, dim=1).numpy()
    reader = LabelsetReader(tmp_path / "store", f"{method}-t2")
    np.testing.assert_allclose(reader.soft_labels(np.arange(len(embedded_tiny.train))), expected, atol=5e-3)
    # the service's upload check and predict path accept it
    _check_model_file(teacher_path)
    pixels = embedded_tiny.test.images[0].permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    probs, classes = classify(teacher, spec, [to_model_input(image, spec)], k=3)
    assert classes.shape == (1, 3) and float(probs.sum()) <= 1.0 + 1e-5
