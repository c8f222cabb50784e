"""Whole training steps as CUDA graphs: forward, backward and the SGD update captured once an epoch, then replayed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from trainer.batches import Batch, Draw

Step = Callable[[Batch | Draw, float], tuple[torch.Tensor, dict]]


def _tensor_fields(batch: Batch | Draw) -> dict[str, torch.Tensor]:
    return {f.name: v for f in dataclasses.fields(batch) if isinstance(v := getattr(batch, f.name), torch.Tensor)}


def _same_layout(a: Batch | Draw, b: Batch | Draw) -> bool:
    """Whether `b` can be copied into `a`'s tensors: the same fields, shapes and dtypes."""
    fa, fb = _tensor_fields(a), _tensor_fields(b)
    return fa.keys() == fb.keys() and all(fa[k].shape == fb[k].shape and fa[k].dtype == fb[k].dtype for k in fa)


class GraphedStep:
    """`step(batch, progress)` (forward, loss, backward, optimizer update) replayed from one CUDA graph.

    Why: a ResNet-32 step at batch 128 is about a thousand kernels of a few microseconds each, so on a large GPU the
    launches, not the arithmetic, set the pace (bench/README.md). torch.compile's CUDA graphs cover the network, but
    the loss, the MoCo queue and the SGD update still launch one by one; a graph of the whole step is one launch.

    What CUDA graphs ask, and how it is met here:
    - fixed shapes and addresses: each batch is copied into the static batch the graph reads, and a batch of another
      shape (an epoch's short last batch) runs eagerly;
    - no host syncs and no data-dependent shapes inside the step: the stage steps have none, and DeviceBatches draws
      its random parameters on the host before the step (a Draw), so the step only gathers and augments on the device;
    - Python values are frozen at capture (the learning rate, `progress`): `reset()` at each epoch start makes the
      epoch's first batch capture the step anew;
    - lazy CUDA set-up (library handles, workspaces) must not happen while capturing: the first `warmup` steps run
      eagerly on the side stream the captures then use, as PyTorch's CUDA-graph notes prescribe.
    SGD keeps no step counter, so its update replays as is; its momentum buffers exist after the first eager step.
    Autocast must run with cache_enabled=False around a captured step (engine.fit does).
    """

    def __init__(self, step: Step, warmup: int = 3):
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batch | None = None
        self.outputs: tuple[torch.Tensor, dict] | None = None
        self.captures = self.replays = 0
        self.stream: torch.cuda.Stream | None = None  # warm-up and capture stream, made on first use

    def reset(self) -> None:
        """Drop the graph (and its memory pool): the next full batch captures the step with the current values."""
        self.graph = self.static = self.outputs = None

    def _side_stream(self) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def _warm(self, batch: Batch, progress: float):
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(batch, progress)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def __call__(self, batch: Batch | Draw, progress: float) -> tuple[torch.Tensor, dict]:
        if self.warmup > 0:
            self.warmup -= 1
            return self._warm(batch, progress)
        if self.graph is not None and not _same_layout(self.static, batch):
            return self.step(batch, progress)
        if self.graph is None:
            if not isinstance(batch, (Batch, Draw)):  # e.g. BBN's PairedBatch: nested batches would be frozen in
                raise TypeError(f"cuda_graph replays flat Batch or Draw objects, not {type(batch).__name__}; set "
                                "cuda_graph=false")
            self.static = dataclasses.replace(batch, **{k: v.clone() for k, v in _tensor_fields(batch).items()})
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: runs training in other threads of this process (trainer/packing.py) keep
                # allocating and syncing on their own streams while this one captures.
                with torch.cuda.graph(graph, stream=self._side_stream(), capture_error_mode="thread_local"):
                    loss, parts = self.step(self.static, progress)
                # Replays rewrite the loss in place; detached, it no longer keeps the captured autograd graph (and
                # its side-stream AccumulateGrad nodes) alive into the next eager step on the default stream.
                self.outputs = (loss.detach(), parts)
            except RuntimeError as err:
                raise RuntimeError(f"cuda_graph: this training step cannot be captured as a CUDA graph ({err}); "
                                   "set cuda_graph=false (checkpoints of finished epochs are kept)") from err
            self.graph = graph
            self.captures += 1
        else:
            for name, value in _tensor_fields(batch).items():
                getattr(self.static, name).copy_(value, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.outputs
