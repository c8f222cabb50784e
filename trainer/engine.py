"""The one training loop (every stage and baseline runs through `fit`) and evaluation."""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from trainer.batches import Batch, Draw
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import OptimConfig
from trainer.distributed import (all_reduce_sums, broadcast_module_state, broadcast_object, data_parallel_loss,
                                  gather_split, is_distributed, is_primary, worker_hooks)
from trainer.graphs import GraphedStep

log = logging.getLogger(__name__)

LossFn = Callable[[Batch, float], tuple[torch.Tensor, dict[str, float]]]

# The run this thread trains, when several runs share the process (trainer/packing.py): progress lines and log
# records carry it, so interleaved output still says which run it belongs to.
RUN_LABEL: ContextVar[str | None] = ContextVar("ltd_run_label", default=None)


class LineProgress:
    """The part of tqdm the engine uses, as one plain line per update: for logs, CI and job logs, where a redrawn bar
    leaves carriage-return debris."""

    def __init__(self, desc: str, total: int, done: int, unit: str):
        self.desc, self.total, self.n, self.unit = desc, total, done, unit

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        print(f"{self.desc} [{self.n}/{self.total} {self.unit}]", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_mode() -> str:
    """'bar' on a terminal, 'lines' elsewhere; LTD_PROGRESS overrides ('ray': Ray workers whose driver has a
    terminal draw through tqdm_ray, one bar per run on the driver)."""
    mode = os.environ.get("LTD_PROGRESS")
    if mode in ("bar", "lines", "ray"):
        return mode
    return "bar" if sys.stderr.isatty() else "lines"


def labelled(desc: str) -> str:
    """`desc` after the name of the run this thread trains, when runs share the process."""
    label = RUN_LABEL.get()
    return desc if label is None else f"{label} {desc}"


def progress_bar(desc: str, total: int, done: int, unit: str):
    """A progress bar in the form `progress_mode` picks.

    Data-parallel ranks train in lockstep, so only rank 0 draws: one bar per run, not one per worker.
    """
    if not is_primary():
        return tqdm(total=total, initial=done, disable=True)
    desc = labelled(desc)
    mode = progress_mode()
    if mode == "ray":
        from ray.experimental.tqdm_ray import tqdm as tqdm_ray

        bar = tqdm_ray(desc=desc, total=total, unit=unit)
        bar.update(done)
        return bar
    if mode == "lines":
        return LineProgress(desc, total, done, unit)
    return tqdm(desc=desc, total=total, initial=done, unit=unit, dynamic_ncols=True, mininterval=1.0)


def learning_rate(cfg: OptimConfig, epoch: int) -> float:
    """LR of an epoch: linear warm-up, then step decay at fractions of the run (LDAM-DRW) or cosine to 0."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
    return cfg.lr * cfg.gamma**passed


def compiled(fn: Callable, mode: str) -> Callable:
    """`fn` (a module or function) through torch.compile, or `fn` itself for mode 'none'.

    Callers keep the result beside the model, never inside it, so state_dict keys and checkpoints are the same with
    and without compiling. Shapes stay static (`dynamic=False`): a short last batch gets its own graph.
    """
    return fn if mode == "none" else torch.compile(fn, mode=mode, dynamic=False)


def begin_compiled_step(mode: str) -> None:
    """Tell CUDA graphs (mode 'reduce-overhead') that a training step starts, so the last step's graph outputs may be
    overwritten; the loss of a compiled objective calls it first. Other modes skip it, and its 0.6 s first import.
    """
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


_autotuning = {"lock": threading.Lock(), "inside": 0, "before": False}


@contextmanager
def cudnn_autotuning(enabled: bool):
    """cuDNN's benchmark mode inside the block, the caller's setting restored after it. (torch.backends.cudnn.flags
    would also reset the other cuDNN flags to its own defaults.)

    The flag is process-wide: with runs training in threads (trainer/packing.py) the first block in sets it and the
    last one out restores it, so one run ending does not switch it under another still training.
    """
    with _autotuning["lock"]:
        if _autotuning["inside"] == 0:
            _autotuning["before"] = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = enabled
        _autotuning["inside"] += 1
    try:
        yield
    finally:
        with _autotuning["lock"]:
            _autotuning["inside"] -= 1
            if _autotuning["inside"] == 0:
                torch.backends.cudnn.benchmark = _autotuning["before"]


def fit(
    *,
    stage: str,
    model: nn.Module,
    loss_fn: LossFn,
    batches,
    optim: OptimConfig,
    generator: torch.Generator,
    checkpoint: Path,
    meta: dict,
    set_mode: Callable[[], None] | None = None,
    on_epoch_end: Callable[[int], dict] | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    cuda_graph: bool = False,
    cudnn_benchmark: bool = False,
) -> list[dict]:
    """Train `model`'s trainable parameters for `optim.epochs`, checkpointing every epoch and resuming from it.

    `model` holds every stateful part of the stage (MoCo queue included), so one state_dict resumes it exactly; the
    sampler/augmentation generator state is saved too, so a resumed run draws the same batches as an unbroken one.
    Data-parallel (inside a process group, see trainer/distributed.py): rank 0 alone reads and writes the checkpoint
    and hands its state to the other ranks, the loss runs through DDP, and the epoch record sums every rank's images.
    `precision` 'bf16' runs the loss (the forward passes) under bfloat16 autocast; backward and the SGD step stay
    outside it, and bf16 keeps fp32's range, so no loss scaling is needed.
    `channels_last` converts the model's 4-D weights to NHWC in place (parameters keep their identity, so optimizers
    and compiled wrappers made beforehand stay valid); convolutions then produce NHWC activations from NCHW inputs.
    `cuda_graph` replays each full batch's whole step (forward, backward, SGD update) from one CUDA graph, captured
    anew every epoch (trainer/graphs.py); on a CPU it is ignored with a warning.
    `cudnn_benchmark` lets cuDNN time its convolution algorithms for each new shape (the first steps, and an epoch's
    short last batch once) and keep the fastest.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    device_type = params[0].device.type
    if cuda_graph and (device_type != "cuda" or is_distributed()):
        log.warning("%s: cuda_graph needs one CUDA device, training eagerly on %s", stage,
                    "several workers" if is_distributed() else device_type)
        cuda_graph = False
    # A captured step must not reuse autocast's per-forward cache of cast weights across replays.
    mixed = torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=not cuda_graph)
    optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    start, history = 0, []
    hooks = worker_hooks()
    state = load_checkpoint(checkpoint, expect=meta) if is_primary() and checkpoint.exists() else None
    state = broadcast_object(state)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, history = state["epoch"] + 1, list(state["history"])
        if start < optim.epochs:
            log.info("%s: resuming at epoch %d/%d from %s", stage, start + 1, optim.epochs, checkpoint)
    objective = data_parallel_loss(model, loss_fn, hooks.sync_batchnorm) if is_distributed() else loss_fn
    # A source that draws before it augments (DeviceBatches) hands each step its draw, and the step realizes it: the
    # augmentation then runs inside the step, and inside its CUDA graph. Other sources hand over finished batches.
    drawn = hasattr(batches, "draws")

    def train_step(batch: Batch | Draw, progress: float) -> tuple[torch.Tensor, dict]:
        if drawn:
            batch = batches.realize(batch)
        with mixed:
            loss, parts = objective(batch, progress)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, parts

    step = GraphedStep(train_step) if cuda_graph else train_step
    bar = progress_bar(f"stage {stage}", optim.epochs, start, "ep")
    with cudnn_autotuning(cudnn_benchmark):
        for epoch in range(start, optim.epochs):
            lr = learning_rate(optim, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            (set_mode or model.train)()
            progress = epoch / optim.epochs
            totals: dict = {}  # sums stay on the device until the epoch ends: no host sync per step
            seen, tic = 0, time.perf_counter()
            if cuda_graph:
                step.reset()  # the learning rate and `progress` are frozen into a capture
                replays_before = step.replays
            for batch in (batches.draws if drawn else batches.epoch)(progress, generator):
                loss, parts = step(batch, progress)
                n = len(batch.labels)
                seen += n
                for key, value in {"loss": loss.detach(), **parts}.items():
                    value = value.double() if torch.is_tensor(value) else float(value)
                    totals[key] = totals.get(key, 0.0) + value * n
            totals = {key: float(value) for key, value in totals.items()}
            elapsed = time.perf_counter() - tic
            if is_distributed():
                totals, seen = all_reduce_sums(totals, seen)
                broadcast_module_state(model)  # rank 0's BatchNorm statistics everywhere: eval and save see one model
            record = {"epoch": epoch + 1, "lr": lr, "img_s": seen / max(elapsed, 1e-9)}
            if cuda_graph:
                record["graph_replays"] = step.replays - replays_before  # the epoch's steps run from the CUDA graph
            record.update({k: v / max(seen, 1) for k, v in totals.items()})
            if on_epoch_end is not None:
                record.update(on_epoch_end(epoch))
            history.append(record)
            bar.set_description(labelled(f"stage {stage}") + f" loss {record['loss']:.3f} {record['img_s']:.0f} img/s")
            bar.update(1)
            log.debug("stage %s %s", stage, record)
            if is_primary():
                save_checkpoint(checkpoint, {
                    **meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "epoch": epoch, "history": history,
                })
            if hooks.after_epoch is not None:
                hooks.after_epoch(stage, checkpoint, record)  # Ray Train: report the epoch and its checkpoint
    bar.close()
    return history


@torch.no_grad()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels and ids for a whole split, in order, without augmentation."""
    logits, labels, ids = [], [], []
    for batch in batches.epoch():
        logits.append(forward(batch.images).float().cpu())
        labels.append(batch.labels.cpu())
        ids.append(batch.ids.cpu())
    if getattr(batches, "shard", None) is not None:  # data-parallel: each rank predicted its shard of the split
        return gather_split(*(torch.cat(x) if x else torch.empty(0) for x in (logits, labels, ids)))
    return torch.cat(logits), torch.cat(labels), torch.cat(ids)
