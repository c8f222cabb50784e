"""The `ltd` command line: subcommands are listed, bad configs exit 2 with the fix, training runs as Ray work."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()
TINY = ["data.name=synthetic", "data.imbalance_factor=20", "data.max_per_class=60", "data.test_per_class=20",
        "model.arch=resnet8", "stage1.optim.epochs=1", "stage1.optim.warmup_epochs=0", "stage2.optim.epochs=1"]


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "multiseed", "reproduce", "demo"):
        assert command in out.stdout


def test_bad_config_exits_2_and_says_why(tmp_path):
    result = runner.invoke(app, ["train", "--no-ray", "stage1.optim.epochs=3"])
    assert result.exit_code == 2
    assert "lower warmup_epochs" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", [["--ray"], ["--no-ray"]])
def test_a_run_that_fails_exits_1_and_names_it(ray_local, tmp_path, where):
    """tau_norm without a validation split passes config checks but fails in stage II: exit 1, run and reason named,
    on Ray and in process alike."""
    result = runner.invoke(app, ["train", *where, *TINY, "method=tau_norm", f"out_dir={tmp_path / 'run'}"])
    assert result.exit_code == 1, result.output
    assert "1 of 1 runs failed" in result.output and str(tmp_path / "run") in result.output
    assert "validation split" in result.output


def test_unknown_table_exits_2():
    assert runner.invoke(app, ["reproduce", "imagenet_lt"]).exit_code == 2


def test_train_as_ray_work_writes_metrics(ray_local, tmp_path):
    result = runner.invoke(app, ["train", *TINY, "method=lws", f"out_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["method"] == "lws" and "II" in report["stages"]
    assert "overall" in result.output and str(tmp_path) in result.output


def test_multiseed_reports_mean_and_std(ray_local, tmp_path):
    result = runner.invoke(app, ["multiseed", *TINY, "method=ce", f"out_dir={tmp_path}", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    seeds = [json.loads((tmp_path / f"seed{s}" / "metrics.json").read_text())["final"]["overall"] for s in (0, 1)]
    assert summary["seeds"] == [0, 1]
    assert abs(summary["overall"] - sum(seeds) / 2) < 0.01


def test_reproduce_trains_a_shared_stage1_once_on_ray(ray_local, tmp_path):
    """`ltd reproduce` keeps a stage1_cache beside its runs: on Ray the LWS task waits for the CE task and starts
    from its stage I, so the table's CE row is LWS's stage I."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    result = runner.invoke(app, ["reproduce", "embedded", *TINY, "--methods", "ce,lws", "--out-root", str(runs),
                                 "--results-dir", str(results)])
    assert result.exit_code == 0, result.output
    ce, lws = (json.loads((runs / "embedded" / f"{m}_if100_s0" / "metrics.json").read_text()) for m in ("ce", "lws"))
    assert "stage1_reused" not in ce and lws["stage1_reused"].startswith(str(runs / "embedded" / "stage1_cache"))
    assert lws["ray_task"]["started"] >= ce["ray_task"]["ended"] and lws["stages"]["I"] == ce["stages"]["I"]
    rows = json.loads(next(results.glob("accuracy_embedded-*.json")).read_text())["rows"]
    assert [r["method"] for r in rows] == ["ce", "lws"]


def test_labels_show_delete_restore_purge(tmp_path):
    """show tells a teacher right on class 0 from one always wrong on class 1; delete is undone by restore."""
    import numpy as np

    from store import LabelsetSpec, LabelsetWriter

    labels = np.repeat([0, 1], [150, 30])
    logits = np.zeros((180, 2), dtype=np.float32)
    logits[:, 0] = 4.0  # every image is called class 0
    spec = LabelsetSpec(teacher_checkpoint_hash="sha256:t", dataset_name="synthetic_lt", dataset_fingerprint="fp",
                        num_images=180, num_classes=2, class_names=["head", "tail"], temperature=1.0)
    writer = LabelsetWriter.create(tmp_path, "show-me", spec)
    for chunk in range(writer.num_chunks):
        a, b = writer.chunk_bounds(chunk)
        writer.write_chunk(chunk, logits[a:b], labels[a:b])
    writer.publish()
    result = runner.invoke(app, ["labels", "show", "show-me", "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    content = json.loads(result.output)["content"]
    many, medium = content["groups"]["many"], content["groups"]["medium"]
    assert many["teacher_right"]["rows"] == 150 and many["all"]["argmax_differs"] == 0.0
    assert medium["teacher_wrong"]["rows"] == 30 and medium["all"]["argmax_differs"] == 1.0
    assert content["classes"][1]["class"] == "tail" and content["classes"][1]["off_label_mass"] > 0.98
    deleted = runner.invoke(app, ["labels", "delete", "show-me", "--store", str(tmp_path)])
    assert deleted.exit_code == 0 and "ltd labels restore show-me" in deleted.output
    assert runner.invoke(app, ["labels", "show", "show-me", "--store", str(tmp_path)]).exit_code == 1
    trash = runner.invoke(app, ["labels", "list", "--deleted", "--store", str(tmp_path)]).output
    assert json.loads(trash)["labelset_id"] == "show-me"
    assert runner.invoke(app, ["labels", "restore", "show-me", "--store", str(tmp_path)]).exit_code == 0
    assert json.loads(runner.invoke(app, ["labels", "show", "show-me", "--store", str(tmp_path)]).output)["content"]
    assert runner.invoke(app, ["labels", "restore", "show-me", "--store", str(tmp_path)]).exit_code == 1
    runner.invoke(app, ["labels", "delete", "show-me", "--store", str(tmp_path)])
    purged = runner.invoke(app, ["labels", "purge", "--all", "--store", str(tmp_path)])
    assert purged.exit_code == 0 and "erased 1" in purged.output
    assert runner.invoke(app, ["labels", "list", "--deleted", "--store", str(tmp_path)]).output == ""
