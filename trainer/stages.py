"""SSD stages I-IV and the baselines, composed from the pure parts and run through the one engine loop."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from store.content import label_content
from trainer.augment import crop_flip_to_boxes
from trainer.classifiers import LWSClassifier, NCMClassifier, TauNormClassifier, ncm_centroids, search_tau
from trainer.config import RunConfig
from trainer.datasets import LongTailData
from trainer.distributed import is_primary
from trainer.engine import LossFn, begin_compiled_step, compiled, predict
from trainer.losses import build_loss, kd_loss
from trainer.models import Classifier, TwoHeadStudent, build_backbone, build_classifier
from trainer.moco import MoCo
from trainer.export import save_model
from trainer.labels import sample_views, teacher_logits_block
from trainer.context import RunContext, evaluate, headline, periodic_eval, prepare, seeded
from trainer.soft_targets import (InMemorySoftLabels, InMemoryViewLabels, OnlineTargets, SoftLabelSource,
                                  TableTargets, ViewTargets)

log = logging.getLogger(__name__)


def stage1_objective(ctx: RunContext) -> tuple[nn.ModuleDict, LossFn]:
    """Stage I's trainable parts ({"model"}, plus {"moco"} for SSD) on the device, and its loss.

    Apart from train_stage1 so the throughput benchmark times exactly this step.
    """
    cfg, data = ctx.cfg.stage1, ctx.data
    use_moco = ctx.cfg.pipeline == "ssd" and cfg.moco.weight > 0
    with seeded(ctx.cfg.seed):
        model = build_classifier(ctx.cfg.model.arch, data.in_channels, data.num_classes,
                                 cosine_head=cfg.loss.name == "ldam")
        parts = nn.ModuleDict({"model": model})
        if use_moco:
            queue = min(cfg.moco.queue_size, len(data.train))
            parts["moco"] = MoCo(model.backbone, model.backbone.feature_dim, dim=cfg.moco.dim, queue_size=queue,
                                 momentum=cfg.moco.momentum, temperature=cfg.moco.temperature,
                                 label_aware=cfg.moco.label_aware)
    parts.to(ctx.device)
    criterion = build_loss(cfg.loss, torch.as_tensor(data.class_counts), ctx.generator(6)).to(ctx.device)
    backbone = compiled(model.backbone, ctx.cfg.compile)
    if use_moco:
        parts["moco"].compile_keys(ctx.cfg.compile)

    def loss_fn(batch, progress):
        begin_compiled_step(ctx.cfg.compile)
        features = backbone(batch.images)
        ce = criterion(model.head(features), batch.labels, progress)
        if not use_moco:
            return ce, {}
        contrastive = parts["moco"](features, batch.key_images, batch.labels)
        return ce + cfg.moco.weight * contrastive, {"ce": ce.detach(), "moco": contrastive.detach()}

    return parts, loss_fn


def train_stage1(ctx: RunContext, batches=None) -> Classifier:
    """Stage I (or a joint baseline): backbone + linear head with the configured loss; MoCo added for SSD.

    `batches` replaces the run's own batch source (bench/pipeline_parity.py feeds a plain DataLoader through it).
    """
    cfg, data = ctx.cfg.stage1, ctx.data
    parts, loss_fn = stage1_objective(ctx)
    model = parts["model"]
    checkpoint, meta = ctx.out_dir / "stage1" / "checkpoint.pt", ctx.meta("I")
    # Only a run that draws its own batches shares: other batches train another stage I.
    shared = stage1_cache_entry(ctx.cfg.stage1_cache, meta) if batches is None else None
    with stage1_claim(shared if ctx.shard is None else None):
        if shared is not None and shared.exists() and not checkpoint.exists() and is_primary():
            log.info("stage I: starting from %s, a finished stage I of the same recipe", shared)
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared, checkpoint)  # fit finds every epoch done and trains none
            ctx.stage1_reused = shared
        if batches is None:
            batches = ctx.batches(data.train, train=True, batch_size=cfg.optim.batch_size, sampler=cfg.sampler,
                                  key_view="moco" in parts)
        ctx.fit(stage="I", model=parts, loss_fn=loss_fn, batches=batches, optim=cfg.optim,
                generator=ctx.generator(1), checkpoint=checkpoint, meta=meta, on_epoch_end=periodic_eval(ctx, model))
        if shared is not None and not shared.exists() and is_primary():
            shared.parent.mkdir(parents=True, exist_ok=True)
            partial = shared.with_name(f"{shared.name}.{os.getpid()}.part")
            shutil.copyfile(checkpoint, partial)
            os.replace(partial, shared)  # whole or absent, even with several runs publishing at once
    return model


def stage1_cache_entry(cache: Path | None, meta: dict) -> Path | None:
    """Where a finished stage I of this recipe and dataset lives in `cache` (RunConfig.stage1_cache)."""
    if cache is None:
        return None
    return Path(cache) / f"stage1-{hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]}.pt"


@contextmanager
def stage1_claim(entry: Path | None):
    """Hold a cache entry's lock while its stage I is found or trained, so that runs of one recipe started at once
    (service jobs, separate commands) train it once: a later run waits, then starts from the published entry.

    The lock is an flock, released when its holder ends, crashed or not: after a trainer that died, the next run
    trains the stage I itself. Under Ray Train (several ranks) nothing is locked: ranks must not wait apart."""
    if entry is None:
        yield
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("stage I: waiting for another run that is training the same recipe (%s)", entry.name,
                     extra={"progress": {"stage": "I", "waiting": "for a run training the same stage I"}})
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:  # a filesystem without locks: runs may train it twice, and publish atomically
            log.warning("stage I: cannot lock %s (%s); runs started at once may each train it", lock.name, err)
        yield  # closing the file releases the lock


def features_of(ctx: RunContext, backbone: nn.Module, split) -> tuple[torch.Tensor, torch.Tensor]:
    backbone.eval()
    feats, labels, _ = predict(backbone, ctx.batches(split, train=False))
    return feats, labels


def rebalance(ctx: RunContext, model: Classifier) -> Classifier:
    """Stage II (Kang et al. 2020): freeze the backbone (BatchNorm in eval mode) and re-balance only the classifier."""
    cfg, data = ctx.cfg.stage2, ctx.data
    backbone = model.backbone.requires_grad_(False).eval()
    if cfg.method == "ncm":
        feats, labels = features_of(ctx, backbone, data.train)
        centroids, mean = ncm_centroids(feats, labels, data.num_classes)
        return Classifier(backbone, NCMClassifier(centroids, mean, cfg.ncm_metric)).to(ctx.device)
    if cfg.method == "tau_norm":
        tau = cfg.tau
        if tau is None:
            if data.val is None:
                raise ValueError("tau_norm without stage2.tau searches τ on a validation split: set data.val_per_class")
            feats, labels = features_of(ctx, backbone, data.val)
            tau, _ = search_tau(feats, labels, model.head.weight.detach().cpu())
            log.info("tau-norm: τ=%.1f picked on the validation split", tau)
        return Classifier(backbone, TauNormClassifier(model.head, float(tau))).to(ctx.device)
    if cfg.method == "crt":
        with seeded(ctx.cfg.seed + 2):
            head = nn.Linear(backbone.feature_dim, data.num_classes)  # cRT: re-initialised, re-trained
    else:
        head = LWSClassifier(model.head)
    head.to(ctx.device)
    _train_head(ctx, "II", backbone, head, ctx.cfg.stage2)
    return Classifier(backbone, head)


STAGE_SALT = {"I": 1, "II": 2, "III": 3, "IV": 4}


def _train_head(ctx: RunContext, stage: str, backbone: nn.Module, head: nn.Module, cfg) -> None:
    """Train a head with CE on a frozen backbone; features are computed without grad, BatchNorm stays in eval mode."""

    def loss_fn(batch, progress):
        with torch.no_grad():
            features = backbone(batch.images)
        return F.cross_entropy(head(features), batch.labels), {}

    def set_mode():
        backbone.eval()
        head.train()

    batches = ctx.batches(ctx.data.train, train=True, batch_size=cfg.optim.batch_size, sampler=cfg.sampler)
    salt = STAGE_SALT[stage]
    ctx.fit(stage=stage, model=head, loss_fn=loss_fn, batches=batches, optim=cfg.optim, generator=ctx.generator(salt),
        checkpoint=ctx.out_dir / f"stage{salt}" / "checkpoint.pt", meta=ctx.meta(stage), set_mode=set_mode)


def teacher_logits(ctx: RunContext, teacher: nn.Module) -> torch.Tensor:
    """The teacher (eval mode) over the un-augmented training set, rows in image-id order."""
    teacher.eval()
    logits, _, ids = predict(teacher, ctx.batches(ctx.data.train, train=False))
    out = torch.empty_like(logits)
    out[ids] = logits
    return out


def in_memory_source(ctx: RunContext, teacher: Classifier):
    """Soft labels straight from the teacher, without a store: clean rows, K replayable views, or the live teacher."""
    cfg, aug = ctx.cfg.stage3, ctx.cfg.augment
    if cfg.soft_labels in ("online", "official"):
        return OnlineTargets(teacher, cfg.temperature, batchnorm="train" if cfg.soft_labels == "official" else "eval")
    if cfg.soft_labels == "clean":
        return InMemorySoftLabels(teacher_logits(ctx, teacher), cfg.temperature)
    if not ctx.data.in_memory:
        raise ValueError("views-mode soft labels need an in-memory dataset (CIFAR, Fashion-MNIST); use clean or online")
    crops = sample_views(len(ctx.data.train), cfg.views_per_image, aug.crop_padding, aug.flip, ctx.generator(5))
    logits = teacher_logits_block(teacher, ctx.data.train.images, ctx.data.mean, ctx.data.std,
                                  crop_params=crops, padding=aug.crop_padding)
    h, w = ctx.data.train.images.shape[-2:]
    records = crop_flip_to_boxes(crops.reshape(-1, 3), aug.crop_padding, h, w).reshape(*crops.shape[:2], 5)
    return InMemoryViewLabels(logits, records, cfg.temperature)


def distill(ctx: RunContext, source) -> TwoHeadStudent:
    """Stage III: a new student learns CE on its hard head and T²-scaled KD from the soft labels on its soft head.

    `source` is a SoftLabelSource (clean rows; with `view_params` it holds K views the batches replay) or
    OnlineTargets (the teacher labels each live batch).
    """
    cfg, data = ctx.cfg.stage3, ctx.data
    if abs(source.temperature - cfg.temperature) > 1e-6:
        raise ValueError(f"soft labels are at T={source.temperature} but stage3.temperature={cfg.temperature}; "
                         "re-temper the labelset or change stage3.temperature")
    provenance = getattr(source, "provenance", None)
    if provenance is not None and provenance.dataset_fingerprint != data.fingerprint:
        raise ValueError(f"labelset {source.labelset_id} was made for dataset {provenance.dataset_fingerprint}, but "
                         f"this config's data is {data.fingerprint}: use the data config the teacher was run on")
    view_records = None
    if isinstance(source, OnlineTargets):
        targets = source
    elif getattr(source, "mode", "clean") == "views":
        targets = ViewTargets(source, len(data.train), ctx.device)
        view_records = torch.as_tensor(source.view_params(np.arange(len(data.train))))
    else:
        targets = TableTargets(source, len(data.train), ctx.device)
    student, loss_fn = distill_objective(ctx, targets)
    batches = ctx.batches(data.train, train=True, batch_size=cfg.optim.batch_size, sampler=cfg.sampler,
                          view_records=view_records)
    ctx.fit(stage="III", model=student, loss_fn=loss_fn, batches=batches, optim=cfg.optim, generator=ctx.generator(3),
        checkpoint=ctx.out_dir / "stage3" / "checkpoint.pt", meta=ctx.meta("III"),
        on_epoch_end=periodic_eval(ctx, student, lambda x: student(x)[1]))
    return student


def distill_objective(ctx: RunContext, targets) -> tuple[TwoHeadStudent, LossFn]:
    """Stage III's fresh two-head student on the device and its loss, given `targets(batch)` -> soft-label rows."""
    cfg, data = ctx.cfg.stage3, ctx.data
    with seeded(ctx.cfg.seed + 3):
        student = TwoHeadStudent(build_backbone(ctx.cfg.model.arch, data.in_channels), data.num_classes)
    student.to(ctx.device)
    forward = compiled(student, ctx.cfg.compile)

    def loss_fn(batch, progress):
        begin_compiled_step(ctx.cfg.compile)
        hard_logits, soft_logits = forward(batch.images)
        hard = F.cross_entropy(hard_logits, batch.labels)
        soft = kd_loss(soft_logits, targets(batch), cfg.temperature)
        return cfg.hard_weight * hard + cfg.soft_weight * soft, {"hard": hard.detach(), "kd": soft.detach()}

    return student, loss_fn


def rebalance_student_head(ctx: RunContext, student: TwoHeadStudent) -> Classifier:
    """Stage IV: LWS on one head of the distilled student (`stage4.head`), backbone frozen.

    The hard head is the default: the official stage-IV loader re-balances it, and on held-out data it beat the
    soft head on every seed we ran (docs/results.md). The soft head then only shapes the backbone through KD.
    """
    student.requires_grad_(False).backbone.eval()
    base = student.hard_head if ctx.cfg.stage4.head == "hard" else student.soft_head
    head = LWSClassifier(base).to(ctx.device)
    _train_head(ctx, "IV", student.backbone, head, ctx.cfg.stage4)
    return Classifier(student.backbone, head)


class RunsFailedError(RuntimeError):
    """Some runs of a batch failed; the others ran to the end (their folders hold their results)."""

    def __init__(self, failed: list[str], total: int):
        super().__init__(f"{len(failed)} of {total} runs failed (the others finished; re-running the same command "
                         "resumes from the runs' checkpoints):\n" + "\n".join(failed))


# matplotlib is not thread-safe (its text parser fails when two figures render at once): runs packed into one
# process (trainer/packing.py) draw their plots one at a time.
PLOTTING = threading.Lock()


def run_pipeline(cfg: RunConfig, source: SoftLabelSource | None = None, data: LongTailData | None = None) -> dict:
    """Train what `cfg.method` names, evaluate the last epoch on the test set, write metrics.json and plots.

    With `source` (a labelset reader) SSD skips stages I-II and distils from the stored soft labels.
    """
    from trainer.plots import plot_label_distributions, plot_per_class_accuracy

    ctx = prepare(cfg, data)
    report: dict = {"method": cfg.method, "dataset": ctx.data.name, "imbalance_factor": cfg.data.imbalance_factor,
                    "seed": cfg.seed, "lt_seed": cfg.data.lt_seed, "fingerprint": ctx.data.fingerprint,
                    "device": str(ctx.device), "class_counts": ctx.data.class_counts.tolist(),
                    "class_names": ctx.data.class_names, "stages": {}}

    def score(stage: str, forward, module: nn.Module | None = None) -> None:
        """A stage's test metrics; with a validation split (data.val_per_class) its held-out headline too, so
        variants can be compared without touching the test set."""
        report["stages"][stage] = evaluate(ctx, forward, module=module)
        if ctx.data.val is not None:
            report.setdefault("val", {})[stage] = headline(evaluate(ctx, forward, ctx.data.val, module=module))
        log.info("%s stage %s: test %s", cfg.method, stage,  # a run stopped later still says what each stage scored
                 " ".join(f"{k} {v:.2f}" for k, v in headline(report["stages"][stage]).items() if v is not None))

    if cfg.pipeline == "experts":
        from trainer.expert_stages import train_multi_expert

        final = train_multi_expert(ctx, report)  # BBN, RIDE, LFME, independent experts; fills report["stages"]
    elif source is None or cfg.pipeline != "ssd":
        model = train_stage1(ctx)
        if ctx.stage1_reused is not None:
            report["stage1_reused"] = str(ctx.stage1_reused)
        score("I", model)
        final = model
        if cfg.pipeline in ("decoupled", "ssd"):
            final = teacher = rebalance(ctx, model)
            score("II", teacher)
            if cfg.pipeline == "ssd":
                save_model(ctx.out_dir / "teacher.pt", teacher, ctx.spec(teacher, "teacher", report["stages"]["II"]))
                source = in_memory_source(ctx, teacher)
    distilled = None
    if cfg.pipeline == "ssd":
        report["soft_labels"] = {"mode": getattr(source, "mode", "online"), "source": type(source).__name__,
                                 "temperature": source.temperature,
                                 "labelset_id": getattr(source, "labelset_id", None),
                                 "content": _label_content(source, ctx.data)}
        student = distill(ctx, source)
        score("III", lambda x: student(x)[1], module=student)
        score("III_hard_head", lambda x: student(x)[0], module=student)
        final = Classifier(student.backbone, student.soft_head)
        if cfg.stage4.enabled:
            final = rebalance_student_head(ctx, student)
            score("IV", final)
        if not isinstance(source, OnlineTargets):
            distilled = TableTargets(source, len(ctx.data.train), torch.device("cpu")).class_mass().cpu().numpy()
    report["final"] = evaluate(ctx, final.eval())
    role = "student" if cfg.pipeline == "ssd" else "classifier"
    save_model(ctx.out_dir / "model.pt", final, ctx.spec(final, role, headline(report["final"])))
    (ctx.out_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    with PLOTTING:
        plot_per_class_accuracy(ctx.data.class_counts, report["final"]["per_class"], ctx.data.class_names,
                                ctx.out_dir / "per_class_accuracy.png", title=f"{cfg.method} on {ctx.data.name}-LT")
        plot_label_distributions(ctx.data.class_counts, distilled, ctx.out_dir / "label_distributions.png")
    return report


def _label_content(source, data: LongTailData) -> dict | None:
    """What the distilled soft labels carry (store/content.py): from the labelset's provenance, or computed from
    in-memory rows; None for online teachers, whose targets change with every view."""
    provenance = getattr(source, "provenance", None)
    if provenance is not None:
        return provenance.content
    if isinstance(source, InMemorySoftLabels):
        return label_content(source.probs, data.train.labels.numpy(), data.class_names)
    return None
