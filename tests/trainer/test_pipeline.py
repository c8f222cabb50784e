"""End to end on real data: every method trains through the one engine; SSD beats plain CE on the tail."""

import json

import pytest
import torch

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


@pytest.mark.parametrize("mode", ["views", "online", "official"])
def test_ssd_soft_label_modes(mode, tiny_lt, tmp_path):
    cfg = load_config(None, [*TINY, f"stage3.soft_labels={mode}", "stage3.views_per_image=3", f"out_dir={tmp_path}"])
    report = run_pipeline(cfg, data=tiny_lt)
    assert report["soft_labels"]["mode"] == mode
    assert report["soft_labels"]["source"] == {"views": "InMemoryViewLabels"}.get(mode, "OnlineTargets")
    assert "IV" in report["stages"]
    content = report["soft_labels"]["content"]  # views are stored rows to summarise; a live teacher has none
    assert (content is None) == (mode != "views")
    if content:
        assert content["overall"]["rows"] == 3 * len(tiny_lt.train)


def test_clean_run_reports_what_its_soft_labels_carry(tiny_lt, tmp_path):
    from store.content import label_content
    from trainer.export import load_model
    from trainer.context import prepare
    from trainer.stages import teacher_logits

    cfg = load_config(None, [*TINY, f"out_dir={tmp_path}"])
    report = run_pipeline(cfg, data=tiny_lt)
    teacher, _ = load_model(tmp_path / "teacher.pt")
    probs = torch.softmax(teacher_logits(prepare(cfg, tiny_lt), teacher) / cfg.stage3.temperature, dim=1)
    expected = label_content(probs.numpy(), tiny_lt.train.labels.numpy(), tiny_lt.class_names)
    assert report["soft_labels"]["content"]["overall"] == pytest.approx(expected["overall"], abs=2e-4)
    assert json.loads((tmp_path / "metrics.json").read_text())["soft_labels"]["content"]["groups"].keys() == {
        "many", "medium", "few"}


def test_saved_models_rebuild_and_predict_the_same(tiny_lt, tmp_path):
    from trainer.export import load_model
    from trainer.context import evaluate, prepare

    cfg = load_config(None, [*TINY, f"out_dir={tmp_path}"])
    report = run_pipeline(cfg, data=tiny_lt)
    ctx = prepare(cfg, tiny_lt)
    student, spec = load_model(tmp_path / "model.pt")
    assert (spec.role, spec.head, spec.fingerprint) == ("student", "lws", tiny_lt.fingerprint)
    assert evaluate(ctx, student)["per_class"] == report["final"]["per_class"]
    teacher, spec = load_model(tmp_path / "teacher.pt")
    assert spec.role == "teacher" and evaluate(ctx, teacher)["overall"] == report["stages"]["II"]["overall"]


def test_validation_split_scores_every_stage_on_held_out_images(tmp_path):
    """With data.val_per_class, each stage also reports its held-out accuracy: the numbers a user may choose by."""
    from trainer.datasets import load_dataset
    from trainer.export import load_model
    from trainer.context import evaluate, prepare

    cfg = load_config(None, [*TINY, "data.val_per_class=5", f"out_dir={tmp_path}"])
    data = load_dataset(cfg.data)
    report = run_pipeline(cfg, data=data)
    assert set(report["val"]) == set(report["stages"]) == {"I", "II", "III", "III_hard_head", "IV"}
    ctx = prepare(cfg, data)
    for name, stage in (("teacher.pt", "II"), ("model.pt", "IV")):
        model, _ = load_model(tmp_path / name)
        held_out = evaluate(ctx, model, split=data.val)
        assert report["val"][stage] == {g: held_out[g] for g in ("overall", "many", "medium", "few")}
        assert evaluate(ctx, model)["overall"] == report["stages"][stage]["overall"], "stages stay test-set scores"
    assert report["val"]["II"] != {g: report["stages"]["II"][g] for g in ("overall", "many", "medium", "few")}


@pytest.mark.parametrize("head", ["hard", "soft"])
def test_stage4_rebalances_the_configured_student_head(head, tiny_lt, tmp_path):
    """The served model is the distilled backbone + LWS over the chosen head's frozen weights."""
    import torch

    from trainer.export import load_model

    cfg = load_config(None, [*TINY, f"stage4.head={head}", f"out_dir={tmp_path}"])
    run_pipeline(cfg, data=tiny_lt)
    student = torch.load(tmp_path / "stage3" / "checkpoint.pt", weights_only=True)["model"]
    final, spec = load_model(tmp_path / "model.pt")
    assert spec.head == "lws"
    assert torch.equal(final.head.weight, student[f"{head}_head.weight"])
    assert torch.equal(final.backbone.conv1.weight, student["backbone.conv1.weight"])
    assert final.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # loaded for fast CPU inference


def test_stage3_is_evaluated_in_eval_mode(tiny_lt, tmp_path):
    """Regression: a train-mode student would normalise class-sorted test batches with their own statistics."""
    from trainer.export import load_model
    from trainer.models import Classifier
    from trainer.context import evaluate, prepare

    cfg = load_config(None, [*TINY, "stage4.enabled=false", f"out_dir={tmp_path}"])
    report = run_pipeline(cfg, data=tiny_lt)
    student, _ = load_model(tmp_path / "model.pt")
    assert isinstance(student, Classifier) and not student.training
    assert evaluate(prepare(cfg, tiny_lt), student)["per_class"] == report["stages"]["III"]["per_class"]


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


def test_list_file_dataset_trains_through_the_dataloader_path(tmp_path):
    """ImageNet-LT-style lists: real JPEG files decoded by DataLoader workers, a torchvision ResNet, SSD end to end."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    lines = []
    for i, label in enumerate([0] * 12 + [1] * 6 + [2] * 3):
        path = tmp_path / "img" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        lines.append(f"img/{i}.jpg {label}")
    (tmp_path / "train.txt").write_text("\n".join(lines))
    (tmp_path / "test.txt").write_text("\n".join(lines[::3]))
    cfg = load_config(None, [
        *TINY, "data.name=list", f"data.root={tmp_path}", f"data.train_list={tmp_path / 'train.txt'}",
        f"data.test_list={tmp_path / 'test.txt'}", "data.image_size=32", "data.num_workers=1", "model.arch=resnet10",
        "data.max_per_class=null", "data.test_per_class=null", f"out_dir={tmp_path / 'run'}",
    ])
    report = run_pipeline(cfg)
    assert report["dataset"] == "list" and report["class_counts"] == [12, 6, 3]
    assert set(report["stages"]) == {"I", "II", "III", "III_hard_head", "IV"}


def test_runs_with_the_same_stage1_recipe_train_it_once(tiny_lt, tmp_path):
    """With one stage1_cache, CE trains stage I and publishes it; LWS and SSD without MoCo start from it and train
    no stage-I epoch, and LWS ends exactly where an LWS run with its own stage I ends. SSD with MoCo and focal loss
    train their own."""
    cache = tmp_path / "cache"

    def run(name, *overrides, shared=True):
        extra = [f"stage1_cache={cache}"] if shared else []
        cfg = load_config(None, [*TINY, *overrides, f"out_dir={tmp_path / name}", *extra])
        return run_pipeline(cfg, data=tiny_lt)

    ce = run("ce", "method=ce")
    assert "stage1_reused" not in ce and len(list(cache.glob("stage1-*.pt"))) == 1
    entry = next(cache.glob("stage1-*.pt"))
    lws, no_ssl = run("lws", "method=lws"), run("no_ssl", "method=ssd", "stage1.moco.weight=0")
    for report, name in ((lws, "lws"), (no_ssl, "no_ssl")):
        assert report["stage1_reused"] == str(entry) and report["stages"]["I"] == ce["stages"]["I"]
        assert (tmp_path / name / "stage1" / "checkpoint.pt").read_bytes() == entry.read_bytes()  # no epoch trained
    alone = run("lws_alone", "method=lws", shared=False)
    assert alone["final"] == lws["final"] and alone["stages"]["II"] == lws["stages"]["II"]
    for other in (["method=ssd"], ["method=focal"]):
        assert "stage1_reused" not in run("_".join(other), *other)
    assert len(list(cache.glob("stage1-*.pt"))) == 3 and not list(cache.glob("*.part"))


def test_runs_of_one_recipe_started_at_once_train_stage1_once(tiny_lt, tmp_path, caplog, claim_holder):
    """A run whose stage I another live run is training waits for it, then starts from what it published; a run
    whose trainer was killed (SIGKILL, nothing published) trains the stage I itself."""
    import threading
    import time

    from trainer.stages import stage1_claim

    cache = tmp_path / "cache"

    def start(name: str) -> tuple[threading.Thread, dict]:
        cfg = load_config(None, [*TINY, "method=lws", f"out_dir={tmp_path / name}", f"stage1_cache={cache}"])
        result: dict = {}

        def target():
            try:
                result["report"] = run_pipeline(cfg, data=tiny_lt)
            except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
                result["error"] = error

        thread = threading.Thread(target=target)
        thread.start()
        return thread, result

    def waits(count: int) -> None:
        deadline = time.monotonic() + 120
        while sum("waiting for another run" in r.getMessage() for r in caplog.records) < count:
            assert time.monotonic() < deadline, "the run never waited for the claim"
            time.sleep(0.1)

    caplog.set_level("INFO", logger="trainer.stages")
    ce = run_pipeline(load_config(None, [*TINY, "method=ce", f"out_dir={tmp_path / 'ce'}", f"stage1_cache={cache}"]),
                      data=tiny_lt)
    entry = next(cache.glob("stage1-*.pt"))
    finished = entry.read_bytes()
    entry.unlink()

    with stage1_claim(entry):  # a live run is training this recipe's stage I
        thread, result = start("waited")
        waits(1)
        assert not (tmp_path / "waited" / "stage1" / "checkpoint.pt").exists()  # waiting, not training
        entry.write_bytes(finished)  # it publishes, then ends
    thread.join(timeout=300)
    assert "error" not in result, result
    assert result["report"]["stage1_reused"] == str(entry) and result["report"]["stages"]["I"] == ce["stages"]["I"]
    assert (tmp_path / "waited" / "stage1" / "checkpoint.pt").read_bytes() == finished  # no epoch of its own

    entry.unlink()
    holder = claim_holder(entry)
    thread, result = start("after_crash")
    waits(2)
    holder.kill()  # it dies without publishing
    thread.join(timeout=300)
    assert "error" not in result, result
    assert "stage1_reused" not in result["report"]  # trained its own stage I...
    assert entry.exists() and not list(cache.glob("*.part"))  # ...and published it


def test_stage1_claim_on_a_filesystem_without_locks_goes_on_unlocked(tmp_path, monkeypatch, caplog):
    """Where flock is not supported (ENOLCK), a run is not stopped: it warns and trains unlocked."""
    import errno
    import fcntl

    from trainer.stages import stage1_claim

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    entered = False
    with stage1_claim(tmp_path / "cache" / "stage1-0123456789abcdef.pt"):
        entered = True
    assert entered and "cannot lock" in caplog.text
