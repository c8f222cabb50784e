"""Training throughput (images/s) of SSD stages I and III: our on-device batches vs a plain DataLoader loop; with
--runs-per-gpu K1,K2,... the aggregate and per-run images/s of K runs training at once in this process
(trainer/packing.py: one thread and one CUDA stream per run)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import v2

from trainer.batches import Batch, DeviceBatches, Draw
from trainer.config import AugmentConfig, DataConfig, OptimConfig, RunConfig, Stage3Config
from trainer.datasets import LongTailData, load_dataset
from trainer.engine import LossFn, fit
from trainer.context import RunContext
from trainer.packing import own_stream
from trainer.stages import distill_objective, stage1_objective
from trainer.report import device_tag, write_results
from trainer.soft_targets import InMemorySoftLabels, TableTargets

log = logging.getLogger("bench.train_throughput")

ARCH = "resnet32"
IMBALANCE_FACTOR = 100


def load_data() -> LongTailData:
    """CIFAR-10-LT (IF 100) from our npz copy; the procedural images when the npz is not on this machine."""
    try:
        return load_dataset(DataConfig(name="cifar10_npz", imbalance_factor=IMBALANCE_FACTOR))
    except FileNotFoundError as err:
        log.warning("CIFAR-10 npz not found (%s); falling back to synthetic images", err)
        return load_dataset(DataConfig(name="synthetic", imbalance_factor=IMBALANCE_FACTOR))


def context(data: LongTailData, device: torch.device, compile_mode: str = "none", precision: str = "fp32",
            channels_last: bool = False, cuda_graph: bool = False, cudnn_benchmark: bool = False) -> RunContext:
    """An SSD run context with the paper's ResNet-32 (stage objectives read model, MoCo and KD settings from it).

    The defaults are the plain loop's: fp32, eager, NCHW, no cuDNN autotuning (torch's default)."""
    cfg = RunConfig(method="ssd", model={"arch": ARCH}, compile=compile_mode, precision=precision,
                    channels_last=channels_last, cuda_graph=cuda_graph, cudnn_benchmark=cudnn_benchmark,
                    out_dir=Path(tempfile.gettempdir()) / "ltd-bench")
    return RunContext(cfg, data, device, cfg.out_dir)


def soft_label_source(data: LongTailData) -> InMemorySoftLabels:
    """A teacher-logit table for stage III (values do not matter for throughput; the lookup does)."""
    logits = 3.0 * torch.randn(len(data.train), data.num_classes, generator=torch.Generator().manual_seed(0))
    return InMemorySoftLabels(logits, Stage3Config().temperature)


# --- Batch sources: ours (DeviceBatches) and the plain per-image PIL + torchvision transforms + DataLoader recipe.

@dataclass
class Stream:
    """Endless step inputs and how a step turns one into a Batch (engine.fit's draws / realize)."""

    inputs: Iterator[Batch | Draw]
    realize: Callable[[Batch | Draw], Batch] = lambda batch: batch

    def close(self) -> None:
        self.inputs.close()  # stops a DataLoader's workers


def device_stream(data: LongTailData, device: torch.device, batch_size: int, key_view: bool) -> Stream:
    """Endless draws from DeviceBatches (the path make_batches takes for CIFAR), epoch after epoch; each step realizes
    (gathers and augments) its draw, as in training."""
    batches = DeviceBatches(data.train, data.mean, data.std, device, batch_size, AugmentConfig(), key_view=key_view)

    def endless() -> Iterator[Draw]:
        generator = torch.Generator().manual_seed(1)
        while True:
            yield from batches.draws(0.0, generator)

    return Stream(endless(), batches.realize)


def plain_transforms(size: int, mean, std, key_view: bool, flavour: str):
    """RandomCrop(pad 4) + flip (query) and the MoCo-v2 key view, per PIL image, in torchvision v1 or v2.

    v1 (ToTensor) is the default baseline: it is what CIFAR-LT code (LDAM-DRW, SSD) writes, and on 32-px PIL images
    it is the faster of the two here (about 60 vs 100 µs per query image), so it is the stronger baseline.
    """
    t = T if flavour == "v1" else v2
    tail = [T.ToTensor()] if flavour == "v1" else [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    tail.append(t.Normalize(mean, std))
    query = t.Compose([t.RandomCrop(size, padding=4), t.RandomHorizontalFlip(), *tail])
    if not key_view:
        return query, None
    key = t.Compose([
        t.RandomResizedCrop(size, scale=(0.2, 1.0)),
        t.RandomApply([t.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        t.RandomGrayscale(p=0.2),
        t.RandomHorizontalFlip(),
        *tail,
    ])
    return query, key


class PlainCifar(Dataset):
    """The usual CIFAR dataset (as torchvision.datasets.CIFAR10): HWC uint8 rows -> PIL image -> transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform, key_transform=None):
        self.data = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
        self.labels = labels.tolist()
        self.transform, self.key_transform = transform, key_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.data[i])
        key = self.key_transform(image) if self.key_transform is not None else torch.empty(0)
        return i, self.labels[i], self.transform(image), key


@dataclass
class LoaderBatch(Batch):
    """A baseline batch: Batch plus the soft-label rows the plain loop moves alongside the images."""

    soft: torch.Tensor | None = None  # stage III: soft-label rows looked up on the CPU, moved with the batch


def loader_stream(data: LongTailData, device: torch.device, batch_size: int, workers: int, key_view: bool,
                  flavour: str, soft_table: torch.Tensor | None) -> Stream:
    """Endless batches of the plain loop: DataLoader(shuffle, workers, pin_memory on CUDA), then .to(device)."""
    query, key = plain_transforms(data.train.images.shape[-1], data.mean, data.std, key_view, flavour)
    dataset = PlainCifar(data.train.images, data.train.labels, query, key)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=cuda,
                        generator=torch.Generator().manual_seed(1))

    def endless() -> Iterator[Batch]:
        while True:  # one pass per epoch, workers restarting each time, as `for epoch ...: for batch in loader` does
            for ids, labels, images, keys in loader:
                yield LoaderBatch(
                    ids=ids.to(device, non_blocking=cuda), labels=labels.to(device, non_blocking=cuda),
                    images=images.to(device, non_blocking=cuda),
                    key_images=keys.to(device, non_blocking=cuda) if keys.numel() else None,
                    soft=soft_table[ids].to(device, non_blocking=cuda) if soft_table is not None else None,
                )

    return Stream(endless())


# --- Timing through the real loop.

class Window:
    """A batch source for engine.fit: its epoch 0 takes `warmup` inputs from the stream, epoch 1 the `steps` timed.

    fit times each epoch itself (img_s in its history); synchronising CUDA at the end of the generator puts the last
    step's kernels inside that timed span.
    """

    def __init__(self, stream: Stream, warmup: int, steps: int, device: torch.device):
        self.stream, self.warmup, self.steps, self.device = stream, warmup, steps, device
        self.realize = stream.realize
        self.calls = 0

    def draws(self, progress: float = 0.0, generator: torch.Generator | None = None) -> Iterator[Batch | Draw]:
        count = self.warmup if self.calls == 0 else self.steps
        self.calls += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for _ in range(count):
            yield next(self.stream.inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def tuned_context(data: LongTailData, device: torch.device, args) -> RunContext:
    """Our step as the command line tunes it (compile, precision, layout, CUDA graph, cuDNN autotuning)."""
    return context(data, device, args.compile, args.precision, args.channels_last, args.cuda_graph,
                   args.cudnn_benchmark)


def measure(stage: str, parts: nn.Module, loss_fn: LossFn, stream: Stream, warmup: int, steps: int,
            device: torch.device, cfg: RunConfig) -> float:
    """Images/s over `steps` training steps after `warmup` untimed ones, through engine.fit (SGD, zero_grad, step)."""
    optim = OptimConfig(epochs=2, warmup_epochs=0, batch_size=1)  # lr schedule and batch_size do not affect timing
    try:
        with tempfile.TemporaryDirectory() as tmp:
            history = fit(stage=stage, model=parts, loss_fn=loss_fn, batches=Window(stream, warmup, steps, device),
                          optim=optim, generator=torch.Generator().manual_seed(0),
                          checkpoint=Path(tmp) / "checkpoint.pt", meta={}, precision=cfg.precision,
                          channels_last=cfg.channels_last, cuda_graph=cfg.cuda_graph,
                          cudnn_benchmark=cfg.cudnn_benchmark)
    finally:
        stream.close()
    return history[1]["img_s"]


def profile_step(stage: str, parts: nn.Module, loss_fn: LossFn, stream: Stream, warmup: int, steps: int,
                 device: torch.device, cfg: RunConfig, top: int = 15) -> dict:
    """Where one of our steps spends its time: torch.profiler over `steps` steps after `warmup` unrecorded ones.

    Returns kernel launches per step (CUDA: cudaLaunchKernel + cudaGraphLaunch calls, so a step captured in a CUDA
    graph counts its graph once) and the `top` ops by self device time (CPU time on a CPU), in ms per step.
    """
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, schedule=schedule(wait=warmup, warmup=1, active=steps)) as prof:

        def stepped():
            for draw in stream.inputs:
                prof.step()
                yield draw

        measure(stage, parts, loss_fn, Stream(stepped(), stream.realize), warmup + 1, steps, device, cfg)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaGraphLaunch", "cuLaunchKernel"))
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    return {"launches_per_step": round(launches / steps, 1) if cuda else None,
            "top_ops_ms_per_step": [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
                                     "ms": round(getattr(e, key, 0) / 1000 / steps, 3)} for e in ranked]}


def bench_stage(stage: str, data: LongTailData, device: torch.device, args, workers: int) -> dict:
    """One row: the best images/s of ours and of the baseline over `rounds` alternating measurements.

    Best, not mean, as timeit does: on a shared machine other work only ever slows a run down (on 2 busy cores a
    2-thread OpenMP step can stall many times over), so the fastest run is the closest to what the code costs.
    With --compile, --precision bf16, --channels-last (the default), --cuda-graph or --cudnn-benchmark (on a GPU),
    "ours" is that step and "ours_untuned" the same pipeline in fp32, eager, NCHW, without autotuning (the row's
    untuned_img_s), so the row separates what the input pipeline gives from what the tuning gives; the baseline is
    always the plain fp32 eager NCHW loop with torch's default (no) cuDNN autotuning.
    """
    runs: dict[str, list[float]] = {"ours": [], "baseline": []}
    tuned = args.compile != "none" or args.precision != "fp32" or args.channels_last or args.cuda_graph
    tuned |= args.cudnn_benchmark and device.type == "cuda"
    if tuned:
        runs["ours_untuned"] = []
    source = soft_label_source(data) if stage == "III" else None
    for _ in range(args.rounds):
        for side in runs:
            ours = side == "ours"
            ctx = tuned_context(data, device, args) if ours else context(data, device)
            if stage == "I":
                parts, loss_fn = stage1_objective(ctx)
            elif side != "baseline":
                parts, loss_fn = distill_objective(ctx, TableTargets(source, len(data.train), device))
            else:
                parts, loss_fn = distill_objective(ctx, lambda b: b.soft)
            if side != "baseline":
                stream = device_stream(data, device, args.batch_size, key_view=stage == "I")
            else:
                soft_cpu = TableTargets(source, len(data.train), torch.device("cpu")).table if source else None
                stream = loader_stream(data, device, args.batch_size, workers, stage == "I", args.baseline_transforms,
                                       soft_cpu)
            img_s = measure(stage, parts, loss_fn, stream, args.warmup, args.steps, device, ctx.cfg)
            runs[side].append(img_s)
            log.info("stage %s %-10s %8.1f img/s", stage, side, img_s)
    profile = {}
    if args.profile:  # one more run of ours, recorded op by op (kept out of the timed runs: profiling slows them)
        ctx = tuned_context(data, device, args)
        parts, loss_fn = (stage1_objective(ctx) if stage == "I"
                          else distill_objective(ctx, TableTargets(source, len(data.train), device)))
        stream = device_stream(data, device, args.batch_size, key_view=stage == "I")
        profile = {"profile": profile_step(stage, parts, loss_fn, stream, args.warmup, args.profile, device,
                                           ctx.cfg)}
    ours_img_s, base_img_s = max(runs["ours"]), max(runs["baseline"])
    untuned = {"untuned_img_s": round(max(runs["ours_untuned"]), 1)} if "ours_untuned" in runs else {}
    return {
        "stage": stage, "ours_img_s": round(ours_img_s, 1), "baseline_img_s": round(base_img_s, 1),
        "ratio": round(ours_img_s / base_img_s, 3), "compile": args.compile, "precision": args.precision,
        "channels_last": args.channels_last, "cuda_graph": args.cuda_graph,
        "cudnn_benchmark": args.cudnn_benchmark and device.type == "cuda", **untuned,
        "device": device.type, "batch_size": args.batch_size,
        "steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
        "dataset": "cifar10_lt" if data.name == "cifar10_npz" else f"{data.name}_lt",
        "imbalance_factor": IMBALANCE_FACTOR, "num_train": len(data.train), "baseline_workers": workers,
        "baseline_transforms": args.baseline_transforms,
        **{f"{side}_runs": [round(x, 1) for x in values] for side, values in runs.items()}, **profile,
    }


class PackWindow(Window):
    """A Window whose timed epoch starts when every run of the pack is ready (a barrier) and records its span, so the
    aggregate rate is images over the wall time from the first start to the last end. It waits on its own stream,
    not the device, so a run's end does not wait for its neighbours' kernels."""

    def __init__(self, stream: Stream, warmup: int, steps: int, device: torch.device, barrier: threading.Barrier):
        super().__init__(stream, warmup, steps, device)
        self.barrier, self.span = barrier, (0.0, 0.0)

    def draws(self, progress: float = 0.0, generator: torch.Generator | None = None) -> Iterator[Batch | Draw]:
        timed = self.calls > 0
        count = self.steps if timed else self.warmup
        self.calls += 1
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.current_stream(self.device).synchronize()
        if timed:
            self.barrier.wait()
        start = time.perf_counter()
        for _ in range(count):
            yield next(self.stream.inputs)
        if cuda:
            torch.cuda.current_stream(self.device).synchronize()
        if timed:
            self.span = (start, time.perf_counter())


def bench_packed(stage: str, k: int, data: LongTailData, device: torch.device, args) -> dict:
    """One row: K runs (seeds 0..K-1) of our tuned step training at once, one thread and one CUDA stream each, as
    `ltd reproduce --runs-per-gpu K` runs them; the best of `rounds` measurements of aggregate images/s."""
    source = soft_label_source(data) if stage == "III" else None
    best: dict = {}
    for _ in range(args.rounds):
        barrier, windows, rates, errors = threading.Barrier(k), [None] * k, [0.0] * k, []

        def one(i: int) -> None:
            try:
                with own_stream(device):
                    ctx = tuned_context(data, device, args)
                    ctx.cfg = ctx.cfg.model_copy(update={"seed": i})
                    parts, loss_fn = (stage1_objective(ctx) if stage == "I"
                                      else distill_objective(ctx, TableTargets(source, len(data.train), device)))
                    stream = device_stream(data, device, args.batch_size, key_view=stage == "I")
                    windows[i] = PackWindow(stream, args.warmup, args.steps, device, barrier)
                    rates[i] = _fit_window(stage, parts, loss_fn, windows[i], ctx.cfg)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                errors.append(err)
                barrier.abort()

        threads = [threading.Thread(target=one, args=(i,), name=f"bench-run{i}") for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        wall = max(w.span[1] for w in windows) - min(w.span[0] for w in windows)
        aggregate = k * args.steps * args.batch_size / wall
        log.info("stage %s K=%-2d aggregate %8.1f img/s, per run %8.1f", stage, k, aggregate, aggregate / k)
        if aggregate > best.get("aggregate_img_s", 0):
            best = {"aggregate_img_s": round(aggregate, 1), "per_run_img_s": round(aggregate / k, 1),
                    "per_run_fit_img_s": [round(r, 1) for r in rates]}
    return {"stage": stage, "runs_per_gpu": k, **best, "moco": stage == "I", "compile": args.compile,
            "precision": args.precision, "channels_last": args.channels_last, "cuda_graph": args.cuda_graph,
            "cudnn_benchmark": args.cudnn_benchmark and device.type == "cuda", "device": device.type,
            "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
            "torch_threads": torch.get_num_threads(),
            "dataset": "cifar10_lt" if data.name == "cifar10_npz" else f"{data.name}_lt", "arch": ARCH}


def _fit_window(stage: str, parts: nn.Module, loss_fn: LossFn, window: Window, cfg: RunConfig) -> float:
    """`measure` on a given window: the timed epoch's images/s as engine.fit records it."""
    optim = OptimConfig(epochs=2, warmup_epochs=0, batch_size=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            history = fit(stage=stage, model=parts, loss_fn=loss_fn, batches=window, optim=optim,
                          generator=torch.Generator().manual_seed(0), checkpoint=Path(tmp) / "checkpoint.pt",
                          meta={}, precision=cfg.precision, channels_last=cfg.channels_last,
                          cuda_graph=cfg.cuda_graph, cudnn_benchmark=cfg.cudnn_benchmark)
    finally:
        window.stream.close()
    return history[1]["img_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per measurement (default 20 CPU, 200 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 3 CPU, 20 GPU)")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating ours/baseline measurements; best kept")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None, help="Baseline DataLoader workers (min(4, cpu_count))")
    parser.add_argument("--baseline-transforms", choices=("v1", "v2"), default="v1",
                        help="torchvision transforms API of the baseline (v1 is the faster on PIL images)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core); 1 is steadier on a busy machine")
    parser.add_argument("--stages", default="I,III", help="Comma-separated stages to run")
    parser.add_argument("--compile", choices=("none", "default", "reduce-overhead"), default="none",
                        help="torch.compile our step (RunConfig.compile); the eager pipeline is then measured too")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="Our step's forward under bf16 autocast (RunConfig.precision); fp32 eager measured too")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        default=RunConfig.model_fields["channels_last"].default,
                        help="Our model in NHWC layout (RunConfig.channels_last, on by default); NCHW measured too")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="Replay our whole step from a CUDA graph (RunConfig.cuda_graph; default: on a GPU, as "
                             "training's 'auto')")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction,
                        default=RunConfig.model_fields["cudnn_benchmark"].default,
                        help="cuDNN autotuning in our step (RunConfig.cudnn_benchmark, on by default); GPU only")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="Also profile STEPS of our steps (torch.profiler): launches per step and the top ops")
    parser.add_argument("--runs-per-gpu", default=None, metavar="K1,K2,...",
                        help="Instead of ours vs the plain loop: K runs at once in this process for each K "
                             "(aggregate and per-run img/s), written to train_throughput_packing*.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    gpu = args.device != "cpu" and torch.cuda.is_available()
    args.steps = args.steps or (200 if gpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (20 if gpu else 3)
    if args.cuda_graph is None:  # as training's 'auto': on a GPU, unless torch.compile brings its own graphs
        args.cuda_graph = gpu and args.compile == "none"
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu" and device_tag() != "cpu":
        log.warning("timing on the CPU of a GPU machine: the result file is still named after the GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    data = load_data()
    if args.compile != "none":  # compile the short last batch's graph too before timing: warm up past an epoch's end
        args.warmup = max(args.warmup, -(-len(data.train) // args.batch_size) + 1)
    log.info("%s-LT: %d training images, %s on %s, %d torch threads, %d baseline workers",
             data.name, len(data.train), ARCH, device, torch.get_num_threads(), workers)
    packing = [int(k) for k in args.runs_per_gpu.split(",")] if args.runs_per_gpu else None
    if packing:
        rows = [bench_packed(stage, k, data, device, args) for stage in args.stages.split(",") for k in packing]
    else:
        rows = [bench_stage(stage, data, device, args, workers) for stage in args.stages.split(",")]
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    suffix = ("_compile" if args.compile != "none" else "") + ("_bf16" if args.precision == "bf16" else "")
    suffix += ("_graph" if args.cuda_graph else "") + ("" if args.channels_last else "_nchw")
    suffix += "" if args.cudnn_benchmark or device.type != "cuda" else "_noautotune"
    name = "train_throughput" + ("_packing" if packing else "") + suffix
    path = write_results("train_throughput", rows, command=command, out_dir=args.out, name=name,
                         extra={"arch": ARCH, "torch_threads": torch.get_num_threads()})
    if packing:
        summary = ", ".join(f"stage {r['stage']} K={r['runs_per_gpu']} {r['aggregate_img_s']:.0f} img/s "
                            f"({r['per_run_img_s']:.0f} per run)" for r in rows)
    else:
        summary = ", ".join(f"stage {r['stage']} {r['ours_img_s']:.0f} vs {r['baseline_img_s']:.0f} img/s "
                            f"(x{r['ratio']:.2f})" for r in rows)
    log.info("%s -> %s", summary, path)


if __name__ == "__main__":
    main()
