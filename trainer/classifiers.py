"""Classifier re-balancing on a frozen backbone (Kang et al. 2020): LWS, τ-normalisation and NCM.

The fourth method, cRT, needs no module here: it is a freshly initialised nn.Linear retrained with class-balanced
sampling on frozen features (stages.py). Every module maps (N, F) features to (N, C) logits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.metrics import per_class_accuracy

NCM_METRICS = ("euclidean", "cosine")


class LWSClassifier(nn.Module):
    """Learnable weight scaling: logits = s ⊙ (W f + b) with W, b frozen from a trained Linear and s_j init 1.

    Same module as classifier-balancing's / SSD-LT's LWS: only the (C,) `scales` train. W and b are persistent
    buffers, so `LWSClassifier(nn.Linear(F, C)).load_state_dict(saved)` restores a trained one.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().clone()
        bias = linear.bias.detach().clone() if linear.bias is not None else weight.new_zeros(weight.shape[0])
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.scales = nn.Parameter(torch.ones(weight.shape[0], device=weight.device, dtype=weight.dtype))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scales * F.linear(features, self.weight, self.bias)

    def fold(self) -> nn.Linear:
        """A plain Linear with the scales folded in (W_j s_j, b_j s_j): same logits, no LWS module needed."""
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.scales.unsqueeze(1))
            linear.bias.copy_(self.bias * self.scales)
        return linear


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """(C, F) rows w_j / ‖w_j‖^τ (Kang et al. 2020, τ-normalised classifier); τ=0 is identity, τ=1 unit rows."""
    # The clamp keeps an all-zero row at zero instead of 0/0 = NaN.
    norms = weight.norm(dim=1, keepdim=True).clamp(min=torch.finfo(weight.dtype).tiny)
    return weight / norms.pow(tau)


class TauNormClassifier(nn.Module):
    """logits = f · (w_j / ‖w_j‖^τ); the bias is dropped, as classifier-balancing's tau_norm.py does."""

    def __init__(self, linear: nn.Linear, tau: float):
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("weight", tau_normalize(linear.weight.detach().clone(), self.tau))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


def search_tau(
    features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, taus: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """(best τ, (K,) scores): mean per-class accuracy of τ-norm on held-out features per τ (default 0..2 by 0.1).

    Ties go to the smallest τ, the least change to the trained classifier.
    """
    taus = torch.linspace(0.0, 2.0, 21, dtype=torch.float64) if taus is None else torch.as_tensor(taus).double()
    num_classes = weight.shape[0]
    scores = []
    with torch.no_grad():
        for tau in taus.tolist():
            preds = F.linear(features, tau_normalize(weight, tau)).argmax(dim=1)
            scores.append(float(np.nanmean(per_class_accuracy(preds, labels, num_classes))))
    scores_t = torch.tensor(scores, dtype=torch.float64)
    best = float(taus[scores_t == scores_t.max()].min())
    return round(best, 10), scores_t


def _cl2n(features: torch.Tensor, feature_mean: torch.Tensor) -> torch.Tensor:
    """classifier-balancing's "cl2n" features: centred on the training mean, then L2-normalised."""
    return F.normalize(features - feature_mean, dim=1)


def ncm_centroids(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """((C, F) class means of cl2n features, (F,) training feature mean), as classifier-balancing's NCM.

    A class with no features gets a zero centroid.
    """
    feature_mean = features.mean(dim=0)
    normed = _cl2n(features, feature_mean)
    labels = labels.to(features.device).long()
    sums = normed.new_zeros(num_classes, normed.shape[1]).index_add_(0, labels, normed)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(normed)
    return sums / counts.unsqueeze(1), feature_mean


class NCMClassifier(nn.Module):
    """Nearest class mean on cl2n features: logit = -‖x - c_j‖² ("euclidean") or cos(x, c_j) ("cosine")."""

    def __init__(self, centroids: torch.Tensor, feature_mean: torch.Tensor, metric: str = "euclidean"):
        super().__init__()
        if metric not in NCM_METRICS:
            raise ValueError(f"unknown NCM metric {metric!r}; known metrics: {', '.join(NCM_METRICS)}")
        self.metric = metric
        self.register_buffer("centroids", centroids.detach().clone())
        self.register_buffer("feature_mean", feature_mean.detach().clone())

    @classmethod
    def from_features(
        cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int, metric: str = "euclidean"
    ) -> NCMClassifier:
        """NCM fitted on (N, F) training features and (N,) labels."""
        return cls(*ncm_centroids(features, labels, num_classes), metric=metric)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = _cl2n(features, self.feature_mean)
        if self.metric == "cosine":
            return F.linear(x, F.normalize(self.centroids, dim=1))
        return -torch.cdist(x, self.centroids).pow(2)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, num_classes={self.centroids.shape[0]}"
