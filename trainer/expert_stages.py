"""The multi-expert methods (BBN, RIDE, LFME, independent experts + test-time averaging) as stages on the one engine.

Every training here is a `fit` call with a loss_fn over the usual batches; the models and rules are in
trainer/experts.py. `train_multi_expert` returns the final images -> logits module, which run_pipeline evaluates and
saves like any classifier, so each of these methods can be a label-store teacher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.batches import Batch
from trainer.datasets import ImageSet
from trainer.engine import predict
from trainer.experts import (
    BBNNet,
    ExpertView,
    MultiExpertNet,
    bbn_alpha,
    bbn_loss,
    curriculum_weights,
    difficulty_ranks,
    disagreement,
    diversity_loss,
    diversity_temperature,
    expert_weight,
    frequency_groups,
    router_targets,
)
from trainer.losses import build_loss, kd_per_image
from trainer.metrics import summarize
from trainer.models import Classifier, build_classifier
from trainer.context import RunContext, evaluate, headline, seeded

log = logging.getLogger(__name__)


def train_multi_expert(ctx: RunContext, report: dict) -> nn.Module:
    """Train what ctx.cfg.method names, add its stages and expert statistics to `report`, return the final model."""
    method = {"bbn": train_bbn, "ride": train_ride, "lfme": train_lfme, "experts_ta": train_independent_experts}
    return method[ctx.cfg.method](ctx, report)


def _meta(ctx: RunContext) -> dict:
    """What a multi-expert checkpoint must match: dataset fingerprint and every config part these stages read."""
    keep = {"data", "model", "augment", "seed", "method", "stage1", "stage3", "experts"}
    return {"fingerprint": ctx.data.fingerprint, "config": ctx.cfg.model_dump_json(include=keep)}


def _checkpoint(ctx: RunContext, name: str):
    return ctx.out_dir / name / "checkpoint.pt"


# ---------------------------------------------------------------------------------------------- BBN


@dataclass
class PairedBatch:
    """One step of two samplers: BBN's conventional (instance) batch and its re-balancing (reversed) batch."""

    first: Batch
    second: Batch

    @property
    def labels(self) -> torch.Tensor:
        return self.first.labels


class PairedBatches:
    """Two batch sources over one split, zipped step by step; both draw from the one generator, so resumes match."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return min(len(self.first), len(self.second))

    def epoch(self, progress: float = 0.0, generator: torch.Generator | None = None):
        for a, b in zip(self.first.epoch(progress, generator), self.second.epoch(progress, generator)):
            yield PairedBatch(a, b)


def train_bbn(ctx: RunContext, report: dict) -> BBNNet:
    """BBN: conventional branch on instance-sampled batches, re-balancing branch on reversed-sampled ones
    (p_j ∝ 1/n_j), features mixed by α = 1 − (T/T_max)² and the loss by the same α; α = 0.5 at test."""
    cfg, data = ctx.cfg, ctx.data
    with seeded(cfg.seed):
        net = BBNNet(cfg.model.arch, data.in_channels, data.num_classes, cfg.experts.share or "all_but_last_block")
    net.to(ctx.device)
    criterion = build_loss(cfg.stage1.loss, torch.as_tensor(data.class_counts), ctx.generator(6)).to(ctx.device)
    size = cfg.stage1.optim.batch_size
    batches = PairedBatches(ctx.batches(data.train, train=True, batch_size=size, sampler=cfg.stage1.sampler),
                            ctx.batches(data.train, train=True, batch_size=size, sampler="reversed"))

    def loss_fn(batch: PairedBatch, progress: float):
        alpha = bbn_alpha(progress)
        logits = net(batch.first.images, batch.second.images, alpha)
        loss = bbn_loss(logits, batch.first.labels.long(), batch.second.labels.long(), alpha,
                        lambda z, y: criterion(z, y, progress))
        return loss, {"alpha": alpha}

    ctx.fit(stage="bbn", model=net, loss_fn=loss_fn, batches=batches, optim=cfg.stage1.optim,
            generator=ctx.generator(1), checkpoint=_checkpoint(ctx, "bbn"), meta=_meta(ctx))
    report["stages"]["I"] = evaluate(ctx, net.eval())
    branches = {}
    for name, alpha in (("conventional", 1.0), ("re_balancing", 0.0)):  # each branch alone, for the report
        branches[name] = headline(evaluate(ctx, lambda x, a=alpha: net(x, alpha=a), module=net))
    report["branches"] = branches
    return net


# ---------------------------------------------------------------------------------------------- RIDE


def _expert_net(ctx: RunContext, share: str, router: dict | None = None) -> MultiExpertNet:
    cfg, data = ctx.cfg, ctx.data
    cosine = cfg.stage1.loss.name == "ldam"  # LDAM's cosine head, scaled by s in the output as RIDE does
    with seeded(cfg.seed):
        net = MultiExpertNet(cfg.model.arch, data.in_channels, data.num_classes, cfg.experts.n_experts,
                             cfg.experts.share or share, "cosine" if cosine else "linear",
                             cfg.stage1.loss.ldam_scale if cosine else 1.0, router)
    return net.to(ctx.device)


def train_ride(ctx: RunContext, report: dict) -> MultiExpertNet:
    """RIDE: experts on a shared first stage, each with the stage-I loss (LDAM-DRW by default) plus the diversity
    KL to their mean; then, experts frozen, the router learns when a sample should consult the next expert."""
    cfg, ex, data = ctx.cfg, ctx.cfg.experts, ctx.data
    router = {"top_k": ex.router_top_k, "hidden": ex.router_hidden} if ex.router else None
    net = _expert_net(ctx, "first_stage", router)
    net.threshold = ex.router_threshold
    criterion = build_loss(cfg.stage1.loss, torch.as_tensor(data.class_counts), ctx.generator(6)).to(ctx.device)
    drw = cfg.stage1.loss.drw_start
    temps = {flag: diversity_temperature(data.class_counts, ex.diversity_temperature, ex.diversity_reweight_factor,
                                         flag).to(ctx.device) for flag in (False, True)}
    if net.router is not None:
        net.router.requires_grad_(False)  # stage 1 trains the experts only

    def loss_fn(batch, progress):
        _, raw = net.expert_outputs(batch.images)
        individual = sum(criterion(r, batch.labels, progress) for r in raw)
        diversity = diversity_loss(raw * net.scale, temps[drw is not None and progress >= drw])
        loss = individual + ex.diversity_weight * diversity
        return loss, {"individual": individual.detach(), "diversity": diversity.detach()}

    batches = ctx.batches(data.train, train=True, batch_size=cfg.stage1.optim.batch_size, sampler=cfg.stage1.sampler)
    ctx.fit(stage="ride", model=net, loss_fn=loss_fn, batches=batches, optim=cfg.stage1.optim,
        generator=ctx.generator(1), checkpoint=_checkpoint(ctx, "ride"), meta=_meta(ctx))
    net.routing = False
    report["stages"]["I"] = {**evaluate(ctx, net.eval()), "experts_used": float(net.n_experts)}
    report["experts"] = {"each": _each_expert(ctx, net)}
    if net.router is None:
        return net
    train_router(ctx, net)
    net.routing = True
    report["stages"]["router"] = {**evaluate(ctx, net.eval()), "experts_used": experts_used(ctx, net)}
    return net


def train_router(ctx: RunContext, net: MultiExpertNet) -> None:
    """RIDE's expert-assignment stage: frozen experts (BatchNorm in eval mode), BCE on 'would the next experts
    help' with the official positive weight."""
    ex = ctx.cfg.experts
    net.requires_grad_(False)
    net.router.requires_grad_(True)
    pos_weight = torch.tensor([ex.router_pos_weight], device=ctx.device)

    def loss_fn(batch, progress):
        with torch.no_grad():
            features, raw = net.expert_outputs(batch.images)
            logits = raw * net.scale
        help_logits = net.router(features, logits)
        targets = router_targets(logits, batch.labels.long())
        loss = F.binary_cross_entropy_with_logits(help_logits, targets, pos_weight=pos_weight)
        return loss, {"help_rate": targets.mean().detach()}

    def set_mode():
        net.eval()
        net.router.train()

    batches = ctx.batches(ctx.data.train, train=True, batch_size=ex.router_optim.batch_size,
                          sampler=ctx.cfg.stage1.sampler)
    ctx.fit(stage="router", model=net, loss_fn=loss_fn, batches=batches, optim=ex.router_optim,
        generator=ctx.generator(2), checkpoint=_checkpoint(ctx, "router"), meta=_meta(ctx), set_mode=set_mode)


@torch.no_grad()
def experts_used(ctx: RunContext, net: MultiExpertNet, split=None) -> float:
    """Mean number of experts the router consults per test image (RIDE's computational cost)."""
    net.eval()
    used, _, _ = predict(lambda x: net.route(x)[1].float().unsqueeze(1), ctx.batches(split or ctx.data.test,
                                                                                      train=False))
    return float(used.mean())


def _expert_logits(ctx: RunContext, net: MultiExpertNet, split=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, C) scaled logits of every expert over a split, and the labels."""
    net.eval()
    logits, labels, _ = predict(lambda x: net.expert_outputs(x)[1].transpose(0, 1) * net.scale,
                                ctx.batches(split or ctx.data.test, train=False))
    return logits.transpose(0, 1), labels


def _each_expert(ctx: RunContext, net: MultiExpertNet) -> list[dict]:
    logits, labels = _expert_logits(ctx, net)
    return [headline(summarize(z.argmax(1), labels, ctx.data.class_counts)) for z in logits]


# ---------------------------------------------------------------------------------------------- independent experts


def train_independent_experts(ctx: RunContext, report: dict) -> MultiExpertNet:
    """n experts trained one after another on the whole set, each with its own initialisation and sampling order
    (stage-I loss and sampler: balanced softmax by default, so every expert sees the classes balanced); the model
    averages their logits. Reports each expert, the average, and their disagreement counts."""
    cfg, data = ctx.cfg, ctx.data
    net = _expert_net(ctx, "none")
    criterion = build_loss(cfg.stage1.loss, torch.as_tensor(data.class_counts), ctx.generator(6)).to(ctx.device)
    for i in range(net.n_experts):
        view = ExpertView(net, i)

        def loss_fn(batch, progress, view=view):
            return criterion(view(batch.images), batch.labels, progress), {}

        batches = ctx.batches(data.train, train=True, batch_size=cfg.stage1.optim.batch_size,
                              sampler=cfg.stage1.sampler)
        ctx.fit(stage=f"expert{i}", model=view, loss_fn=loss_fn, batches=batches, optim=cfg.stage1.optim,
            generator=ctx.generator(10 + i), checkpoint=_checkpoint(ctx, f"expert{i}"), meta=_meta(ctx))
    logits, labels = _expert_logits(ctx, net)
    average = logits.mean(0).argmax(1)
    report["stages"]["I"] = summarize(average, labels, data.class_counts)
    report["experts"] = {
        "each": [headline(summarize(z.argmax(1), labels, data.class_counts)) for z in logits],
        "disagreement": disagreement(logits.argmax(2), average, labels),
    }
    return net


# ---------------------------------------------------------------------------------------------- LFME


def subset(split: ImageSet, classes: np.ndarray) -> ImageSet:
    """The images of `classes`, labels renumbered 0..len(classes)-1 in class order (an LFME expert's data)."""
    remap = torch.full((max(int(split.labels.max()), int(np.max(classes))) + 1,), -1, dtype=torch.long)
    remap[torch.as_tensor(classes)] = torch.arange(len(classes))
    labels = split.labels.long()  # uint8 labels would index as a mask
    keep = torch.nonzero(remap[labels] >= 0).flatten()
    images = split.images[keep] if split.images is not None else None
    paths = tuple(split.paths[i] for i in keep.tolist()) if split.paths is not None else None
    return ImageSet(labels=remap[labels[keep]], images=images, paths=paths, root=split.root)


class LFMEStudent(nn.Module):
    """The student with its frozen experts and the self-paced state (expert weights) as buffers, so a resumed
    run continues with the weights the last finished epoch set."""

    def __init__(self, student: Classifier, experts: list[Classifier], expert_acc: list[float]):
        super().__init__()
        self.student = student
        self.experts = nn.ModuleList(experts).requires_grad_(False)
        self.register_buffer("expert_acc", torch.tensor(expert_acc, dtype=torch.float32))
        self.register_buffer("expert_weights", torch.ones(len(experts)))


def _group_accuracy(ctx: RunContext, forward, module: nn.Module, split: ImageSet, classes: np.ndarray) -> float:
    """Accuracy of argmax over the group's own classes, on the group's images of `split` (labels 0..|g|-1)."""
    module.eval()
    logits, labels, _ = predict(forward, ctx.batches(split, train=False))
    return float((logits.argmax(1) == labels).double().mean()) if len(labels) else 0.0


def train_lfme(ctx: RunContext, report: dict) -> Classifier:
    """LFME: one expert per frequency group trained on that group's images (stage-I schedule), then a student on
    the whole set (stage-III schedule) with CE plus each expert's T²-KD on its group's images, weighted by
    self-paced expert selection, over an easy-to-hard instance curriculum ranked by the experts' confidence."""
    cfg, ex, data = ctx.cfg, ctx.cfg.experts, ctx.data
    groups = frequency_groups(data.class_counts, ex.lfme_split, ex.n_experts)
    # LFME measures accuracies on a validation set; without one (data.val_per_class=0), the un-augmented train split
    check = data.val if data.val is not None else data.train
    experts, expert_acc, expert_test = [], [], []
    for k, classes in enumerate(groups):
        with seeded(cfg.seed * 100 + 20 + k):
            expert = build_classifier(cfg.model.arch, data.in_channels, len(classes)).to(ctx.device)
        part = subset(data.train, classes)
        counts = torch.bincount(part.labels, minlength=len(classes))
        criterion = build_loss(cfg.stage1.loss, counts, ctx.generator(30 + k)).to(ctx.device)

        def loss_fn(batch, progress, expert=expert, criterion=criterion):
            return criterion(expert(batch.images), batch.labels, progress), {}

        batches = ctx.batches(part, train=True, batch_size=cfg.stage1.optim.batch_size, sampler=cfg.stage1.sampler)
        ctx.fit(stage=f"lfme_expert{k}", model=expert, loss_fn=loss_fn, batches=batches, optim=cfg.stage1.optim,
            generator=ctx.generator(20 + k), checkpoint=_checkpoint(ctx, f"lfme_expert{k}"), meta=_meta(ctx))
        experts.append(expert.eval())
        expert_acc.append(_group_accuracy(ctx, expert, expert, subset(check, classes), classes))
        expert_test.append(100 * _group_accuracy(ctx, expert, expert, subset(data.test, classes), classes))

    # which group each class is in, where it sits in its group, and each image's difficulty rank in its group
    group_of = torch.empty(data.num_classes, dtype=torch.long)
    slot = torch.empty(data.num_classes, dtype=torch.long)
    for k, classes in enumerate(groups):
        group_of[classes], slot[classes] = k, torch.arange(len(classes))
    confidence = torch.empty(len(data.train))
    train_labels = data.train.labels.long()
    for k, classes in enumerate(groups):
        ids = torch.nonzero(group_of[train_labels] == k).flatten()
        logits, labels, _ = predict(experts[k], ctx.batches(subset(data.train, classes), train=False))
        confidence[ids] = F.softmax(logits, 1).gather(1, labels.unsqueeze(1)).squeeze(1)
    ranks = difficulty_ranks(confidence, group_of[train_labels]).to(ctx.device)
    group_of, slot = group_of.to(ctx.device), slot.to(ctx.device)
    class_lists = [torch.as_tensor(c, device=ctx.device) for c in groups]

    with seeded(cfg.seed + 3):
        student = build_classifier(cfg.model.arch, data.in_channels, data.num_classes).to(ctx.device)
    state = LFMEStudent(student, experts, expert_acc).to(ctx.device)
    s3 = cfg.stage3

    def loss_fn(batch, progress):
        logits, labels = student(batch.images), batch.labels.long()
        ce = F.cross_entropy(logits, labels, reduction="none")
        kd = torch.zeros_like(ce)
        groups_in_batch = group_of[labels]
        for k, classes in enumerate(class_lists):
            mask = groups_in_batch == k
            if not mask.any():
                continue
            with torch.no_grad():
                teacher = state.experts[k](batch.images[mask])
            soft = F.softmax(teacher / s3.temperature, dim=1)
            kd[mask] = state.expert_weights[k] * kd_per_image(logits[mask][:, classes], soft, s3.temperature)
        weights = curriculum_weights(ranks[batch.ids], progress, ex.lfme_curriculum_start, ex.lfme_curriculum_end)
        per_image = s3.hard_weight * ce + s3.soft_weight * kd
        loss = (weights * per_image).sum() / weights.sum().clamp(min=1.0)
        return loss, {"ce": ce.mean().detach(), "kd": kd.mean().detach(), "included": weights.mean().detach()}

    def set_mode():
        state.student.train()
        state.experts.eval()

    def select_experts(epoch: int) -> dict:
        """Self-paced expert selection: the student's accuracy per group sets each expert's KD weight."""
        out = {}
        for k, classes in enumerate(groups):
            idx = class_lists[k]
            acc = _group_accuracy(ctx, lambda x, idx=idx: student(x)[:, idx], student, subset(check, classes),
                                  classes)
            state.expert_weights[k] = expert_weight(acc, expert_acc[k], ex.lfme_selection_beta)
            out[f"expert{k}_weight"] = float(state.expert_weights[k])
        return out

    batches = ctx.batches(data.train, train=True, batch_size=s3.optim.batch_size, sampler=s3.sampler)
    ctx.fit(stage="lfme_student", model=state, loss_fn=loss_fn, batches=batches, optim=s3.optim,
        generator=ctx.generator(3), checkpoint=_checkpoint(ctx, "lfme_student"), meta=_meta(ctx), set_mode=set_mode,
        on_epoch_end=select_experts)
    report["stages"]["III"] = evaluate(ctx, student.eval())
    report["experts"] = {"groups": [g.tolist() for g in groups], "expert_check_accuracy": expert_acc,
                         "expert_test_group_accuracy": expert_test,
                         "final_expert_weights": state.expert_weights.tolist()}
    return student
