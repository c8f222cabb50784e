"""Architectures are pinned: ResNet-32 is the 0.46 M-parameter CIFAR net, not a wider model under its name."""

import pytest
import torch

from trainer.models import OptionAShortcut, TwoHeadStudent, build_backbone, build_classifier, count_parameters


def test_resnet32_parameter_count_is_pinned():
    assert count_parameters(build_classifier("resnet32", 3, 10)) == 464_154
    assert count_parameters(build_classifier("resnet32", 3, 100)) == 470_004
    assert count_parameters(build_backbone("resnet32")) == 464_154 - (64 * 10 + 10)


def test_option_a_shortcut_is_parameter_free_and_pads_channels():
    shortcut = OptionAShortcut(pad=8)
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4) and not list(shortcut.parameters())
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and y[:, :8].abs().sum() == 0


@pytest.mark.parametrize("arch, channels, size", [("resnet8", 1, 28), ("resnet32", 3, 32), ("resnet10", 3, 64)])
def test_backbones_give_features(arch, channels, size):
    backbone = build_backbone(arch, channels)
    assert backbone(torch.randn(2, channels, size, size)).shape == (2, backbone.feature_dim)


def test_two_head_student_and_unknown_arch():
    student = TwoHeadStudent(build_backbone("resnet8"), 7)
    hard, soft = student(torch.randn(3, 3, 32, 32))
    assert hard.shape == soft.shape == (3, 7) and not torch.equal(hard, soft)
    with pytest.raises(ValueError, match="resnet32"):
        build_backbone("resnet33")
