"""A real two-node Ray cluster on loopback: `ltd --address` trains on 2 Ray Train workers and generates labels there,
and the work runs on both nodes (node ids recorded from inside the workers)."""

import json
import os
import subprocess
import sys

import pytest

TINY = ["data.name=synthetic", "data.imbalance_factor=20", "data.max_per_class=120", "data.test_per_class=40",
        "model.arch=resnet8", "stage1.optim.epochs=2", "stage1.optim.warmup_epochs=0", "stage1.moco.queue_size=128",
        "stage2.optim.epochs=1", "stage3.optim.epochs=2", "stage3.optim.warmup_epochs=0", "stage4.optim.epochs=1",
        "stage1.optim.batch_size=32", "stage3.optim.batch_size=32"]


@pytest.fixture(scope="module")
def two_nodes():
    """Head and worker node, one CPU each, so a 2-worker job must use both; the drivers are separate processes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    nodes = {node.node_id for node in cluster.list_all_nodes()}
    yield cluster.address, nodes
    cluster.shutdown()


def ltd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=env, check=False,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_training_and_label_generation_run_on_both_nodes(two_nodes, tmp_path):
    address, nodes = two_nodes
    assert len(nodes) == 2
    run = tmp_path / "ssd"
    ltd("train", "--address", address, *TINY, "distributed.num_workers=2", f"out_dir={run}")
    report = json.loads((run / "metrics.json").read_text())
    workers = report["ray_train"]["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert {w["node_id"] for w in workers} == nodes, "the two DDP ranks ran on different nodes"
    assert set(report["stages"]) == {"I", "II", "III", "III_hard_head", "IV"}

    out = ltd("labels", "generate", "ssd-t2", "--teacher", str(run / "teacher.pt"), "--store", str(tmp_path / "store"),
              "--address", address, "--workers", "2", "--chunk-rows", "64", *TINY)
    per_node = json.loads(out.stderr.split("label chunks written per node: ")[1].splitlines()[0])
    assert set(per_node) == nodes and sum(per_node.values()) >= 2
    assert "published ssd-t2" in out.stdout


def test_share_resources_packs_runs_onto_a_gpu_and_fits_a_node():
    from trainer.workers import share_resources

    gpu_node = {"GPU": 1.0, "CPU": 16.0}
    assert share_resources(gpu_node, 16) == {"num_gpus": 1.0, "num_cpus": 16}
    assert share_resources(gpu_node, 16, runs_per_gpu=4) == {"num_gpus": 0.25, "num_cpus": 4}
    assert share_resources(gpu_node, 16, runs_per_gpu=3) == {"num_gpus": 0.3333, "num_cpus": 5}
    assert share_resources({"GPU": 8.0, "CPU": 64.0}, 64, runs_per_gpu=2)["num_cpus"] == 4
    assert share_resources({"CPU": 8.0}, 8, parallel=3) == {"num_gpus": 0, "num_cpus": 2}
    assert share_resources({"CPU": 32.0}, 4, parallel=2)["num_cpus"] == 4, "capped at the largest node"
    with pytest.raises(ValueError, match="runs_per_gpu"):
        share_resources(gpu_node, 16, runs_per_gpu=0)


@pytest.mark.slow
def test_runs_per_gpu_trains_two_seeds_side_by_side_on_one_gpu(tmp_path):
    """A one-GPU node (a logical GPU: Ray schedules by it; torch finds no CUDA here and trains on the CPU): with
    --runs-per-gpu 2 the two seeds share one task holding the whole GPU (trainer/packing.py) and train at the same
    time, where one-per-GPU would queue."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    try:
        ltd("multiseed", "--address", cluster.address, "--seeds", "0,1", "--runs-per-gpu", "2", *TINY, "method=ce",
            f"out_dir={tmp_path}")
    finally:
        cluster.shutdown()
    tasks = [json.loads((tmp_path / f"seed{s}" / "metrics.json").read_text())["ray_task"] for s in (0, 1)]
    assert [t["resources"].get("GPU") for t in tasks] == [1.0, 1.0]
    assert [t["resources"].get("CPU") for t in tasks] == [2.0, 2.0]
    assert [t["packed_with"] for t in tasks] == [2, 2]
    assert max(t["started"] for t in tasks) < min(t["ended"] for t in tasks), "the two runs overlapped in time"
