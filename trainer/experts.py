"""Multi-expert models (BBN, RIDE, independent experts) and the pure rules of the multi-expert methods.

Rules are plain functions so tests can check them against hand-computed cases: BBN's cumulative adaptor and mixed
loss, RIDE's diversity loss, router labels and routing, LFME's class groups, self-paced expert weights and instance
curriculum, and the disagreement counts of test-time averaging. Orchestration lives in trainer/expert_stages.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.longtail import shot_groups
from trainer.models import CifarResNet, NormedLinear, build_backbone

SHARES = ("none", "stem", "first_stage", "all_but_last_block")


# ---------------------------------------------------------------------------------------------- backbone split


class GlobalPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def backbone_pieces(backbone: nn.Module) -> tuple[list[nn.Module], int]:
    """A backbone as a chain (stem, residual blocks..., pooling) and the index where its second stage starts.

    The chain computes exactly what the backbone's forward does, so a prefix can be shared between experts.
    """
    if isinstance(backbone, CifarResNet):
        stem = nn.Sequential(backbone.conv1, backbone.bn1, nn.ReLU())
        blocks = list(backbone.layers)
        return [stem, *blocks, GlobalPool()], 1 + len(blocks) // 3
    stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
    stages = [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    return [stem, *(block for stage in stages for block in stage), GlobalPool()], 1 + len(backbone.layer1)


def share_cut(share: str, num_pieces: int, second_stage: int) -> int:
    """How many leading pieces the experts share: none 0, stem 1, first_stage up to stage 2, or all but the last
    residual block (BBN: the branches are the last block each)."""
    cuts = {"none": 0, "stem": 1, "first_stage": second_stage, "all_but_last_block": num_pieces - 2}
    if share not in cuts:
        raise ValueError(f"unknown share {share!r}; choose one of {', '.join(SHARES)}")
    return cuts[share]


class ExpertTrunks(nn.Module):
    """A shared early part and `n` expert later parts, cut from `n` freshly initialised backbones."""

    def __init__(self, arch: str, in_channels: int, n: int, share: str):
        super().__init__()
        backbones = [build_backbone(arch, in_channels) for _ in range(n)]
        self.feature_dim = backbones[0].feature_dim
        built = [backbone_pieces(b) for b in backbones]
        cut = share_cut(share, len(built[0][0]), built[0][1])
        self.shared = nn.Sequential(*built[0][0][:cut])
        self.experts = nn.ModuleList(nn.Sequential(*pieces[cut:]) for pieces, _ in built)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(E, N, D) features of every expert."""
        shared = self.shared(x)
        return torch.stack([expert(shared) for expert in self.experts])


# ---------------------------------------------------------------------------------------------- BBN


def bbn_alpha(progress: float) -> float:
    """BBN's cumulative learning adaptor α = 1 − (T/T_max)² (T the 0-based epoch, as the official (epoch−1)/max)."""
    return 1.0 - progress**2


def bbn_loss(logits: torch.Tensor, y_conventional: torch.Tensor, y_reversed: torch.Tensor, alpha: float,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> torch.Tensor:
    """α·L(z, y_c) + (1 − α)·L(z, y_r) on the mixed logits z (BBN eq. 2)."""
    return alpha * criterion(logits, y_conventional) + (1.0 - alpha) * criterion(logits, y_reversed)


class BBNNet(nn.Module):
    """Bilateral branches on shared early layers; one classifier on [α·f_c, (1−α)·f_r] (BBN, Zhou et al. 2020).

    Since the classifier is linear, mixing the features is mixing the two halves' logits; at test both branches see
    the same image and α = 0.5, as the paper states (the official code concatenates unweighted: 2× these logits).
    """

    def __init__(self, arch: str, in_channels: int, num_classes: int, share: str = "all_but_last_block"):
        super().__init__()
        self.share = share
        self.trunks = ExpertTrunks(arch, in_channels, 2, share)
        self.classifier = nn.Linear(2 * self.trunks.feature_dim, num_classes)

    def forward(self, x: torch.Tensor, x_reversed: torch.Tensor | None = None, alpha: float = 0.5) -> torch.Tensor:
        shared = self.trunks.shared(x)
        f_c = self.trunks.experts[0](shared)
        f_r = self.trunks.experts[1](shared if x_reversed is None else self.trunks.shared(x_reversed))
        return self.classifier(torch.cat([alpha * f_c, (1.0 - alpha) * f_r], dim=1))

    def export_args(self) -> dict:
        return {"kind": "bbn", "share": self.share}


# ---------------------------------------------------------------------------------------------- RIDE / experts


class Router(nn.Module):
    """RIDE's expert assignment: for expert i < E−1, ReLU(W_i · normalize(f_i)) next to the top-k of the running mean
    logits of experts 0..i, then one shared linear layer -> logit of 'consult expert i+1' (official EA module)."""

    def __init__(self, n_experts: int, feature_dim: int, num_classes: int, top_k: int = 5, hidden: int = 16):
        super().__init__()
        self.top_k = min(top_k, num_classes)
        self.hidden = nn.ModuleList(nn.Linear(feature_dim, hidden) for _ in range(n_experts - 1))
        self.fc = nn.Linear(hidden + self.top_k, 1)

    def forward(self, features: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
        """(E−1, N) router logits from (E, N, D) features and (E, N, C) expert logits."""
        running = running_mean(expert_logits)
        out = []
        for i, hidden in enumerate(self.hidden):
            h = F.relu(hidden(F.normalize(features[i], dim=1)))
            top = running[i].topk(self.top_k, dim=1).values
            out.append(self.fc(torch.cat([top, h], dim=1)).squeeze(1))
        return torch.stack(out)


class MultiExpertNet(nn.Module):
    """n experts (own later layers and head) on an optionally shared early part; the output is the experts' mean
    logits, or RIDE's routed mean when a router is attached and `routing` is on."""

    def __init__(self, arch: str, in_channels: int, num_classes: int, n_experts: int, share: str = "none",
                 head: str = "linear", scale: float = 1.0, router: dict | None = None):
        super().__init__()
        self.share, self.head_kind, self.scale, self.router_args = share, head, float(scale), router
        self.trunks = ExpertTrunks(arch, in_channels, n_experts, share)
        dim = self.trunks.feature_dim
        make = (lambda: NormedLinear(dim, num_classes)) if head == "cosine" else (lambda: nn.Linear(dim, num_classes))
        self.heads = nn.ModuleList(make() for _ in range(n_experts))
        self.router = Router(n_experts, dim, num_classes, **router) if router else None
        self.routing = self.router is not None
        self.threshold = 0.5

    @property
    def n_experts(self) -> int:
        return len(self.heads)

    def expert_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, N, D) features and (E, N, C) raw head outputs (cosines for a cosine head: multiply by `scale`)."""
        features = self.trunks(x)
        return features, torch.stack([head(f) for head, f in zip(self.heads, features)])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed logits and the number of experts each image used (all of them without a router)."""
        features, raw = self.expert_outputs(x)
        logits = raw * self.scale
        if self.router is None:
            return logits.mean(0), torch.full((len(x),), self.n_experts, device=x.device)
        return route(logits, self.router(features, logits), self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing:
            return self.route(x)[0]
        return self.expert_outputs(x)[1].mean(0) * self.scale

    def export_args(self) -> dict:
        return {"kind": "experts", "n_experts": self.n_experts, "share": self.share, "expert_head": self.head_kind,
                "scale": self.scale, "router": self.router_args, "threshold": self.threshold}


class ExpertView(nn.Module):
    """One expert of a MultiExpertNet as a classifier (shared part + its own layers + head), trained on its own;
    its parameters are the net's, so training the view trains the net's expert."""

    def __init__(self, net: MultiExpertNet, index: int):
        super().__init__()
        self.shared, self.expert, self.head = net.trunks.shared, net.trunks.experts[index], net.heads[index]
        self.scale = net.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.expert(self.shared(x)))


def build_expert_model(arch: str, in_channels: int, num_classes: int, args: dict) -> nn.Module:
    """Rebuild a saved multi-expert model from its ModelSpec.head_args (see export_args)."""
    if args["kind"] == "bbn":
        return BBNNet(arch, in_channels, num_classes, args["share"])
    net = MultiExpertNet(arch, in_channels, num_classes, args["n_experts"], args["share"], args["expert_head"],
                         args["scale"], args["router"])
    net.threshold = args.get("threshold", 0.5)
    return net


def running_mean(expert_logits: torch.Tensor) -> torch.Tensor:
    """(E, N, C): row i is the mean of experts 0..i."""
    steps = torch.arange(1, len(expert_logits) + 1, device=expert_logits.device, dtype=expert_logits.dtype)
    return expert_logits.cumsum(0) / steps.view(-1, 1, 1)


def diversity_temperature(class_counts, base: float, reweight_factor: float, reweighted: bool) -> torch.Tensor:
    """(C,) RIDE diversity temperatures: `base` for every class, or after DRW starts base·w_j with
    w_j = (C·r·π_j + 1 − r) / max_k(...), π the class prior (official RIDELoss)."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    if not reweighted:
        return torch.full((len(counts),), float(base))
    prior = counts / counts.sum()
    weights = len(counts) * prior * reweight_factor + 1.0 - reweight_factor
    return (base * weights / weights.max()).float()


def diversity_loss(expert_logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Σ_k T̄² · KL(softmax(z̄/T) ‖ softmax(z_k/T)), z̄ the experts' mean logits held constant (RIDE's distribution-
    aware diversity term; multiplied by a negative weight it pushes each expert away from the mean)."""
    t = temperature.to(expert_logits).view(1, -1)
    target = F.softmax(expert_logits.mean(0).detach() / t, dim=1)
    total = expert_logits.new_zeros(())
    for logits in expert_logits:
        total = total + F.kl_div(F.log_softmax(logits / t, dim=1), target, reduction="batchmean")
    return total * t.mean() ** 2


def router_targets(expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(E−1, N) float labels of router i: 1 when the mean of experts 0..i is wrong and some longer prefix
    0..j (j > i) is right, i.e. consulting more experts would help (RIDE's expert_help_target)."""
    correct = running_mean(expert_logits).argmax(2) == targets.unsqueeze(0)
    later = correct.flip(0).long().cummax(0).values.flip(0).bool()  # later[j] = any(correct[j:])
    return (~correct[:-1] & later[1:]).float()


def route(expert_logits: torch.Tensor, help_logits: torch.Tensor, threshold: float = 0.5
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """RIDE's test-time routing: every image uses expert 0 and consults expert i+1 while router i (and every
    router before it) says sigmoid > threshold; its logits are the mean over the experts it consulted.

    Returns (N, C) logits and (N,) experts used. All experts are computed here; the cost RIDE reports is `used`.
    """
    go = torch.sigmoid(help_logits) > threshold
    first = torch.ones_like(go[:1])
    active = torch.cat([first, go], 0).long().cumprod(0).bool()  # (E, N): expert i consulted
    used = active.sum(0)
    logits = (expert_logits * active.unsqueeze(2).to(expert_logits)).sum(0) / used.unsqueeze(1).to(expert_logits)
    return logits, used


# ---------------------------------------------------------------------------------------------- LFME


def frequency_groups(class_counts, split: str = "shots", n_groups: int = 3) -> list[np.ndarray]:
    """LFME's class groups, head first: many/medium/few by train counts (empty groups dropped, a one-class group
    merged into its neighbour, since an expert over one class learns nothing), or `n_groups` groups of equal class
    count by decreasing frequency."""
    counts = np.asarray(class_counts)
    if split == "equal":
        order = np.argsort(-counts, kind="stable")
        return [np.sort(g) for g in np.array_split(order, n_groups) if len(g)]
    groups = [g for g in shot_groups(counts).values() if len(g)]
    merged: list[np.ndarray] = []
    for group in groups:
        if len(group) < 2 and merged:
            merged[-1] = np.concatenate([merged[-1], group])
        else:
            merged.append(group)
    if len(merged) > 1 and len(merged[0]) < 2:
        head = merged.pop(0)
        merged[0] = np.concatenate([head, merged[0]])
    return [np.sort(g) for g in merged]


def expert_weight(student_acc: float, expert_acc: float, beta: float) -> float:
    """LFME self-paced expert selection: weight 1 while the student's group accuracy is below β·(the expert's),
    then falling linearly to 0 where the student reaches the expert, and 0 beyond."""
    if expert_acc <= 0:
        return 0.0
    return float(np.clip((expert_acc - student_acc) / ((1.0 - beta) * expert_acc), 0.0, 1.0))


def included_fraction(progress: float, start: float, end: float) -> float:
    """LFME curriculum: the fraction of each group's easiest instances in use, `start` at the first epoch rising
    linearly to 1 at `end` (a fraction of the run)."""
    return float(min(1.0, start + (1.0 - start) * progress / end))


def difficulty_ranks(confidence: torch.Tensor, group_of_image: torch.Tensor) -> torch.Tensor:
    """(N,) rank of each image inside its group by the expert's confidence in the true class, scaled to [0, 1):
    0 is the easiest (most confident) image of its group."""
    ranks = torch.empty(len(confidence), dtype=torch.float64)
    for g in group_of_image.unique():
        idx = torch.nonzero(group_of_image == g).flatten()
        order = idx[torch.argsort(-confidence[idx], stable=True)]
        ranks[order] = torch.arange(len(idx), dtype=torch.float64) / len(idx)
    return ranks.float()


def curriculum_weights(ranks: torch.Tensor, progress: float, start: float, end: float) -> torch.Tensor:
    """1 for the images inside the curriculum at `progress` (easy to hard), 0 for the rest."""
    return (ranks < included_fraction(progress, start, end)).float()


# ---------------------------------------------------------------------------------------------- test-time averaging


def disagreement(expert_preds: torch.Tensor, average_preds: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Per expert: images it gets right that the average gets wrong, and the reverse."""
    avg_right = average_preds == labels
    out = []
    for preds in expert_preds:
        right = preds == labels
        out.append({"expert_right_average_wrong": int((right & ~avg_right).sum()),
                    "average_right_expert_wrong": int((avg_right & ~right).sum())})
    return out
