"""Teacher -> labelset on Ray workers -> student from the store; a killed worker loses nothing and resumes exactly."""

import numpy as np
import pytest
import torch
import zarr

from store import LabelsetNotFoundError, LabelsetReader, LabelsetSpec, LabelsetWriter, list_staging
from trainer.config import load_config
from trainer.export import load_model
from trainer.labels import LabelShardWriter
from trainer.context import prepare
from trainer.stages import run_pipeline, teacher_logits
from trainer.workers import WorkerDiedError, generate_labelset

TINY = ["data.name=synthetic", "data.imbalance_factor=20", "data.max_per_class=120", "data.test_per_class=40",
        "model.arch=resnet8", "stage1.optim.epochs=2", "stage1.optim.warmup_epochs=0", "stage1.moco.queue_size=128",
        "stage2.optim.epochs=1", "stage3.optim.epochs=2", "stage3.optim.warmup_epochs=0", "stage4.optim.epochs=1",
        "stage1.optim.batch_size=64", "stage3.optim.batch_size=64"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_lt):
    """A real SSD run on the tiny dataset: its teacher.pt is the teacher of every labelset here."""
    out = tmp_path_factory.mktemp("teacher_run")
    cfg = load_config(None, [*TINY, f"out_dir={out}"])
    run_pipeline(cfg, data=tiny_lt)
    return cfg, out / "teacher.pt"


def test_labelset_holds_the_teachers_tempered_outputs(teacher_run, tiny_lt, tmp_path, ray_local):
    cfg, teacher_path = teacher_run
    prov = generate_labelset(teacher_path, cfg, tmp_path, "tiny-t2", num_workers=2, chunk_rows=64)
    assert prov.num_images == len(tiny_lt.train) and prov.mode == "clean" and prov.temperature == 2.0
    teacher, _ = load_model(teacher_path)
    expected = torch.softmax(teacher_logits(prepare(cfg, tiny_lt), teacher) / 2.0, dim=1).numpy()
    reader = LabelsetReader(tmp_path, "tiny-t2")
    np.testing.assert_allclose(reader.soft_labels(np.arange(len(tiny_lt.train))), expected, atol=5e-3)
    np.testing.assert_array_equal(reader.hard_labels(np.arange(len(tiny_lt.train))), tiny_lt.train.labels.numpy())


def test_killed_worker_then_rerun_equals_an_unbroken_run(teacher_run, tmp_path, ray_local):
    cfg, teacher_path = teacher_run
    generate_labelset(teacher_path, cfg, tmp_path / "a", "run", num_workers=1, chunk_rows=32)
    with pytest.raises(WorkerDiedError, match="Re-run"):
        generate_labelset(teacher_path, cfg, tmp_path / "b", "run", num_workers=2, chunk_rows=32,
                          exit_after_chunks=1)  # worker 0 dies (os._exit) right after its first chunk
    with pytest.raises(LabelsetNotFoundError):
        LabelsetReader(tmp_path / "b", "run")  # nothing half-visible
    assert [s.labelset_id for s in list_staging(tmp_path / "b")] == ["run"]
    generate_labelset(teacher_path, cfg, tmp_path / "b", "run", num_workers=2, chunk_rows=32)
    a, b = (zarr.open_group(str(tmp_path / x / "run"), mode="r") for x in ("a", "b"))
    for name in ("logits", "soft_labels", "hard_labels"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_views_labelset_replays_and_trains_a_student(teacher_run, tiny_lt, tmp_path, ray_local):
    cfg, teacher_path = teacher_run
    generate_labelset(teacher_path, cfg, tmp_path, "views", mode="views", views=3, num_workers=1)
    reader = LabelsetReader(tmp_path, "views")
    params = reader.view_params(np.arange(5))
    assert params.shape == (5, 3, 5) and np.all(params[..., 2] - params[..., 0] == 32)
    student_cfg = load_config(None, [*TINY, f"out_dir={tmp_path / 'student'}"])
    report = run_pipeline(student_cfg, source=reader, data=tiny_lt)
    content = report["soft_labels"].pop("content")  # the labelset's own summary, from its provenance
    assert report["soft_labels"] == {"mode": "views", "source": "LabelsetReader", "temperature": 2.0,
                                     "labelset_id": "views"}
    assert content["overall"]["rows"] > 0
    assert set(report["stages"]) == {"III", "III_hard_head", "IV"}


def test_in_process_writer_then_student_and_a_mismatched_dataset(teacher_run, tiny_lt, tmp_path):
    """The worker class runs without Ray too; a student refuses a labelset made for other data."""
    cfg, teacher_path = teacher_run
    spec = LabelsetSpec(teacher_checkpoint_hash="x", dataset_name="synthetic", dataset_fingerprint=tiny_lt.fingerprint,
                        num_images=len(tiny_lt.train), num_classes=10, temperature=2.0, chunk_rows=100)
    writer = LabelsetWriter.create(tmp_path, "inproc", spec)
    shard = LabelShardWriter(str(teacher_path), cfg.data.model_dump(mode="json"), str(tmp_path), "inproc",
                     cfg.augment.model_dump())
    for chunk in writer.missing_chunks():
        shard.write(chunk)
    writer.publish()
    reader = LabelsetReader(tmp_path, "inproc")
    report = run_pipeline(load_config(None, [*TINY, f"out_dir={tmp_path / 's'}"]), source=reader, data=tiny_lt)
    assert report["soft_labels"]["labelset_id"] == "inproc" and report["final"]["overall"] > 0
    other = load_config(None, [*TINY, "data.lt_seed=5", f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(ValueError, match="made for dataset"):
        run_pipeline(other, source=reader)


def test_official_online_teacher_uses_batch_statistics_on_a_private_copy():
    """The reference code's regime: BatchNorm of the teacher in train mode, without touching the saved teacher."""
    from types import SimpleNamespace

    from trainer.soft_targets import OnlineTargets

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                  torch.nn.LazyLinear(5))
    teacher(torch.randn(2, 3, 8, 8))
    teacher.eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = SimpleNamespace(images=torch.randn(16, 3, 8, 8) * 3 + 1)
    official, online = OnlineTargets(teacher, 2.0, batchnorm="train"), OnlineTargets(teacher, 2.0)
    got = official(batch)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    assert not torch.allclose(got, online(batch), atol=1e-3)  # running statistics and batch statistics differ
    logits = teacher[3](torch.nn.functional.batch_norm(teacher[0](batch.images), None, None, teacher[1].weight,
                                                       teacher[1].bias, training=True).flatten(1))
    torch.testing.assert_close(got, torch.softmax(logits.detach() / 2.0, 1), atol=1e-5, rtol=1e-5)
    assert (official.mode, online.mode) == ("official", "online")
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # the saved teacher's running stats never drift
    assert not teacher.training
    with pytest.raises(ValueError, match="batchnorm"):
        OnlineTargets(teacher, 2.0, batchnorm="frozen")
