"""SSD stages I-IV and the baselines, composed from the pure parts and run through the one engine loop."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.batches import make_batches
from trainer.classifiers import LWSClassifier, NCMClassifier, TauNormClassifier, ncm_centroids, search_tau
from trainer.config import RunConfig, dump_config
from trainer.datasets import LongTailData, load_dataset
from trainer.engine import fit, predict
from trainer.losses import build_loss, kd_loss
from trainer.metrics import summarize
from trainer.models import Classifier, TwoHeadStudent, build_backbone, build_classifier
from trainer.moco import MoCo
from trainer.soft_targets import InMemorySoftLabels, SoftLabelSource

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every stage of one run shares: the resolved config, the data, the device and the run folder."""

    cfg: RunConfig
    data: LongTailData
    device: torch.device
    out_dir: Path

    def meta(self, stage: str) -> dict:
        """What a stage's checkpoint must match to be resumed: dataset fingerprint and the config it depends on."""
        keep = {"data", "model", "augment", "seed", "method", "stage1"}
        keep |= {"stage2"} if stage != "I" else set()
        keep |= {"stage3", "stage4"} if stage in ("III", "IV") else set()
        return {"fingerprint": self.data.fingerprint, "config": self.cfg.model_dump_json(include=keep)}

    def generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1000 + salt)

    def batches(self, split, *, train: bool, batch_size: int = 256, sampler: str = "instance", key_view=False):
        return make_batches(self.data, split, self.device, batch_size, train=train, augment_cfg=self.cfg.augment,
                            sampler=sampler, key_view=key_view, image_size=self.cfg.data.image_size,
                            num_workers=self.cfg.data.num_workers)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare(cfg: RunConfig, data: LongTailData | None = None) -> RunContext:
    """Load the data, pick the device, create the run folder and write the resolved config into it."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    return RunContext(cfg, data or load_dataset(cfg.data), resolve_device(cfg.device), out_dir)


def train_stage1(ctx: RunContext) -> Classifier:
    """Stage I (or a joint baseline): backbone + linear head with the configured loss; MoCo added for SSD."""
    cfg, data = ctx.cfg.stage1, ctx.data
    torch.manual_seed(ctx.cfg.seed)
    model = build_classifier(ctx.cfg.model.arch, data.in_channels, data.num_classes, cosine_head=cfg.loss.name == "ldam")
    use_moco = ctx.cfg.pipeline == "ssd" and cfg.moco.weight > 0
    parts = nn.ModuleDict({"model": model})
    if use_moco:
        queue = min(cfg.moco.queue_size, len(data.train))
        parts["moco"] = MoCo(model.backbone, model.backbone.feature_dim, dim=cfg.moco.dim, queue_size=queue,
                             momentum=cfg.moco.momentum, temperature=cfg.moco.temperature,
                             label_aware=cfg.moco.label_aware)
    parts.to(ctx.device)
    criterion = build_loss(cfg.loss, torch.as_tensor(data.class_counts)).to(ctx.device)

    def loss_fn(batch, progress):
        features = model.backbone(batch.images)
        ce = criterion(model.head(features), batch.labels, progress)
        if not use_moco:
            return ce, {}
        contrastive = parts["moco"](features, batch.key_images, batch.labels)
        return ce + cfg.moco.weight * contrastive, {"ce": ce.detach(), "moco": contrastive.detach()}

    batches = ctx.batches(data.train, train=True, batch_size=cfg.optim.batch_size, sampler=cfg.sampler,
                          key_view=use_moco)
    fit(stage="I", model=parts, loss_fn=loss_fn, batches=batches, optim=cfg.optim, generator=ctx.generator(1),
        checkpoint=ctx.out_dir / "stage1" / "checkpoint.pt", meta=ctx.meta("I"),
        on_epoch_end=_periodic_eval(ctx, model))
    return model


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
        torch.manual_seed(ctx.cfg.seed + 2)
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
    fit(stage=stage, model=head, loss_fn=loss_fn, batches=batches, optim=cfg.optim, generator=ctx.generator(salt),
        checkpoint=ctx.out_dir / f"stage{salt}" / "checkpoint.pt", meta=ctx.meta(stage), set_mode=set_mode)


def teacher_logits(ctx: RunContext, teacher: nn.Module) -> torch.Tensor:
    """The teacher (eval mode) over the un-augmented training set, rows in image-id order."""
    teacher.eval()
    logits, _, ids = predict(teacher, ctx.batches(ctx.data.train, train=False))
    out = torch.empty_like(logits)
    out[ids] = logits
    return out


def distill(ctx: RunContext, source: SoftLabelSource) -> TwoHeadStudent:
    """Stage III: a new student learns CE on its hard head and T²-scaled KD from the soft labels on its soft head."""
    cfg, data = ctx.cfg.stage3, ctx.data
    if abs(source.temperature - cfg.temperature) > 1e-6:
        raise ValueError(f"soft labels are at T={source.temperature} but stage3.temperature={cfg.temperature}; "
                         "re-temper the labelset or change stage3.temperature")
    torch.manual_seed(ctx.cfg.seed + 3)
    student = TwoHeadStudent(build_backbone(ctx.cfg.model.arch, data.in_channels), data.num_classes).to(ctx.device)
    targets = SoftTargets(source, len(data.train), ctx.device)

    def loss_fn(batch, progress):
        hard_logits, soft_logits = student(batch.images)
        hard = F.cross_entropy(hard_logits, batch.labels)
        soft = kd_loss(soft_logits, targets(batch.ids), cfg.temperature)
        return cfg.hard_weight * hard + cfg.soft_weight * soft, {"hard": hard.detach(), "kd": soft.detach()}

    batches = ctx.batches(data.train, train=True, batch_size=cfg.optim.batch_size, sampler=cfg.sampler)
    fit(stage="III", model=student, loss_fn=loss_fn, batches=batches, optim=cfg.optim, generator=ctx.generator(3),
        checkpoint=ctx.out_dir / "stage3" / "checkpoint.pt", meta=ctx.meta("III"),
        on_epoch_end=_periodic_eval(ctx, student, lambda x: student(x)[1]))
    return student


class SoftTargets:
    """Soft-label rows for a batch's image ids, read from the source once and kept on the training device.

    The rows are small next to the images (N × C float32: 2 MB for CIFAR-100-LT), so one bulk read up front keeps
    every training step free of storage I/O.
    """

    def __init__(self, source: SoftLabelSource, num_images: int, device: torch.device):
        rows = source.soft_labels(np.arange(num_images))
        self.table = torch.as_tensor(np.asarray(rows, dtype=np.float32), device=device)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def rebalance_soft_head(ctx: RunContext, student: TwoHeadStudent) -> TwoHeadStudent:
    """Stage IV: LWS on the soft head (the paper's choice; the official loader would pick the hard head)."""
    student.backbone.requires_grad_(False).eval()
    student.hard_head.requires_grad_(False)
    head = LWSClassifier(student.soft_head).to(ctx.device)
    _train_head(ctx, "IV", student.backbone, head, ctx.cfg.stage4)
    student.soft_head = head
    return student


def evaluate(ctx: RunContext, forward, split=None) -> dict:
    logits, labels, _ = predict(forward, ctx.batches(split or ctx.data.test, train=False))
    return summarize(logits.argmax(1), labels, ctx.data.class_counts)


def _periodic_eval(ctx: RunContext, module: nn.Module, forward=None):
    """Test accuracy every `eval_every` epochs, for curves only (reports use the last epoch); fit restores modes."""
    if not ctx.cfg.eval_every:
        return None

    def hook(epoch: int) -> dict:
        if (epoch + 1) % ctx.cfg.eval_every:
            return {}
        module.eval()
        return {"test_top1": evaluate(ctx, forward or module)["overall"]}

    return hook


def run_pipeline(cfg: RunConfig, source: SoftLabelSource | None = None, data: LongTailData | None = None) -> dict:
    """Train what `cfg.method` names, evaluate the last epoch on the test set, write metrics.json and plots."""
    from trainer.plots import plot_label_distributions, plot_per_class_accuracy

    ctx = prepare(cfg, data)
    report: dict = {"method": cfg.method, "dataset": ctx.data.name, "imbalance_factor": cfg.data.imbalance_factor,
                    "seed": cfg.seed, "lt_seed": cfg.data.lt_seed, "fingerprint": ctx.data.fingerprint,
                    "device": str(ctx.device), "class_counts": ctx.data.class_counts.tolist(),
                    "class_names": ctx.data.class_names, "stages": {}}
    distilled = None
    if source is None or cfg.pipeline != "ssd":
        model = train_stage1(ctx)
        report["stages"]["I"] = evaluate(ctx, model.eval())
        final = model
        if cfg.pipeline in ("decoupled", "ssd"):
            final = teacher = rebalance(ctx, model)
            report["stages"]["II"] = evaluate(ctx, teacher.eval())
            if cfg.pipeline == "ssd":
                logits = teacher_logits(ctx, teacher)
                torch.save(logits, ctx.out_dir / "teacher_train_logits.pt")
                source = InMemorySoftLabels(logits, cfg.stage3.temperature)
    if cfg.pipeline == "ssd":
        report["soft_labels"] = {"source": type(source).__name__, "temperature": source.temperature,
                                 "labelset_id": getattr(source, "labelset_id", None)}
        student = distill(ctx, source)
        report["stages"]["III"] = evaluate(ctx, lambda x: student(x)[1])
        report["stages"]["III_hard_head"] = evaluate(ctx, lambda x: student(x)[0])
        if cfg.stage4.enabled:
            student = rebalance_soft_head(ctx, student)
            report["stages"]["IV"] = evaluate(ctx, lambda x: student(x)[1])
        student.eval()
        final = Classifier(student.backbone, student.soft_head)
        distilled = SoftTargets(source, len(ctx.data.train), torch.device("cpu")).table.sum(0).numpy()
    report["final"] = evaluate(ctx, final.eval())
    torch.save({"state_dict": final.state_dict(), "arch": cfg.model.arch}, ctx.out_dir / "model.pt")
    (ctx.out_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    plot_per_class_accuracy(ctx.data.class_counts, report["final"]["per_class"], ctx.data.class_names,
                            ctx.out_dir / "per_class_accuracy.png", title=f"{cfg.method} on {ctx.data.name}-LT")
    plot_label_distributions(ctx.data.class_counts, distilled, ctx.out_dir / "label_distributions.png")
    return report
