"""Jobs on Ray: each job is one Ray task; one runner thread in the service watches the tasks and writes their ends.

Why one task per job, driven from a thread: `ray.cancel(ref, force=True)` then stops the whole job (label-generation
actors die with the task that owns them), and the service process itself never trains. The runner thread blocks
only in `ray.wait`, so request handlers stay free; all state lives in the SQLite records (service/jobs.py), so a
restarted service knows every job and fails the ones it lost (`JobStore.fail_interrupted`).

A train job whose stage-I recipe another live job is about to train is held back (queued, `progress.waiting`) until
that job has published it: waiting inside a Ray task would hold a GPU doing nothing while other jobs queue for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path

from service.jobs import ACTIVE, JobRecord, JobStore

log = logging.getLogger(__name__)

LOG_FILE = "job.log"
PROGRESS_FILE = "progress.json"
STAGE_EPOCHS = {"I": "stage1", "II": "stage2", "III": "stage3", "IV": "stage4"}  # engine stage -> config


# ---- inside the Ray worker -----------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # the service may read it at any moment: never let it see half a file


class _EpochProgress(logging.Handler):
    """Turns the engine's per-epoch debug record ("stage %s %s", stage, record) into progress.json, and so does a
    record that carries `progress` itself (a run waiting for a shared stage I)."""

    def __init__(self, path: Path, base: dict, epochs: dict[str, int]):
        super().__init__(logging.DEBUG)
        self.path, self.base, self.epochs = path, base, epochs

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(getattr(record, "progress", None), dict):
            _write_json(self.path, {**self.base, **record.progress})
            return
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and isinstance(args[1], dict) and "epoch" in args[1]:
            stage, info = str(args[0]), args[1]
            _write_json(self.path, {**self.base, "stage": stage, "epoch": info["epoch"],
                                    "epochs": self.epochs.get(stage), "loss": info.get("loss")})


def run_job(kind: str, payload: dict, attempt: int) -> dict:
    """The body of a job's Ray task: log to the run folder, run train | labels | distill, return metrics + outputs."""
    import torch

    from trainer.config import RunConfig

    run_dir = Path(payload["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.model_validate(payload["config"])  # crossed a process boundary: validate again
    epochs = {stage: getattr(cfg, name).optim.epochs for stage, name in STAGE_EPOCHS.items()}
    base = {"attempt": attempt, "started": time.time()}
    _write_json(run_dir / PROGRESS_FILE, base)  # the runner reads this as "the job is running now"
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    file_handler = logging.FileHandler(run_dir / LOG_FILE)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    progress = _EpochProgress(run_dir / PROGRESS_FILE, base, epochs)
    loggers = [logging.getLogger(name) for name in ("trainer", "store", "service")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)  # the engine logs each epoch's record at debug: the job log should show it
        lg.addHandler(file_handler)
    loggers[0].addHandler(progress)
    try:
        # tqdm bars and warnings go to stderr: keep them in the job's log rather than the worker's
        with open(run_dir / LOG_FILE, "a", buffering=1) as stderr, contextlib.redirect_stderr(stderr):
            log.info("job %s (%s) attempt %d started", run_dir.name, kind, attempt)
            try:
                result = _RUNNERS[kind](cfg, payload)
            except BaseException:
                log.error("job failed:\n%s", traceback.format_exc())
                raise
            log.info("job %s finished: %s", run_dir.name, json.dumps(result.get("metrics", {})))
            return result
    finally:
        loggers[0].removeHandler(progress)
        for lg, level in zip(loggers, levels):
            lg.removeHandler(file_handler)
            lg.setLevel(level)
        file_handler.close()


def _headline(result: dict) -> dict:
    return {k: result[k] for k in ("overall", "many", "medium", "few") if k in result}


def _report_result(report: dict, run_dir: Path) -> dict:
    models = [run_dir.name] + ([f"{run_dir.name}/teacher"] if (run_dir / "teacher.pt").exists() else [])
    metrics = {"final": _headline(report["final"]), "stages": {s: _headline(r) for s, r in report["stages"].items()}}
    if "I" in report["stages"]:  # a run that trained (or shared) a stage I, not a distillation from a labelset
        metrics["stage1_reused"] = "stage1_reused" in report
    return {"metrics": metrics, "outputs": {"models": models}}


def _train(cfg, payload: dict) -> dict:
    from trainer.stages import run_pipeline

    if cfg.distributed.num_workers > 1:  # this task only drives Ray Train; its workers hold the CPUs/GPUs
        from trainer.workers import train_distributed

        return _report_result(train_distributed(cfg), Path(payload["run_dir"]))
    return _report_result(run_pipeline(cfg), Path(payload["run_dir"]))


def _labels(cfg, payload: dict) -> dict:
    from trainer.workers import generate_labelset

    prov = generate_labelset(Path(payload["teacher_path"]), cfg, Path(payload["store_root"]), payload["labelset_id"],
                             temperature=payload.get("temperature"), mode=payload.get("mode"),
                             views=payload.get("views"), top_k=payload.get("top_k"))
    summary = prov.model_dump(mode="json", include={"labelset_id", "num_images", "num_classes", "temperature", "mode"})
    return {"metrics": {}, "outputs": {"labelset": summary}}


def _distill(cfg, payload: dict) -> dict:
    from store import LabelsetReader
    from trainer.stages import run_pipeline

    reader = LabelsetReader(payload["store_root"], payload["labelset_id"])
    cfg = cfg.model_copy(update={"stage3": cfg.stage3.model_copy(update={"temperature": reader.temperature})})
    if cfg.distributed.num_workers > 1:
        from trainer.workers import train_distributed

        report = train_distributed(cfg, labelset=(payload["store_root"], payload["labelset_id"]))
        return _report_result(report, Path(payload["run_dir"]))
    return _report_result(run_pipeline(cfg, source=reader), Path(payload["run_dir"]))


_RUNNERS = {"train": _train, "labels": _labels, "distill": _distill}


def read_progress(run_dir: Path) -> dict | None:
    """The worker's last progress.json (attempt, started, stage, epoch, epochs, loss), or None before it started."""
    try:
        return json.loads((run_dir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def job_progress(job: JobRecord, store_root: Path) -> dict | None:
    """What the worker last reported; an active labels job also counts its finished chunks in the store."""
    progress = read_progress(Path(job.payload["run_dir"]))
    if job.kind == "labels" and job.state in ACTIVE:
        from store import list_staging

        for staged in list_staging(store_root):
            if staged.labelset_id == job.payload["labelset_id"]:
                progress = {**(progress or {}), "chunks_done": staged.chunks_done, "num_chunks": staged.num_chunks}
    return progress


# ---- in the service ------------------------------------------------------------------------------------------------


def _task_options(kind: str, distributed_workers: int = 1, jobs_per_device: int = 1) -> dict:
    """Labels jobs and Ray Train jobs only orchestrate (their actors hold the CPUs); training gets a GPU (or the
    CPUs) shared out between `jobs_per_device` jobs."""
    if kind == "labels" or distributed_workers > 1:
        return {"num_cpus": 0, "num_gpus": 0}
    from trainer.workers import task_resources

    return task_resources(parallel=jobs_per_device, runs_per_gpu=jobs_per_device)


def stage1_recipe_key(job: JobRecord) -> str | None:
    """The stage I a job shares through the service's stage-I cache (`RunConfig.stage1_share_key`), or None: labels
    and distill jobs, expert methods, Ray Train jobs (their ranks report no progress here), sharing off."""
    config = job.payload.get("config") or {}
    if job.kind != "train" or config.get("distributed", {}).get("num_workers", 1) > 1:
        return None
    from trainer.config import RunConfig

    return RunConfig.model_validate(config).stage1_share_key()


def _past_stage1(progress: dict | None, attempt: int) -> bool:
    """Whether a job's worker reported a stage after I (its stage I is then published)."""
    return bool(progress) and progress.get("attempt") == attempt and progress.get("stage") not in (None, "I")


class JobRunner:
    """Submits job tasks to Ray and, in one background thread, records when each starts and how it ends."""

    def __init__(self, store: JobStore, ray_address: str | None, poll_s: float = 0.5, jobs_per_device: int = 1):
        self.store = store
        self.ray_address = ray_address
        self.poll_s = poll_s
        self.jobs_per_device = jobs_per_device
        self._refs: dict = {}  # ObjectRef -> (job id, attempt, run folder)
        self._started: set = set()  # refs already recorded as running
        self._sharing: dict[str, tuple[str, int, Path]] = {}  # sent job id -> (recipe key, attempt, run folder)
        self._published: set[str] = set()  # recipe keys whose stage I a job of this service has published
        self._held: dict[str, tuple[JobRecord, str]] = {}  # held-back job id -> (job, its recipe key)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ltd-job-runner", daemon=True)
        self._ray_lock = threading.Lock()
        self.started_ray = False

    @property
    def ray_connected(self) -> bool:
        import ray

        return ray.is_initialized()

    def start(self) -> None:
        self._thread.start()

    def _ensure_ray(self) -> None:
        """Join (or start) Ray on first use, so the service starts in a second and serves labels without it."""
        import ray

        from trainer.workers import init_ray

        with self._ray_lock:
            if not ray.is_initialized():
                init_ray(self.ray_address)
                self.started_ray = True

    def submit(self, job: JobRecord) -> None:
        """Start the job's task, or hold it back while another job trains its stage I; a cluster that cannot take
        it leaves the job failed with the reason."""
        recipe = stage1_recipe_key(job)
        run_dir = Path(job.payload["run_dir"])
        with self._lock:  # decide and register at once: of two jobs of a recipe sent together, one is held
            holder = self._training_stage1(recipe)
            if holder is not None:
                self._held[job.id] = (job, recipe)
            elif recipe is not None:
                self._sharing[job.id] = (recipe, job.attempt, run_dir)
        if holder is not None:
            log.info("job %s waits for job %s, which trains the same stage I", job.id, holder)
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(run_dir / PROGRESS_FILE, {"stage": "I", "waiting": f"for job {holder}, which trains the "
                                                                           "same stage I"})
            return
        try:
            self._ensure_ray()
            import ray

            workers = job.payload.get("config", {}).get("distributed", {}).get("num_workers", 1)
            task = ray.remote(max_retries=0, **_task_options(job.kind, workers, self.jobs_per_device))(run_job)
            ref = task.remote(job.kind, job.payload, job.attempt)
        except Exception as err:  # noqa: BLE001 - any failure to reach Ray is the job's failure, not the request's
            log.exception("could not submit job %s", job.id)
            with self._lock:
                self._sharing.pop(job.id, None)
            self.store.finish(job.id, "failed", error=f"could not submit to Ray: {type(err).__name__}: {err}")
            return
        with self._lock:
            self._refs[ref] = (job.id, job.attempt, run_dir)

    def _training_stage1(self, recipe: str | None) -> str | None:
        """The job sent to Ray that is to train this recipe's stage I (running it or queued for the cluster), if
        any; called under the lock."""
        if recipe is None or recipe in self._published:
            return None
        for job_id, (other, attempt, run_dir) in self._sharing.items():
            if other == recipe:
                if _past_stage1(read_progress(run_dir), attempt):
                    self._published.add(recipe)
                    return None
                return job_id
        return None

    def _release_held(self) -> None:
        """Submit the held-back jobs whose stage I is published or whose holder ended; a job whose holder failed
        may be held again, behind the first of them, which trains the stage I in its place."""
        with self._lock:
            free = [job for job, recipe in self._held.values() if self._training_stage1(recipe) is None]
            for job in free:
                del self._held[job.id]
        for job in free:
            if self.store.get(job.id).state == "queued":
                self.submit(job)

    def cancel(self, job_id: str) -> bool:
        """Force-cancel the job's task (and the actors it owns), or drop it if held back; True if one was found."""
        import ray

        with self._lock:
            held = self._held.pop(job_id, None)
            refs = [ref for ref, (jid, _, _) in self._refs.items() if jid == job_id]
        if held is not None:
            (Path(held[0].payload["run_dir"]) / PROGRESS_FILE).unlink(missing_ok=True)  # it never started
        for ref in refs:
            ray.cancel(ref, force=True)
        return bool(refs) or held is not None

    def stop(self) -> None:
        """On shutdown: stop watching, cancel what still runs and record why (a resubmission resumes it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        import ray

        with self._lock:
            live, self._refs = dict(self._refs), {}
            held, self._held = list(self._held), {}
        for ref, (job_id, _, _) in live.items():
            with contextlib.suppress(Exception):  # Ray may already be gone; the record matters more
                ray.cancel(ref, force=True)
            self.store.finish(job_id, "failed", error="the service shut down while this job ran; "
                                                      f"POST /v1/jobs/{job_id}:retry resumes it")
        for job_id in held:
            self.store.finish(job_id, "failed", error="the service shut down while this job waited for a shared "
                                                      f"stage I; POST /v1/jobs/{job_id}:retry runs it")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._release_held()
                with self._lock:
                    live = dict(self._refs)
                if not live:
                    self._stop.wait(self.poll_s / 2)
                    continue
                self._poll(live)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad poll
                log.exception("job runner poll failed")
                self._stop.wait(self.poll_s)

    def _poll(self, live: dict) -> None:
        import ray

        ready, waiting = ray.wait(list(live), num_returns=len(live), timeout=self.poll_s, fetch_local=True)
        for ref in waiting:
            job_id, attempt, run_dir = live[ref]
            progress = read_progress(run_dir)
            if ref not in self._started and progress and progress.get("attempt") == attempt:
                self._started.add(ref)
                self.store.mark_running(job_id, started=progress.get("started"))
        for ref in ready:
            job_id, attempt, run_dir = live[ref]
            self._settle(ref, job_id, run_dir)
            with self._lock:
                self._refs.pop(ref, None)
                recipe, _, _ = self._sharing.pop(job_id, (None, 0, None))
                if recipe is not None and self.store.get(job_id).state == "succeeded":
                    self._published.add(recipe)  # a job that ended after stage I (CE) published it
            self._started.discard(ref)

    def _settle(self, ref, job_id: str, run_dir: Path) -> None:
        import ray
        from ray.exceptions import RayTaskError, TaskCancelledError

        self.store.mark_running(job_id, started=(read_progress(run_dir) or {}).get("started"))
        try:
            result = ray.get(ref)
        except TaskCancelledError:
            self.store.finish(job_id, "cancelled", error="cancelled")
        except RayTaskError as err:
            cause = err.cause if getattr(err, "cause", None) is not None else err
            self.store.finish(job_id, "failed", error=f"{type(cause).__name__}: {cause}"[:4000])
        except Exception as err:  # noqa: BLE001 - a dead worker or node: the job failed, say how
            self.store.finish(job_id, "failed", error=f"worker died: {type(err).__name__}: {err}"[:4000])
        else:
            self.store.finish(job_id, "succeeded", result=result)
        log.info("job %s is %s", job_id, self.store.get(job_id).state)
