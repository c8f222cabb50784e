"""Runs packed into one process (trainer/packing.py) give what they give alone; a failure or a kill stays contained."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.packing import failures, run_packed
from trainer.stages import run_pipeline

# Smaller than test_pipeline's TINY: two runs train side by side on two slow cores.
TINY = ["data.name=synthetic", "data.imbalance_factor=20", "data.max_per_class=60", "data.test_per_class=10",
        "model.arch=resnet8", "stage1.optim.epochs=2", "stage1.optim.warmup_epochs=0", "stage1.moco.queue_size=64",
        "stage2.optim.epochs=1", "stage3.optim.epochs=1", "stage3.optim.warmup_epochs=0", "stage4.optim.epochs=1",
        "stage1.optim.batch_size=64", "stage3.optim.batch_size=64", "stage2.optim.batch_size=64",
        "stage4.optim.batch_size=64"]


def configs(root: Path, *extra: str):
    """An SSD run with MoCo (weight 1) and an LWS run (stage I, then a re-balanced head), folders under `root`."""
    return [load_config(None, [*TINY, "method=ssd", "stage1.moco.weight=1.0", f"out_dir={root / 'ssd'}", *extra]),
            load_config(None, [*TINY, "method=lws", "seed=1", f"out_dir={root / 'lws'}", *extra])]


def numbers(run: Path) -> dict:
    """metrics.json without what names the device (the same here) — every accuracy, per class and per stage."""
    report = json.loads((run / "metrics.json").read_text())
    report.pop("device")
    return report


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(a: Path, b: Path, exact: bool = True) -> None:
    assert numbers(a) == numbers(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        same = torch.equal(wa[key], wb[key]) if exact else torch.allclose(wa[key], wb[key], rtol=1e-3, atol=1e-4)
        assert same, f"{a.name}: {key} differs packed vs alone"


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The two runs, each trained alone in this process: what packing must reproduce."""
    root = tmp_path_factory.mktemp("alone")
    torch.set_num_threads(1)  # bit-identity needs the same intra-op thread count as the pack's (threads=1)
    for cfg in configs(root):
        run_pipeline(cfg)
    return root


def test_two_runs_packed_equal_the_same_runs_alone(alone, tmp_path):
    results = run_packed(configs(tmp_path), runs_at_once=2, threads=1)
    assert failures(results) == []
    assert [r["method"] for r in results] == ["ssd", "lws"]
    for name in ("ssd", "lws"):
        assert_same_run(alone / name, tmp_path / name)


def test_a_failing_run_leaves_the_other_finishing(alone, tmp_path):
    good = configs(tmp_path)[0]
    # tau_norm without stage2.tau and without a validation split raises in stage II, once its stage I has trained:
    # a failure in the middle of training, while the SSD run is still going.
    bad = load_config(None, [*TINY, "method=tau_norm", f"out_dir={tmp_path / 'tau'}"])
    results = run_packed([bad, good], runs_at_once=2, threads=1)
    assert "ValueError" in results[0]["failed"] and "validation split" in results[0]["failed"]
    assert failures(results) == [f"{tmp_path / 'tau'}: {results[0]['failed']}"]
    assert results[1]["method"] == "ssd"
    assert_same_run(alone / "ssd", tmp_path / "ssd")  # a neighbour's failure does not touch a run either


def _packed_process(root: Path) -> subprocess.Popen:
    """The two runs packed in a fresh process: run_packed, which `ltd reproduce --no-ray --runs-per-gpu 2` calls,
    on the configs as JSON (validated again there), progress as plain lines, the test's thread count."""
    spec = root / "configs.json"
    if not spec.exists():
        spec.write_text(json.dumps([cfg.model_dump(mode="json") for cfg in configs(root)]))
    code = ("import json, logging, sys\nfrom trainer.config import RunConfig\n"
            "from trainer.packing import failures, run_packed\n"
            "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
            "cfgs = [RunConfig.model_validate(c) for c in json.load(open(sys.argv[1]))]\n"
            "print(json.dumps(failures(run_packed(cfgs, 2, threads=int(sys.argv[2])))), flush=True)\n")
    env = {**os.environ, "LTD_PROGRESS": "lines"}
    return subprocess.Popen([sys.executable, "-c", code, str(spec), str(torch.get_num_threads())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[2])


@pytest.mark.slow
def test_a_killed_pack_resumes_every_run_from_its_checkpoints(alone, tmp_path):
    """SIGKILL the packed process once both runs have a stage-I checkpoint; the re-run resumes both and ends with
    what uninterrupted runs give (the resume is exact: model, optimizer, MoCo queue and sampler state are saved)."""
    first = _packed_process(tmp_path)
    marks = [tmp_path / "ssd" / "stage1" / "checkpoint.pt", tmp_path / "lws" / "stage1" / "checkpoint.pt"]
    deadline = time.time() + 120
    while not all(m.exists() for m in marks) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert all(m.exists() for m in marks), "both runs wrote a stage-I checkpoint before the kill"
    assert not (tmp_path / "ssd" / "metrics.json").exists(), "killed before the SSD run finished"
    epochs = {m.parent.parent.name: torch.load(m, weights_only=True)["epoch"] for m in marks}

    second = _packed_process(tmp_path)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == []
    for name in ("ssd", "lws"):
        # Stage I resumes after the saved epoch (or finds it finished and trains none), and says so in its log.
        if epochs[name] + 1 < 2:
            assert f"[{name}] I: resuming at epoch {epochs[name] + 2}/2" in err
        assert_same_run(alone / name, tmp_path / name)
    assert "ssd stage III" in err and "lws stage II" in err, "progress lines name their run"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_runs_on_one_gpu_match_the_same_runs_alone(tmp_path):
    """On a GPU: each run on its own stream, graphs on; packed equals alone within float tolerance (kernels may pick
    other algorithms when they overlap), and every accuracy within one test image."""
    extra = ("device=cuda", "cuda_graph=true")
    for cfg in configs(tmp_path / "alone", *extra):
        run_pipeline(cfg)
    results = run_packed(configs(tmp_path / "packed", *extra), runs_at_once=2, threads=1)
    assert failures(results) == []
    for name in ("ssd", "lws"):
        a, b = numbers(tmp_path / "alone" / name), numbers(tmp_path / "packed" / name)
        images = sum(1 for _ in a["final"]["per_class"]) * 10  # test_per_class=10
        assert abs(a["final"]["overall"] - b["final"]["overall"]) <= 100 / images + 1e-9
        wa, wb = weights(tmp_path / "alone" / name), weights(tmp_path / "packed" / name)
        for key in wa:
            if wa[key].is_floating_point():
                assert torch.allclose(wa[key].float(), wb[key].float(), rtol=1e-2, atol=1e-3), key


def test_cli_runs_per_gpu_without_ray_trains_seeds_at_once_and_names_a_failure(tmp_path):
    """`--no-ray --runs-per-gpu 2` packs the seeds into this process and summarises them; failed runs exit 1 with
    each named, as the sequential path does (tau_norm without a validation split fails in stage II)."""
    from typer.testing import CliRunner

    from service.cli import app

    cli = [*TINY, "stage1.optim.epochs=1"]
    runner = CliRunner()
    result = runner.invoke(app, ["multiseed", "--no-ray", "--runs-per-gpu", "2", "--seeds", "0,1", *cli, "method=ce",
                                 f"out_dir={tmp_path / 'ce'}"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ce" / "summary.json").read_text())["seeds"] == [0, 1]
    result = runner.invoke(app, ["multiseed", "--no-ray", "--runs-per-gpu", "2", "--seeds", "0,1", *cli,
                                 "method=tau_norm", f"out_dir={tmp_path / 'tau'}"])
    assert result.exit_code == 1 and "2 of 2 runs failed" in result.output, result.output
