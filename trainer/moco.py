"""SSD stage I's self-supervised branch: MoCo (He et al. 2020) with SSD's label-aware negatives."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from trainer.distributed import all_gather_rows
from trainer.engine import compiled


def label_aware_info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    queue_labels: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    label_aware: bool = True,
) -> torch.Tensor:
    """Mean InfoNCE -log(e^{q·k/T} / (e^{q·k/T} + Σ_j e^{q·n_j/T})) over queue keys n_j (MoCo eq. 1).

    q, k: (N, D) L2-normalised; queue: (K, D); queue_labels: (K,) long, -1 = unlabelled; labels: (N,).
    With label_aware, keys of query i's own class leave its denominator (SSD; SSD_LT/builder.py does it by zeroing
    their exponentials, here they become -inf logits so cross_entropy's log-sum-exp stays stable). Unlabelled (-1)
    entries are never masked.
    """
    positive = (q * k).sum(1, keepdim=True)
    negatives = q @ queue.to(q.dtype).t()
    if label_aware:
        same_class = (queue_labels[None, :] == labels[:, None]) & (queue_labels[None, :] >= 0)
        negatives = negatives.masked_fill(same_class, float("-inf"))
    logits = torch.cat([positive, negatives], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def projector(feature_dim: int, dim: int) -> nn.Sequential:
    """MoCo-v2 head: Linear(f, f) - ReLU - Linear(f, dim), no BN, as SSD_LT/builder.py's q_fc."""
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, dim))


class MoCo(nn.Module):
    """Momentum key encoder + projector, a queue of labelled keys, and the label-aware contrastive loss.

    The query encoder is the caller's backbone (the classifier sits on the same features), so it is kept by reference
    and not registered: its weights live in the caller's model, and this module's parameters are just the query
    projector (the frozen key copies have requires_grad False). The state_dict holds the projectors, key encoder,
    queue, queue labels and pointer, so saving it with the caller's model resumes the branch exactly.

    Key-encoder BatchNorm: the EMA covers parameters only (as MoCo and SSD do); the key encoder keeps its own BN
    running buffers, and in train mode it normalises keys with their batch statistics. MoCo's shuffle-BN (shuffling
    the key batch across GPUs so query and key BN see different samples) is a multi-GPU trick; on one device we use
    no shuffle. The trade-off: BN statistics can leak which key belongs to which batch, a shortcut shuffle-BN blocks;
    the label-aware CE term and the 0.999 momentum limit it in practice, and single-device training stays simple.
    Measured: a single-device shuffle-BN (BatchNorm over 8 or 2 sub-batches, keys regrouped so a query and its key
    rarely share one) lowered stage I on the CPU table (seed 0: 63.0 / 64.0 vs 65.6), so it was not kept.

    Data-parallel (several workers): each worker's key encoder normalises its own key batch (per-worker BN, no
    shuffle, the same trade-off as on one device), and every step enqueues the keys and labels all-gathered from
    every worker in rank order, so all workers hold the same queue, filled as by one worker with the global batch.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        dim: int = 128,
        queue_size: int = 8192,
        momentum: float = 0.999,
        temperature: float = 0.2,
        label_aware: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self._query_encoder = (encoder,)  # a tuple, so nn.Module does not register (and duplicate) the caller's model
        self.momentum, self.temperature, self.label_aware = momentum, temperature, label_aware
        self.projector = projector(feature_dim, dim)
        self.key_encoder = copy.deepcopy(encoder)
        self.key_projector = copy.deepcopy(self.projector)
        for p in (*self.key_encoder.parameters(), *self.key_projector.parameters()):
            p.requires_grad_(False)
        keys = torch.randn(queue_size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", F.normalize(keys, dim=1))
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._key_path = (self.encode_keys,)  # a tuple, so a compiled wrapper is never registered (see compile_keys)

    def encode_keys(self, key_images: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys of the momentum encoder and projector."""
        return F.normalize(self.key_projector(self.key_encoder(key_images)), dim=1)

    def compile_keys(self, mode: str) -> None:
        """Run the key path through torch.compile (engine.compiled) without touching the state_dict."""
        self._key_path = (compiled(self.encode_keys, mode),)

    @property
    def encoder(self) -> nn.Module:
        return self._query_encoder[0]

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        query = [*self.encoder.parameters(), *self.projector.parameters()]
        key = [*self.key_encoder.parameters(), *self.key_projector.parameters()]
        return key, query

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k ← m θ_k + (1 - m) θ_q for the key encoder and projector parameters (MoCo eq. 2)."""
        key, query = self._pairs()
        # One fused kernel per device instead of one per tensor (the approach timm's EMA takes); lerp is exact at
        # weight 0 and 1, so m=1 keeps and m=0 copies bit for bit.
        torch._foreach_lerp_(key, [p.detach() for p in query], 1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Write keys (B, D) and labels (B,) into the ring buffer; any B, wrapping around, keeping the newest K."""
        size = self.queue.shape[0]
        n = min(len(keys), size)
        # Slots as if the B keys were written one by one from the pointer: the last n land at ptr + B - n onwards.
        # Computed on the device, so no host sync per step.
        slots = (self.queue_ptr + len(keys) - n + torch.arange(n, device=self.queue.device)) % size
        self.queue.index_copy_(0, slots, keys[-n:].to(self.queue.dtype))
        self.queue_labels.index_copy_(0, slots, labels[-n:].to(self.queue_labels.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def forward(self, query_features: torch.Tensor, key_images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Contrastive loss of the query backbone's features (N, feature_dim) against keys of key_images (N, C, H, W).

        Order as MoCo: project queries, EMA-update the key side, encode keys, loss against the current queue, then
        enqueue the keys with their labels. Only the query projector and (through query_features) the backbone get
        gradients.
        """
        q = F.normalize(self.projector(query_features), dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = self._key_path[0](key_images)
        # A copy, because enqueue() overwrites the queue in place while autograd still needs it for q's gradient.
        queue = self.queue.clone()
        loss = label_aware_info_nce(q, k, queue, self.queue_labels, labels, self.temperature, self.label_aware)
        self.enqueue(all_gather_rows(k), all_gather_rows(labels))
        return loss
