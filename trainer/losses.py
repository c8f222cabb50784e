"""Long-tail classification losses (focal, class-balanced, LDAM-DRW, logit adjustment, EQL) and the KD loss of SSD."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import LossConfig

LOSS_NAMES = ("ce", "focal", "cb", "ldam", "balanced_softmax", "logit_adjust", "eql")

Counts = torch.Tensor | np.ndarray | Sequence[int]


def _counts(class_counts: Counts) -> torch.Tensor:
    # float64 so that 1 - β^n with β = 0.9999 keeps its digits; an empty class counts as one image so that
    # n^{-1/4}, log(prior) and 1/(1-β^n) stay finite (such a class is never a target anyway).
    counts = class_counts.detach().cpu() if isinstance(class_counts, torch.Tensor) else np.asarray(class_counts)
    return torch.as_tensor(counts, dtype=torch.float64).clamp(min=1.0)


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of -w_y (1-p_t)^γ log p_t over the batch (Lin et al. 2017, softmax form); γ=0 is (weighted) CE."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    # 1 - p_t = -expm1(-ce) keeps precision when p_t is close to 1. Where it is 0 (a confident, right prediction)
    # pow's gradient is inf for γ < 1, and inf · 0 is NaN (torch 2.11 returns it): the second `where` keeps pow away
    # from 0, and the loss there, ~ce^(1+γ), has gradient 0 anyway.
    miss = -torch.expm1(-ce)
    positive = miss > 0
    modulator = torch.where(positive, torch.where(positive, miss, 1.0).pow(gamma), 0.0)
    loss = modulator * ce
    if weight is not None:
        loss = loss * weight.to(loss)[targets]
    # Averaged over the batch size (not over Σw), as LDAM-DRW's and Cui et al.'s focal losses do.
    return loss.mean()


def effective_number_weights(class_counts: Counts, beta: float) -> torch.Tensor:
    """(C,) class weights (1-β)/(1-β^{n_j}) normalised to sum to C (Cui et al. 2019, class-balanced loss)."""
    n = _counts(class_counts)
    # 1 - β^n = -expm1(n log β): exact even when β^n is within float rounding of 1.
    weights = (1.0 - beta) / -torch.expm1(n * np.log(beta))
    return (weights / weights.sum() * len(n)).float()


def ldam_margins(class_counts: Counts, max_margin: float = 0.5) -> torch.Tensor:
    """(C,) margins m_j ∝ n_j^{-1/4}, the rarest class getting `max_margin` (Cao et al. 2019, eq. 12)."""
    margins = _counts(class_counts).pow(-0.25)
    return (margins * (max_margin / margins.max())).float()


def ldam_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    margins: torch.Tensor,
    scale: float = 30.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE(s · (z - m_y on the true class)); `logits` are cosine scores in [-1, 1] as from LDAM's NormedLinear."""
    shift = margins.to(logits)[targets].unsqueeze(1)
    adjusted = logits.scatter_add(1, targets.unsqueeze(1), -shift)
    return F.cross_entropy(scale * adjusted, targets, weight=None if weight is None else weight.to(logits))


def log_prior(class_counts: Counts) -> torch.Tensor:
    """(C,) log π_j = log(n_j / Σn), the additive adjustment of logit-adjusted losses."""
    n = _counts(class_counts)
    return (n / n.sum()).log().float()


def logit_adjusted_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: Counts,
    tau: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE(z + τ log π) (Menon et al. 2021, eq. 10); τ=1 is balanced softmax (Ren et al. 2020)."""
    adjusted = logits + tau * log_prior(class_counts).to(logits)
    return F.cross_entropy(adjusted, targets, weight=None if weight is None else weight.to(logits))


def eql_tail_classes(class_counts: Counts, lam: float) -> torch.Tensor:
    """(C,) bool T_λ(f_j): class frequency f_j = n_j / Σn below λ (Tan et al. 2020, eq. 6)."""
    n = _counts(class_counts)
    return n / n.sum() < lam


def sigmoid_eql_loss(logits: torch.Tensor, targets: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j BCE(z_j, y_j) / N with w_j = 1 − T_λ(f_j)(1 − y_j) (EQL, eq. 5; every image is foreground here).

    A tail class keeps the positive gradient of its own images but gets none from other classes' images.
    """
    onehot = F.one_hot(targets.long(), logits.shape[1]).to(logits)
    weight = 1.0 - tail.to(logits).unsqueeze(0) * (1.0 - onehot)
    return F.binary_cross_entropy_with_logits(logits, onehot, weight=weight, reduction="sum") / len(targets)


def softmax_eql_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tail: torch.Tensor,
    gamma: float,
    drop: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """−log(e^{z_y} / Σ_k w̃_k e^{z_k}), w̃_k = 1 − β T_λ(f_k)(1 − y_k), β ~ Bernoulli(γ) (SEQL, Tan et al. eq. 8).

    β is drawn per image and class (as the reference implementation does) from `generator` (on the logits' device;
    None: torch's global RNG) unless `drop` (N, C bool) gives it; a dropped class leaves the denominator, so it
    receives no negative gradient from that image.
    """
    if drop is None:
        drop = torch.rand(logits.shape, device=logits.device, generator=generator) < gamma
    onehot = F.one_hot(targets.long(), logits.shape[1]).bool()
    removed = drop.to(onehot.device) & tail.to(onehot.device).unsqueeze(0) & ~onehot
    return F.cross_entropy(logits.masked_fill(removed, float("-inf")), targets,
                           weight=None if weight is None else weight.to(logits))


def kd_per_image(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) T² · KL(q_i ‖ softmax(s_i/T)), q = softmax(teacher/T) rows: per image, for losses that weight images.

    F.kl_div uses xlogy semantics, so exact zeros in q (top-k sparse labels) contribute 0, not NaN.
    """
    log_probs = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_probs, soft_targets.to(log_probs), reduction="none").sum(1) * temperature**2


def kd_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean_i KL(q_i ‖ softmax(s_i/T)), q = stored softmax(teacher/T) rows (SSD eq. 3-4, Hinton et al.)."""
    return kd_per_image(student_logits, soft_targets, temperature).mean()


class LongTailLoss(nn.Module):
    """One of LOSS_NAMES with optional deferred re-weighting (DRW, Cao et al. 2019); build it with build_loss."""

    def __init__(
        self,
        name: str,
        class_counts: Counts,
        focal_gamma: float = 1.0,
        cb_beta: float = 0.9999,
        ldam_max_margin: float = 0.5,
        ldam_scale: float = 30.0,
        drw_start: float | None = None,
        logit_adjust_tau: float = 1.0,
        eql_variant: str = "softmax",
        eql_lambda: float = 5e-3,
        eql_gamma: float = 0.9,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}")
        self.name = name
        self.focal_gamma = focal_gamma
        self.ldam_scale = ldam_scale
        self.drw_start = drw_start
        self.tau = 1.0 if name == "balanced_softmax" else logit_adjust_tau
        self.eql_variant, self.eql_gamma = eql_variant, eql_gamma
        self.generator = generator  # SEQL's draws: a run's own, so runs sharing a process draw as they would alone
        # Non-persistent buffers: they follow .to(device) but stay out of model checkpoints.
        self.register_buffer("cb_weights", effective_number_weights(class_counts, cb_beta), persistent=False)
        self.register_buffer("margins", ldam_margins(class_counts, ldam_max_margin), persistent=False)
        self.register_buffer("log_prior", log_prior(class_counts), persistent=False)
        self.register_buffer("eql_tail", eql_tail_classes(class_counts, eql_lambda), persistent=False)

    def class_weights(self, progress: float) -> torch.Tensor | None:
        """Effective-number weights when this loss re-weights at `progress` (cb always; DRW after drw_start)."""
        if self.drw_start is not None:
            return self.cb_weights if progress >= self.drw_start else None
        return self.cb_weights if self.name == "cb" else None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        """Scalar loss of (N, C) logits against (N,) targets; `progress` ∈ [0, 1] is the fraction of training done."""
        targets = targets.long()  # in-memory datasets keep uint8 labels; LDAM's gather and one-hot need int64
        weight = self.class_weights(progress)
        weight = None if weight is None else weight.to(logits)
        if self.name == "focal":
            return focal_loss(logits, targets, self.focal_gamma, weight)
        if self.name == "ldam":
            return ldam_loss(logits, targets, self.margins, self.ldam_scale, weight)
        if self.name == "eql":
            if self.eql_variant == "sigmoid":
                return sigmoid_eql_loss(logits, targets, self.eql_tail)
            # A CPU generator cannot draw CUDA tensors; on a GPU the draws come from the global CUDA RNG, which CUDA
            # graphs know how to replay.
            own = self.generator if self.generator is not None and self.generator.device == logits.device else None
            return softmax_eql_loss(logits, targets, self.eql_tail, self.eql_gamma, weight=weight, generator=own)
        if self.name in ("balanced_softmax", "logit_adjust"):
            # Same as logit_adjusted_loss, with log π kept as a buffer so it is not rebuilt every step.
            return F.cross_entropy(logits + self.tau * self.log_prior.to(logits), targets, weight=weight)
        return F.cross_entropy(logits, targets, weight=weight)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, drw_start={self.drw_start}"


def build_loss(cfg: LossConfig, class_counts: Counts, generator: torch.Generator | None = None) -> LongTailLoss:
    """The stage-I loss named by `cfg.name`, set up from the training split's (C,) class counts; `generator` feeds
    SEQL's random class drops."""
    return LongTailLoss(
        cfg.name,
        class_counts,
        focal_gamma=cfg.focal_gamma,
        cb_beta=cfg.cb_beta,
        ldam_max_margin=cfg.ldam_max_margin,
        ldam_scale=cfg.ldam_scale,
        drw_start=cfg.drw_start,
        logit_adjust_tau=cfg.logit_adjust_tau,
        eql_variant=cfg.eql_variant,
        eql_lambda=cfg.eql_lambda,
        eql_gamma=cfg.eql_gamma,
        generator=generator,
    )
