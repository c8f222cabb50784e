"""Shared fixtures: a small real long-tailed dataset, run folders, and one local Ray for the whole session."""

from __future__ import annotations

import os

import hypothesis
import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

# Property tests (hypothesis, schemathesis): under CI the same examples every run, so a red run is a reproducible
# finding, never luck; elsewhere each run explores new ones (how a boolean image id was found).
hypothesis.settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_lt():
    """Procedural LT images (10 classes, n_max 120, IF 20) with a small balanced test set: trains in seconds."""
    from trainer.config import DataConfig
    from trainer.datasets import load_dataset

    return load_dataset(DataConfig(name="synthetic", imbalance_factor=20, max_per_class=120, test_per_class=40))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for every test that needs it (num_cpus fixed, as Ray's testing tips advise)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def claim_holder():
    """Starts another process that holds a stage-I cache entry's claim (trainer.stages.stage1_claim), as a live run
    training that stage I would; `kill()` it to play a trainer that died without publishing. Killed at teardown."""
    import subprocess
    import sys

    holders = []

    def hold(entry) -> subprocess.Popen:
        code = ("import sys, time\nfrom pathlib import Path\nfrom trainer.stages import stage1_claim\n"
                "with stage1_claim(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)")
        holder = subprocess.Popen([sys.executable, "-c", code, str(entry)], stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout.readline().strip() == "held"
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
