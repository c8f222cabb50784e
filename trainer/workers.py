"""Ray: runs the same pipeline functions as Ray tasks, on a GPU when the cluster has one, on CPUs otherwise."""

from __future__ import annotations

import logging
import os

import ray

from trainer.config import RunConfig

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray in this process."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {} if address else {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False}
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING, configure_logging=False, **kwargs)


def task_resources(parallel: int = 1) -> dict:
    """One GPU per task when the cluster has GPUs; else the CPUs shared out between `parallel` tasks."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": max(1, int(resources.get("CPU", 1) // max(resources["GPU"], 1)))}
    return {"num_gpus": 0, "num_cpus": max(1, int(resources.get("CPU", 1)) // max(parallel, 1))}


def _run_pipeline_task(cfg_dict: dict) -> dict:
    """Validate the config again on arrival (it crossed a process boundary), then run in this worker."""
    import torch

    from trainer.stages import run_pipeline

    os.environ["LTD_PROGRESS"] = "ray"  # progress bars drawn on the driver, one per worker
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    return run_pipeline(RunConfig.model_validate(cfg_dict))


def run_pipelines(cfgs: list[RunConfig], max_retries: int = 1) -> list[dict]:
    """Run several configs (seeds, methods) as parallel Ray tasks; a crashed worker is retried `max_retries` times,
    and the retry resumes from the stage's last checkpoint in the run folder."""
    resources = task_resources(parallel=len(cfgs))
    task = ray.remote(max_retries=max_retries, **resources)(_run_pipeline_task)
    refs = [task.remote(_absolute_paths(cfg).model_dump(mode="json")) for cfg in cfgs]
    return ray.get(refs)


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Workers may start in another directory: send absolute paths."""
    data = cfg.data.model_copy(update={
        k: getattr(cfg.data, k).resolve() for k in ("root", "train_list", "test_list") if getattr(cfg.data, k)
    })
    return cfg.model_copy(update={"out_dir": cfg.out_dir.resolve(), "data": data})
