"""Several runs in one process at once (`--runs-per-gpu K`): one thread per run, each on its own CUDA stream.

Why one process: without MPS, separate processes time-slice a GPU (bench/README.md measured two stage-Is at 7.5k
img/s each), so only work issued by one process can overlap. Why threads and streams rather than stacking K models
into one (torch.func.stack_module_state + vmap): each run stays the unchanged single-run pipeline (its own seed,
sampler, augmentation draws, MoCo queue, optimizer, checkpoints and metrics.json), runs of different methods and
schedules pack together, and a failure stays inside its thread. The training step holds the GIL only while it
launches: a whole-step CUDA graph (trainer/graphs.py) is one launch, so K threads keep K graph replays in flight on
K streams. On a CPU the threads share the cores, so packing only helps where one run leaves cores idle.

Process-wide state is handled once here or where it is used: the thread count (`threads`, set once for the pack),
the global RNG (initialisation runs under trainer.context.seeded), cuDNN autotuning (trainer.engine), progress and
log lines (prefixed with the run's folder name through trainer.engine.RUN_LABEL).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer.config import RunConfig
from trainer.context import resolve_device
from trainer.engine import RUN_LABEL
from trainer.stages import RunsFailedError, run_pipeline

log = logging.getLogger(__name__)


def run_packed(cfgs: list[RunConfig], runs_at_once: int, threads: int | None = None) -> list[dict]:
    """Train `cfgs` in this process, `runs_at_once` at a time (the next starts as one ends); one result per config.

    A result is the run's report (as run_pipeline returns it), or {"out_dir", "failed"} for a run that raised: one
    run's failure does not stop the others. A re-run after a crash resumes every run from its stage checkpoints, as
    a re-run of a single run does. `threads`: torch's intra-op thread count, process-wide, so set once for the pack.
    """
    if runs_at_once < 1:
        raise ValueError(f"runs_at_once must be at least 1, got {runs_at_once}")
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    if runs_at_once == 1 or len(cfgs) <= 1:  # nothing to overlap: the caller's thread, as before packing existed
        return [_run_one(cfg, None) for cfg in cfgs]
    labels = run_labels(cfgs)
    with labelled_logs(), ThreadPoolExecutor(max_workers=runs_at_once, thread_name_prefix="ltd-run") as pool:
        return list(pool.map(_run_one, cfgs, labels))


def run_labels(cfgs: list[RunConfig]) -> list[str]:
    """What prefixes each run's output: its folder name, or the folder path where names repeat."""
    names = [Path(cfg.out_dir).name for cfg in cfgs]
    return names if len(set(names)) == len(names) else [str(cfg.out_dir) for cfg in cfgs]


def failures(results: list[dict]) -> list[str]:
    """'out_dir: Error: message' for each failed run of `run_packed`'s results, the form RunsFailedError lists."""
    return [f"{r['out_dir']}: {r['failed']}" for r in results if "failed" in r]


def raise_failures(results: list[dict]) -> list[dict]:
    """`results` when every run finished, else RunsFailedError naming the failed ones (the others have finished)."""
    failed = failures(results)
    if failed:
        raise RunsFailedError(failed, len(results))
    return results


def _run_one(cfg: RunConfig, label: str | None) -> dict:
    token = RUN_LABEL.set(label)
    try:
        with own_stream(resolve_device(cfg.device)):
            return run_pipeline(cfg)
    except Exception as err:  # noqa: BLE001 - a run's failure is its result; the traceback is logged here
        log.exception("run %s failed", cfg.out_dir)
        return {"out_dir": str(cfg.out_dir), "failed": f"{type(err).__name__}: {err}"}
    finally:
        RUN_LABEL.reset(token)


@contextmanager
def own_stream(device: torch.device):
    """On a GPU, this thread's kernels (and its graph replays) on a stream of its own, so runs in other threads
    overlap with it instead of queueing behind it on the default stream; on a CPU nothing."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


@contextmanager
def labelled_logs():
    """Log records made while a run label is set start with `[label]`: interleaved lines say which run they are
    from. Installed for the pack's lifetime, the previous record factory restored after."""
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        label = RUN_LABEL.get()
        if label is not None:
            record.msg = f"[{label.replace('%', '%%') if record.args else label}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)
