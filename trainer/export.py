"""Self-describing model files: weights plus everything needed to rebuild and feed the network (serving, labels)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from trainer.checkpoint import save_checkpoint
from trainer.classifiers import LWSClassifier, NCMClassifier, TauNormClassifier
from trainer.models import Classifier, NormedLinear, build_backbone


@dataclass
class ModelSpec:
    """What a model file says about itself; stored next to the state_dict as plain values (weights_only-safe)."""

    arch: str
    in_channels: int
    num_classes: int
    head: str  # linear | cosine | lws | tau_norm | ncm | experts (a multi-expert model: BBN, RIDE, experts + TA)
    class_names: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    role: str  # teacher | student | classifier
    method: str
    fingerprint: str
    head_args: dict = field(default_factory=dict)  # tau, ncm metric; experts: trainer.experts export_args()
    resize: int | None = None  # eval: shorter side resized to this, then centre crop image_size (None: image_size)
    metrics: dict = field(default_factory=dict)


def head_kind(head: nn.Module) -> tuple[str, dict]:
    if hasattr(head, "export_args"):  # a multi-expert model (trainer/experts.py): rebuilt whole by load_model
        return "experts", head.export_args()
    if isinstance(head, LWSClassifier):
        return "lws", {}
    if isinstance(head, TauNormClassifier):
        return "tau_norm", {"tau": head.tau}
    if isinstance(head, NCMClassifier):
        return "ncm", {"metric": head.metric}
    if isinstance(head, NormedLinear):
        return "cosine", {}
    if isinstance(head, nn.Linear):
        return "linear", {}
    raise TypeError(f"no export rule for head {type(head).__name__}")


def build_head(kind: str, features: int, classes: int, args: dict) -> nn.Module:
    linear = nn.Linear(features, classes)
    if kind == "linear":
        return linear
    if kind == "cosine":
        return NormedLinear(features, classes)
    if kind == "lws":
        return LWSClassifier(linear)
    if kind == "tau_norm":
        return TauNormClassifier(linear, args["tau"])
    if kind == "ncm":
        return NCMClassifier(torch.zeros(classes, features), torch.zeros(features), args["metric"])
    raise ValueError(f"unknown head kind {kind!r}")


def save_model(path: Path, model: Classifier, spec: ModelSpec) -> str:
    """Write the model file atomically; returns its sha256 (the teacher hash a labelset's provenance records)."""
    save_checkpoint(path, {"spec": asdict(spec), "state_dict": model.state_dict()})
    return file_sha256(path)


def load_model(path: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild a saved classifier (images -> logits) in eval mode; loads with weights_only=True.

    The model comes back in NHWC layout (channels_last), which oneDNN runs about 15% faster for inference on a CPU
    than NCHW; serving and label generation both load through here.
    """
    state = torch.load(path, map_location=map_location, weights_only=True)
    spec = ModelSpec(**state["spec"])
    if spec.head == "experts":
        from trainer.experts import build_expert_model

        model = build_expert_model(spec.arch, spec.in_channels, spec.num_classes, spec.head_args)
        model.load_state_dict(state["state_dict"])
        return model.eval().to(memory_format=torch.channels_last), spec
    backbone = build_backbone(spec.arch, spec.in_channels)
    model = Classifier(backbone, build_head(spec.head, backbone.feature_dim, spec.num_classes, spec.head_args))
    model.load_state_dict(state["state_dict"])
    return model.eval().to(memory_format=torch.channels_last), spec


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
