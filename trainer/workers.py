"""Ray: runs the same pipeline functions as Ray tasks, on a GPU when the cluster has one, on CPUs otherwise."""

from __future__ import annotations

import logging
import os
from pathlib import Path

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
    """One GPU per task when the cluster has GPUs; else the CPUs shared out between `parallel` tasks.

    A task must fit on one node, so the CPU share is capped at the largest node's CPUs.
    """
    resources = ray.cluster_resources()
    largest_node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    if resources.get("GPU", 0) >= 1:
        per_gpu = resources.get("CPU", 1) // max(resources["GPU"], 1)
        return {"num_gpus": 1, "num_cpus": max(1, int(min(per_gpu, largest_node)))}
    share = int(resources.get("CPU", 1)) // max(parallel, 1)
    return {"num_gpus": 0, "num_cpus": max(1, int(min(share, largest_node)))}


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


class WorkerDiedError(RuntimeError):
    """A label-generation worker process died; the chunks it finished are kept and a re-run writes only the rest."""


def generate_labelset(teacher_path: Path, cfg: RunConfig, store_root: Path, labelset_id: str, *,
                      temperature: float | None = None, mode: str | None = None, views: int | None = None,
                      logits_dtype: str = "float16", top_k: int | None = None, num_workers: int | None = None,
                      chunk_rows: int | None = None, writers_per_gpu: int = 4,
                      exit_after_chunks: int | None = None):
    """Run the teacher over the training set on Ray actors (one per GPU, else per CPU) into a published labelset.

    Chunks are handed out one call at a time, so fast workers take more and the driver's bar shows progress across
    all of them. Re-running the same call after a crash finishes only the missing chunks. On GPUs several actors
    share each GPU (`writers_per_gpu`): a zarr chunk write costs milliseconds of CPU (bench/label_store.py), so
    overlapping one actor's writes with another's teacher pass keeps the GPU busy.
    `exit_after_chunks` makes the first worker die (os._exit) after that many chunks: the tests' injected failure.
    """
    from tqdm.auto import tqdm

    from store import LabelsetSpec, LabelsetWriter
    from trainer.datasets import load_dataset
    from trainer.export import file_sha256, load_model
    from trainer.labels import LabelShardWriter

    _, model_spec = load_model(teacher_path)
    data = load_dataset(cfg.data)
    if data.fingerprint != model_spec.fingerprint:
        raise ValueError(f"teacher {teacher_path} was trained on dataset {model_spec.fingerprint}, but the config's "
                         f"data is {data.fingerprint}: pass the teacher's own run config")
    mode = mode or ("views" if cfg.stage3.soft_labels == "views" else "clean")
    spec = LabelsetSpec(
        teacher_checkpoint_hash=file_sha256(teacher_path), dataset_name=data.name,
        dataset_fingerprint=data.fingerprint, num_images=len(data.train), num_classes=data.num_classes,
        temperature=temperature or cfg.stage3.temperature, config=cfg.model_dump(mode="json"),
        class_names=list(data.class_names), class_counts=data.class_counts.tolist(), mode=mode,
        views_per_image=(views or cfg.stage3.views_per_image) if mode == "views" else 1,
        logits_dtype=logits_dtype, top_k=top_k, chunk_rows=chunk_rows,
    )
    writer = LabelsetWriter.create(store_root, labelset_id, spec, exist_ok=True)
    queue = writer.missing_chunks()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = num_workers or (gpus * writers_per_gpu) or min(4, int(ray.cluster_resources().get("CPU", 1)))
    actor_cls = ray.remote(num_gpus=1 / writers_per_gpu if gpus else 0, num_cpus=1)(LabelShardWriter)
    args = (str(Path(teacher_path).resolve()), _absolute_paths(cfg).data.model_dump(mode="json"),
            str(Path(store_root).resolve()), labelset_id, cfg.augment.model_dump(), cfg.seed)
    actors = [actor_cls.remote(*args, exit_after_chunks=exit_after_chunks if i == 0 else None)
              for i in range(max(1, min(count, len(queue))))]
    pending = {actor.write.remote(queue.pop(0)): actor for actor in actors if queue}
    bar = tqdm(total=writer.num_chunks, initial=writer.num_chunks - len(queue) - len(pending),
               desc=f"labels {labelset_id}", unit="chunk", dynamic_ncols=True)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done[0])
            ray.get(done[0])
            bar.update(1)
            if queue:
                pending[actor.write.remote(queue.pop(0))] = actor
    except ray.exceptions.RayActorError as err:
        missing = len(writer.missing_chunks())
        raise WorkerDiedError(f"a label worker died; {missing} of {writer.num_chunks} chunks are missing. "
                              "Re-run the same command to write only those.") from err
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return writer.publish()
