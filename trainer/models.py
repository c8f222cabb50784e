"""Backbones (CIFAR ResNets, torchvision ResNets), linear/cosine heads, the classifier and SSD's two-head student."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: stride-2 subsample plus zero channel padding (He et al. 2016, CIFAR option A)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_shortcut = stride != 1 or in_planes != planes
        self.shortcut = OptionAShortcut((planes - in_planes) // 2) if needs_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32-px images as LDAM-DRW's resnet_cifar: 16/32/64 channels, GAP, 64-d feature."""

    def __init__(self, depth: int = 32, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.feature_dim = 64
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def torchvision_backbone(arch: str, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-10/50 or ResNeXt-50 (random init, no download) with the fc removed."""
    if arch == "resnet10":
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    elif arch == "resnet50":
        net = torchvision.models.resnet50(weights=None)
    elif arch == "resnext50":
        net = torchvision.models.resnext50_32x4d(weights=None)
    else:
        raise ValueError(f"unknown torchvision arch {arch!r}")
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


BACKBONES = {
    "resnet8": lambda c: CifarResNet(8, c),
    "resnet20": lambda c: CifarResNet(20, c),
    "resnet32": lambda c: CifarResNet(32, c),
    "resnet10": lambda c: torchvision_backbone("resnet10", c),
    "resnet50": lambda c: torchvision_backbone("resnet50", c),
    "resnext50": lambda c: torchvision_backbone("resnext50", c),
}


def build_backbone(arch: str, in_channels: int = 3) -> nn.Module:
    """Backbone by name; every backbone maps images to (N, feature_dim) features."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[arch](in_channels)


class NormedLinear(nn.Module):
    """Cosine head: normalised features times normalised weights, no bias (LDAM-DRW uses it with LDAM)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


class Classifier(nn.Module):
    """Backbone + one head; the head is swappable so stage II can re-balance it on a frozen backbone."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class TwoHeadStudent(nn.Module):
    """SSD stage III student: one backbone, a hard head (CE on labels) and a soft head (KD on soft labels)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.hard_head = nn.Linear(backbone.feature_dim, num_classes)
        self.soft_head = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return self.hard_head(features), self.soft_head(features)


def build_classifier(arch: str, in_channels: int, num_classes: int, cosine_head: bool = False) -> Classifier:
    backbone = build_backbone(arch, in_channels)
    head = NormedLinear(backbone.feature_dim, num_classes) if cosine_head else nn.Linear(backbone.feature_dim, num_classes)
    return Classifier(backbone, head)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
