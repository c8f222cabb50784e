"""What every stage of one run shares (config, data, device, run folder) and how a stage is scored.

Both the SSD/decoupled stages (`trainer/stages.py`) and the multi-expert stages (`trainer/expert_stages.py`) build
on this module, so neither imports the other's internals.
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.batches import eval_resize, make_batches
from trainer.config import RunConfig, dump_config
from trainer.datasets import LongTailData, load_dataset
from trainer.distributed import current_shard
from trainer.engine import fit, predict
from trainer.export import ModelSpec, head_kind
from trainer.folder import write_skipped
from trainer.metrics import summarize
from trainer.models import Classifier

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every stage of one run shares: the resolved config, the data, the device and the run folder."""

    cfg: RunConfig
    data: LongTailData
    device: torch.device
    out_dir: Path
    shard: tuple[int, int] | None = None  # (rank, world) when training data-parallel under Ray Train
    stage1_reused: Path | None = None  # the stage1_cache entry this run's stage I came from, if any

    def meta(self, stage: str) -> dict:
        """What a stage's checkpoint must match to be resumed: dataset fingerprint and the config it depends on."""
        if stage == "I":  # the recipe, not the method: an LWS run may start from a CE run's stage I
            recipe = json.dumps(self.cfg.stage1_recipe(), sort_keys=True)
            return {"fingerprint": self.data.fingerprint, "config": recipe}
        keep = {"data", "model", "augment", "seed", "method", "stage1", "stage2"}
        keep |= {"stage3"} if stage in ("III", "IV") else set()
        keep |= {"stage4"} if stage == "IV" else set()
        return {"fingerprint": self.data.fingerprint, "config": self.cfg.model_dump_json(include=keep)}

    @property
    def cuda_graph(self) -> bool:
        """Whether training steps replay from CUDA graphs: cuda_graph=true, or 'auto' where the graphed step was
        checked against eager on a GPU: one CUDA device, no torch.compile, the joint/decoupled/SSD steps, batches
        from an in-memory dataset (list-file datasets and their DataLoader have not trained graphed on a GPU yet)."""
        if self.cfg.cuda_graph != "auto":
            return self.cfg.cuda_graph
        return (self.device.type == "cuda" and self.shard is None and self.cfg.compile == "none"
                and self.cfg.pipeline != "experts" and self.data.in_memory)

    def fit(self, **kwargs) -> list[dict]:
        """engine.fit at this run's precision, memory layout, graph mode and cuDNN autotuning: every stage trains
        through here."""
        return fit(precision=self.cfg.precision, channels_last=self.cfg.channels_last, cuda_graph=self.cuda_graph,
                   cudnn_benchmark=self.cfg.cudnn_benchmark, **kwargs)

    def generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1000 + salt)

    def batches(self, split, *, train: bool, batch_size: int = 256, sampler: str = "instance", key_view=False,
                view_records=None):
        return make_batches(self.data, split, self.device, batch_size, train=train, augment_cfg=self.cfg.augment,
                            sampler=sampler, key_view=key_view, image_size=self.cfg.data.image_size,
                            num_workers=self.cfg.data.num_workers, view_records=view_records, shard=self.shard)

    def spec(self, model: Classifier, role: str, metrics: dict | None = None) -> ModelSpec:
        """The self-description saved with a model file (see trainer/export.py)."""
        kind, args = head_kind(getattr(model, "head", model))  # a multi-expert net describes itself
        data = self.data
        size = int(data.train.images.shape[-1]) if data.in_memory else self.cfg.data.image_size
        return ModelSpec(arch=self.cfg.model.arch, in_channels=data.in_channels, num_classes=data.num_classes,
                         head=kind, head_args=args, resize=size if data.in_memory else eval_resize(size),
                         class_names=[str(c) for c in data.class_names], mean=list(data.mean),
                         std=list(data.std), image_size=size, role=role, method=self.cfg.method,
                         fingerprint=data.fingerprint, metrics=metrics or {})


_GLOBAL_RNG = threading.RLock()


@contextmanager
def seeded(seed: int):
    """torch's global RNG seeded with `seed` inside the block (module constructors draw their initial weights from
    it) and restored after it, under a process-wide lock: runs training in threads (trainer/packing.py) then each
    initialise exactly as they would alone. Nothing else in training reads the global CPU RNG (augmentation,
    samplers, MoCo and the SEQL loss take generators), so holding the lock only around initialisation suffices."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # also seeds the CUDA generators, as it did before runs shared a process
        yield


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions; without them bf16 autocast is emulated, and far slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: no way to tell, so no warning
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def prepare(cfg: RunConfig, data: LongTailData | None = None) -> RunContext:
    """Load the data, pick the device, create the run folder and write the resolved config into it."""
    if cfg.precision == "bf16" and resolve_device(cfg.device).type == "cpu" and not cpu_has_bf16():
        log.warning("precision=bf16 on a CPU without bf16 instructions (avx512_bf16/amx_bf16): measured 15x slower "
                    "than fp32 on such a CPU; use precision=fp32")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    data = data or load_dataset(cfg.data)
    write_skipped(data, out_dir)  # skipped_images.json: the unreadable files a folder dataset left out
    return RunContext(cfg, data, resolve_device(cfg.device), out_dir, current_shard())


def evaluate(ctx: RunContext, forward, split=None, module: nn.Module | None = None) -> dict:
    """Last-epoch test metrics; `module` (the network behind `forward`) is put in eval mode first."""
    for m in (module, forward):
        if isinstance(m, nn.Module):
            m.eval()
    logits, labels, _ = predict(forward, ctx.batches(split or ctx.data.test, train=False))
    return summarize(logits.argmax(1), labels, ctx.data.class_counts)


def periodic_eval(ctx: RunContext, module: nn.Module, forward=None):
    """Test accuracy every `eval_every` epochs, for curves only (reports use the last epoch); fit restores modes."""
    if not ctx.cfg.eval_every:
        return None

    def hook(epoch: int) -> dict:
        if (epoch + 1) % ctx.cfg.eval_every:
            return {}
        return {"test_top1": evaluate(ctx, forward or module, module=module)["overall"]}

    return hook


def headline(result: dict) -> dict:
    return {k: result[k] for k in ("overall", "many", "medium", "few")}
