"""Ray: runs the same pipeline functions as Ray tasks, on a GPU when the cluster has one, on CPUs otherwise."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import ray

from trainer.config import RunConfig
from trainer.engine import progress_bar, progress_mode
from trainer.packing import failures, run_packed
from trainer.stages import RunsFailedError, run_pipeline

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray in this process."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {} if address else {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False}
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING, configure_logging=False, **kwargs)


def share_resources(cluster: dict, largest_node_cpus: float, parallel: int = 1, runs_per_gpu: int = 1) -> dict:
    """Ray resources of one training task, from the cluster's totals.

    With GPUs: 1/`runs_per_gpu` of a GPU and the same share of the CPUs per GPU: separate processes sharing a GPU,
    which time-slice it (bench/README.md), so `run_pipelines` packs runs into one process instead and this share
    serves the service's job runner, whose jobs are separate tasks. Without GPUs: the CPUs shared out
    between `parallel` tasks. A task must fit on one node, so its CPUs are capped at the largest node's.
    """
    if runs_per_gpu < 1:
        raise ValueError(f"runs_per_gpu must be at least 1, got {runs_per_gpu}")
    gpus = cluster.get("GPU", 0)
    if gpus >= 1:
        cpus = cluster.get("CPU", 1) // gpus // runs_per_gpu
        return {"num_gpus": round(1 / runs_per_gpu, 4), "num_cpus": max(1, int(min(cpus, largest_node_cpus)))}
    share = int(cluster.get("CPU", 1)) // max(parallel, 1)
    return {"num_gpus": 0, "num_cpus": max(1, int(min(share, largest_node_cpus)))}


def task_resources(parallel: int = 1, runs_per_gpu: int = 1) -> dict:
    """`share_resources` for the cluster Ray is connected to."""
    largest_node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return share_resources(ray.cluster_resources(), largest_node, parallel, runs_per_gpu)


@ray.remote(num_cpus=0)
def _settled(refs: list) -> None:
    """Ready once the runs in `refs` have ended, failed or not (refs inside a list reach a task unresolved): a run
    waiting for another's stage I then trains its own if that run failed, instead of failing with it."""
    ray.wait(refs, num_returns=len(refs))


def worker_progress() -> str:
    """How Ray workers show progress, chosen on the driver: bars drawn on its terminal (tqdm_ray), else plain lines
    (forwarded to a log or CI without carriage-return debris)."""
    return "ray" if progress_mode() in ("bar", "ray") else "lines"


def _run_pipeline_task(cfg_dict: dict, progress: str, *after: None) -> dict:
    """Validate the config again on arrival (it crossed a process boundary), then run in this worker. `progress`:
    the driver's `worker_progress()`. `after`: the runs this one waits for, `_settled` (Ray starts the task once
    they have ended); unused."""
    import torch

    os.environ["LTD_PROGRESS"] = progress
    context = ray.get_runtime_context()
    assigned = context.get_assigned_resources()
    torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))
    cfg, started = RunConfig.model_validate(cfg_dict), time.time()
    report = run_pipeline(cfg)
    report["ray_task"] = {"node_id": context.get_node_id(), "resources": assigned, "started": started,
                          "ended": time.time()}  # where and beside what it ran: tasks may share a GPU
    (Path(cfg.out_dir) / "metrics.json").write_text(json.dumps(report, indent=1))
    return report


def run_pipelines(cfgs: list[RunConfig], max_retries: int = 1, runs_per_gpu: int = 1) -> list[dict]:
    """Run several configs (seeds, methods) as parallel Ray tasks; a crashed worker is retried `max_retries` times,
    and the retry resumes from the stage's last checkpoint in the run folder. A run that fails does not stop the
    others: all run to the end, then RunsFailedError names the failed ones.

    With GPUs and `runs_per_gpu` K > 1, K runs share one task that holds a whole GPU and trains them at once in its
    process (trainer/packing.py): separate processes would only time-slice the GPU. Without GPUs the K is moot and
    each run is its own task, as before. Configs with `distributed.num_workers` > 1 run one after another, each on
    Ray Train across the cluster.
    """
    single = [cfg for cfg in cfgs if cfg.distributed.num_workers == 1]
    if runs_per_gpu > 1 and ray.cluster_resources().get("GPU", 0) >= 1:
        reports, failed = _run_packs(single, runs_per_gpu, max_retries)
    else:
        reports, failed = _run_tasks(single, max_retries)
    reports.update({id(cfg): train_distributed(cfg) for cfg in cfgs if cfg.distributed.num_workers > 1})
    if failed:
        raise RunsFailedError(failed, len(cfgs))
    return [reports[id(cfg)] for cfg in cfgs]


def _run_tasks(single: list[RunConfig], max_retries: int) -> tuple[dict[int, dict], list[str]]:
    """One Ray task per run, the cluster's resources shared out between them."""
    resources = task_resources(parallel=max(len(single), 1))
    task = ray.remote(max_retries=max_retries, **resources)(_run_pipeline_task)
    refs: dict[int, ray.ObjectRef] = {}
    for cfg, first in zip(single, first_with_same_stage1(single)):  # a run sharing a stage I waits for its trainer
        after = [_settled.remote([refs[id(single[first])]])] if first is not None else []
        refs[id(cfg)] = task.remote(_absolute_paths(cfg).model_dump(mode="json"), worker_progress(), *after)
    reports, failed = {}, []
    for cfg in single:
        try:
            reports[id(cfg)] = ray.get(refs[id(cfg)])
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None) or err
            failed.append(f"{cfg.out_dir}: {type(cause).__name__}: {cause}")
    return reports, failed


def _run_packs(single: list[RunConfig], runs_per_gpu: int, max_retries: int) -> tuple[dict[int, dict], list[str]]:
    """Runs in list order, `runs_per_gpu` to a task holding one GPU and its share of the CPUs. A pack waits for the
    earlier packs that train a stage I one of its runs starts from (runs inside one pack wait on the stage I's
    lock instead, trainer/stages.py)."""
    resources = task_resources(runs_per_gpu=1)
    task = ray.remote(max_retries=max_retries, **resources)(_run_pack_task)
    packs = [single[i:i + runs_per_gpu] for i in range(0, len(single), runs_per_gpu)]
    pack_of = {id(cfg): p for p, pack in enumerate(packs) for cfg in pack}
    firsts = first_with_same_stage1(single)
    refs: list[ray.ObjectRef] = []
    for p, pack in enumerate(packs):
        before = sorted({pack_of[id(single[f])] for cfg, f in zip(single, firsts) if pack_of[id(cfg)] == p
                         and f is not None and pack_of[id(single[f])] != p})
        after = [_settled.remote([refs[q] for q in before])] if before else []
        refs.append(task.remote([_absolute_paths(cfg).model_dump(mode="json") for cfg in pack], worker_progress(),
                                *after))
    reports, failed = {}, []
    for pack, ref in zip(packs, refs):
        try:
            results = ray.get(ref)
        except ray.exceptions.RayError as err:  # the process died: every run in it failed
            cause = getattr(err, "cause", None) or err
            failed += [f"{cfg.out_dir}: {type(cause).__name__}: {cause}" for cfg in pack]
            continue
        failed += failures(results)
        reports.update({id(cfg): r for cfg, r in zip(pack, results) if "failed" not in r})
    return reports, failed


def _run_pack_task(cfg_dicts: list[dict], progress: str, *after: None) -> list[dict]:
    """`_run_pipeline_task` for a pack: its runs at once in this worker (trainer/packing.py), each report with the
    task's resources, which the pack's runs share."""
    os.environ["LTD_PROGRESS"] = progress
    context = ray.get_runtime_context()
    assigned = context.get_assigned_resources()
    cfgs, started = [RunConfig.model_validate(c) for c in cfg_dicts], time.time()
    results = run_packed(cfgs, len(cfgs), threads=max(1, int(assigned.get("CPU", 1))))
    for cfg, report in zip(cfgs, results):
        if "failed" in report:
            continue
        report["ray_task"] = {"node_id": context.get_node_id(), "resources": assigned, "started": started,
                              "ended": time.time(), "packed_with": len(cfgs)}
        (Path(cfg.out_dir) / "metrics.json").write_text(json.dumps(report, indent=1))
    return results

def first_with_same_stage1(cfgs: list[RunConfig]) -> list[int | None]:
    """For each config, the first earlier one with the same stage1_cache and stage-I recipe (whose finished stage I
    it will start from), or None. Run in list order, every run then finds its stage I finished."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, cfg in enumerate(cfgs):
        key = cfg.stage1_share_key()
        out.append(first.get(key))
        if key is not None:
            first.setdefault(key, i)
    return out


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Workers may start in another directory: send absolute paths."""
    data = cfg.data.model_copy(update={
        k: getattr(cfg.data, k).resolve() for k in ("root", "train_list", "test_list") if getattr(cfg.data, k)
    })
    cache = cfg.stage1_cache.resolve() if cfg.stage1_cache else None
    return cfg.model_copy(update={"out_dir": cfg.out_dir.resolve(), "data": data, "stage1_cache": cache})


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
    actor_cls = ray.remote(num_gpus=1 / writers_per_gpu if gpus else 0, num_cpus=1)(_located(LabelShardWriter))
    args = (str(Path(teacher_path).resolve()), _absolute_paths(cfg).data.model_dump(mode="json"),
            str(Path(store_root).resolve()), labelset_id, cfg.augment.model_dump(), cfg.seed)
    actors = [actor_cls.remote(*args, exit_after_chunks=exit_after_chunks if i == 0 else None)
              for i in range(max(1, min(count, len(queue))))]
    node_of = dict(zip(actors, ray.get([actor.node_id.remote() for actor in actors])))
    chunks_per_node: dict[str, int] = {}
    pending = {actor.write.remote(queue.pop(0)): actor for actor in actors if queue}
    bar = progress_bar(f"labels {labelset_id}", writer.num_chunks, writer.num_chunks - len(queue) - len(pending),
                       "chunk")
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done[0])
            ray.get(done[0])
            chunks_per_node[node_of[actor]] = chunks_per_node.get(node_of[actor], 0) + 1
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
    log.info("label chunks written per node: %s", json.dumps(chunks_per_node))
    return writer.publish()


def _located(cls):
    """`cls` plus a node_id() method, so the driver can say which cluster node did each piece of work."""

    class Located(cls):
        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    Located.__name__ = Located.__qualname__ = cls.__name__  # actors keep their class name in Ray's state
    return Located


# ---- data-parallel training on Ray Train ---------------------------------------------------------------------------

RESULT_FILE = "report.json"  # the finished run's report, inside its last Ray Train checkpoint


def _copy_or_link(src: Path, dst: Path) -> None:
    """A hard link is a free snapshot (checkpoints are replaced by os.replace, never rewritten in place)."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p.relative_to(run_dir) for p in run_dir.glob("stage*/checkpoint.pt"))


def _report_to_ray_train(run_dir: Path | None, metrics: dict, extra: dict[str, str] | None = None) -> None:
    """ray.train.report on every rank (a barrier); rank 0 attaches every stage checkpoint so far as one checkpoint.

    Every stage's file goes in, not only the running stage's: a restarted worker group skips finished stages by
    finding their last-epoch checkpoints, as a re-run in one process does.
    """
    import tempfile

    import ray.train

    if run_dir is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ltd-ckpt-") as tmp:
        for rel in _stage_checkpoints(run_dir):
            _copy_or_link(run_dir / rel, Path(tmp) / rel)
        for name, text in (extra or {}).items():
            (Path(tmp) / name).write_text(text)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore_from_ray_train(run_dir: Path) -> str | None:
    """Rank 0 copies the latest Ray Train checkpoint's stage files into the run folder (it may be on a new node)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        for rel in _stage_checkpoints(Path(folder)):
            target = run_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".restore")
            _copy_or_link(Path(folder) / rel, tmp)
            os.replace(tmp, target)
    return Path(checkpoint.path).name


def _train_loop_per_worker(config: dict) -> None:
    """One DDP rank of a run: the same run_pipeline as in one process; Ray Train made the process group.

    Rank 0 owns the run folder; other ranks write into a private scratch folder (their duplicate model files are
    discarded). Every epoch goes through ray.train.report with rank 0's checkpoint, and a restarted group resumes
    from ray.train.get_checkpoint().
    """
    import shutil
    import signal
    import tempfile

    import ray.train
    import torch

    from trainer.distributed import WorkerHooks, all_gather_objects, installed_hooks

    cfg = RunConfig.model_validate(config["cfg"])  # crossed a process boundary: validate again
    rank = ray.train.get_context().get_world_rank()
    os.environ["LTD_PROGRESS"] = config["progress"]
    torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
    if config["use_gpu"]:
        torch.cuda.set_device(ray.train.torch.get_device())  # "cuda" in the run config now means this rank's GPU
    run_dir = Path(cfg.out_dir)
    scratch = None
    restored = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        restored = _restore_from_ray_train(run_dir)
    else:
        scratch = Path(tempfile.mkdtemp(prefix=f"ltd-rank{rank}-"))
        cfg = cfg.model_copy(update={"out_dir": scratch})
    workers = all_gather_objects({"rank": rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()})
    fault = config.get("fault")

    def after_epoch(stage: str, checkpoint: Path, record: dict) -> None:
        _report_to_ray_train(run_dir if rank == 0 else None, {"stage": stage, **record})
        if fault and (rank, stage, record["epoch"]) == (fault["rank"], fault["stage"], fault["epoch"]):
            marker = Path(fault["marker"])
            if not marker.exists():  # once: the restarted worker must not die again
                marker.write_text(json.dumps({"pid": os.getpid(), "stage": stage, "epoch": record["epoch"]}))
                os.kill(os.getpid(), signal.SIGKILL)

    source = None
    if config.get("labelset"):
        from store import LabelsetReader

        source = LabelsetReader(*config["labelset"])
        cfg = cfg.model_copy(update={"stage3": cfg.stage3.model_copy(update={"temperature": source.temperature})})
    try:
        with installed_hooks(WorkerHooks(sync_batchnorm=cfg.distributed.sync_batchnorm, after_epoch=after_epoch)):
            report = run_pipeline(cfg, source=source)
        report["ray_train"] = {"workers": workers, "restored_from": restored}
        if rank == 0:
            (run_dir / "metrics.json").write_text(json.dumps(report, indent=1))
        text = json.dumps(report)
        _report_to_ray_train(run_dir if rank == 0 else None, {"stage": "done", "report_bytes": len(text)},
                             extra={RESULT_FILE: text})
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def train_distributed(cfg: RunConfig, labelset: tuple[str, str] | None = None, *, fault: dict | None = None) -> dict:
    """Run `cfg` data-parallel on Ray Train (`cfg.distributed`), restarting from the last checkpoint after a failure.

    `labelset` = (store root, labelset id) distils from a stored labelset instead of training a teacher.
    `fault` = {"rank", "stage", "epoch", "marker"} makes that worker SIGKILL itself once after that epoch's
    checkpoint is reported (the tests' injected failure; `marker` is the file that makes it once).
    Returns the run's report (as run_pipeline does), read from the last Ray Train checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    cfg = _absolute_paths(cfg)
    d = cfg.distributed
    use_gpu = bool(ray.cluster_resources().get("GPU", 0) >= 1) if d.use_gpu == "auto" else bool(d.use_gpu)
    storage = Path(d.storage_path or cfg.out_dir / "ray_train").resolve()
    resources = {"CPU": d.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "use_gpu": use_gpu, "fault": fault,
                           "progress": worker_progress(),
                           "labelset": [str(Path(labelset[0]).resolve()), labelset[1]] if labelset else None},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=d.placement),
        run_config=TrainRunConfig(name="train", storage_path=str(storage),
                                  failure_config=FailureConfig(max_failures=d.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / RESULT_FILE).read_text())
