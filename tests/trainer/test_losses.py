"""Long-tail losses against hand-computed values and the special cases that reduce them to cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import LossConfig
from trainer.losses import (
    LOSS_NAMES,
    LongTailLoss,
    build_loss,
    effective_number_weights,
    eql_tail_classes,
    focal_loss,
    kd_loss,
    ldam_loss,
    ldam_margins,
    logit_adjusted_loss,
    sigmoid_eql_loss,
    softmax_eql_loss,
)

COUNTS = torch.tensor([500, 100, 20, 5])


def _batch(seed: int = 0, n: int = 16, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def test_focal_loss_hand_value():
    # softmax([0, log 3]) = [1/4, 3/4]; target 1: p_t = 3/4, γ = 2: -(1/4)^2 log(3/4).
    logits = torch.tensor([[0.0, math.log(3.0)]])
    targets = torch.tensor([1])
    assert focal_loss(logits, targets, gamma=2.0).item() == pytest.approx(-(0.25**2) * math.log(0.75), rel=1e-5)
    weight = torch.tensor([1.0, 4.0])
    weighted = focal_loss(logits, targets, gamma=2.0, weight=weight).item()
    assert weighted == pytest.approx(-4.0 * 0.25**2 * math.log(0.75), rel=1e-5)


def test_focal_gamma_zero_is_ce_and_gamma_down_weights_easy_examples():
    logits, targets = _batch()
    assert focal_loss(logits, targets, 0.0).item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    # γ > 0 only shrinks each term, so the mean drops below CE.
    assert focal_loss(logits, targets, 2.0).item() < F.cross_entropy(logits, targets).item()


def test_focal_loss_is_finite_on_confident_predictions():
    logits = torch.tensor([[60.0, -60.0]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([0]), gamma=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_effective_number_weights_hand_value_and_limits():
    # β = 0.5, n = [1, 2]: (1-β)/(1-β^n) = [1, 2/3] -> normalised to sum 2: [1.2, 0.8].
    torch.testing.assert_close(effective_number_weights([1, 2], 0.5), torch.tensor([1.2, 0.8]))
    # β -> 1 approaches inverse frequency; β -> 0 approaches uniform weights.
    inv = 1.0 / COUNTS.double()
    expected = (inv / inv.sum() * 4).float()
    torch.testing.assert_close(effective_number_weights(COUNTS, 1 - 1e-9), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(effective_number_weights(COUNTS, 1e-6), torch.ones(4), rtol=1e-4, atol=1e-5)
    w = effective_number_weights(COUNTS, 0.9999)
    assert w.sum().item() == pytest.approx(4.0, rel=1e-6)
    assert torch.all(w[1:] > w[:-1])  # rarer classes weigh more


def test_ldam_margins_hand_value():
    # n^{-1/4} of [1, 16, 81] = [1, 1/2, 1/3], scaled so the largest is 0.5.
    torch.testing.assert_close(ldam_margins([1, 16, 81], 0.5), torch.tensor([0.5, 0.25, 1 / 6]))


def test_ldam_loss_subtracts_margin_from_true_class_only():
    logits = torch.tensor([[0.2, 0.1, -0.3], [0.0, 0.5, 0.4]])
    targets = torch.tensor([0, 2])
    margins = torch.tensor([0.5, 0.25, 0.1])
    shifted = torch.tensor([[0.2 - 0.5, 0.1, -0.3], [0.0, 0.5, 0.4 - 0.1]])
    rows = [torch.logsumexp(10 * s, 0) - 10 * s[t] for s, t in zip(shifted, targets)]
    expected = torch.stack(rows).mean()
    assert ldam_loss(logits, targets, margins, scale=10.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # Zero margins leave scaled CE.
    plain = F.cross_entropy(10 * logits, targets)
    assert ldam_loss(logits, targets, torch.zeros(3), scale=10.0).item() == pytest.approx(plain.item(), rel=1e-6)


def test_logit_adjusted_loss_hand_value():
    # Zero logits, counts [3, 1]: adjusted logits = log [3/4, 1/4]; target 1 -> -log(1/4).
    logits, targets = torch.zeros(1, 2), torch.tensor([1])
    assert logit_adjusted_loss(logits, targets, [3, 1], tau=1.0).item() == pytest.approx(math.log(4.0), rel=1e-6)
    # τ = 2 doubles the shift: softmax([2 log 3/4, 2 log 1/4]) = [9/10, 1/10].
    assert logit_adjusted_loss(logits, targets, [3, 1], tau=2.0).item() == pytest.approx(math.log(10.0), rel=1e-6)
    batch_logits, batch_targets = _batch()
    ce = F.cross_entropy(batch_logits, batch_targets).item()
    assert logit_adjusted_loss(batch_logits, batch_targets, COUNTS, tau=0.0).item() == pytest.approx(ce, rel=1e-6)


def test_kd_loss_hand_value_with_exact_zeros():
    # Student logits [0, 0, 0] at T = 2 give q = 1/3 each; targets [1/2, 1/2, 0]:
    # KL = Σ p log(p/q) = log(3/2); times T² = 4.
    student = torch.zeros(1, 3, requires_grad=True)
    soft = torch.tensor([[0.5, 0.5, 0.0]])
    loss = kd_loss(student, soft, temperature=2.0)
    assert loss.item() == pytest.approx(4.0 * math.log(1.5), rel=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_kd_loss_is_zero_when_student_matches_and_averages_over_batch():
    teacher = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    soft = torch.softmax(teacher / 3.0, dim=1)
    assert kd_loss(teacher, soft, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(2, 3)
    per_row = [(p * (p / (1 / 3)).log()).sum() for p in soft]
    expected = 9.0 * torch.stack(per_row).mean()
    assert kd_loss(student, soft, temperature=3.0).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_build_loss_matches_the_plain_functions(name):
    logits, targets = _batch(1)
    cfg = LossConfig(name=name, focal_gamma=2.0, logit_adjust_tau=0.5)
    loss = build_loss(cfg, COUNTS.numpy())
    cb = effective_number_weights(COUNTS, cfg.cb_beta)
    expected = {
        "ce": lambda: F.cross_entropy(logits, targets),
        "focal": lambda: focal_loss(logits, targets, 2.0),
        "cb": lambda: F.cross_entropy(logits, targets, weight=cb),
        "ldam": lambda: ldam_loss(logits, targets, ldam_margins(COUNTS, 0.5), 30.0),
        "balanced_softmax": lambda: logit_adjusted_loss(logits, targets, COUNTS, tau=1.0),
        "logit_adjust": lambda: logit_adjusted_loss(logits, targets, COUNTS, tau=0.5),
        # the rarest class has frequency 5/625 = 0.008 ≥ λ = 5e-3: no tail class, so EQL is plain CE
        "eql": lambda: F.cross_entropy(logits, targets),
    }[name]()
    assert loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_drw_switches_on_class_weights_at_drw_start():
    logits, targets = _batch(2)
    loss = build_loss(LossConfig(name="ldam", drw_start=0.8), COUNTS)
    margins = ldam_margins(COUNTS)
    weights = effective_number_weights(COUNTS, 0.9999)
    before = ldam_loss(logits, targets, margins)
    after = ldam_loss(logits, targets, margins, weight=weights)
    assert before.item() != pytest.approx(after.item(), rel=1e-3)
    assert loss(logits, targets, progress=0.5).item() == pytest.approx(before.item(), rel=1e-6)
    assert loss(logits, targets, progress=0.8).item() == pytest.approx(after.item(), rel=1e-6)
    assert loss.class_weights(0.79) is None
    # Without DRW only "cb" re-weights, from the start.
    assert build_loss(LossConfig(name="ce"), COUNTS).class_weights(1.0) is None
    torch.testing.assert_close(build_loss(LossConfig(name="cb"), COUNTS).class_weights(0.0), weights)


def test_unknown_loss_name_lists_known_names():
    with pytest.raises(ValueError, match="balanced_softmax"):
        build_loss(LossConfig.model_construct(name="nope", drw_start=None), COUNTS)
    with pytest.raises(ValueError, match="known losses"):
        LongTailLoss("hinge", COUNTS)


def test_loss_buffers_stay_out_of_state_dict():
    assert build_loss(LossConfig(name="ldam"), COUNTS).state_dict() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_runs_on_cuda_logits_without_moving_the_module(name):
    logits, targets = _batch(3)
    loss = build_loss(LossConfig(name=name, drw_start=0.5), COUNTS)
    cpu = loss(logits, targets, progress=0.9)
    gpu = loss(logits.cuda(), targets.cuda(), progress=0.9)
    assert gpu.device.type == "cuda"
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4)


def test_eql_tail_classes_by_frequency_threshold():
    # f = [0.9, 0.09, 0.01]: only the last class is below λ = 0.05.
    assert eql_tail_classes([90, 9, 1], 0.05).tolist() == [False, False, True]
    assert eql_tail_classes([90, 9, 1], 0.1).tolist() == [False, True, True]


def test_sigmoid_eql_hand_value_drops_only_tail_negatives():
    logits, targets = torch.zeros(1, 3), torch.tensor([0])
    tail = torch.tensor([False, False, True])
    # BCE(0, y) = log 2 per class; the tail class 2 is a negative here, so its term is dropped: 2 log 2, not 3 log 2.
    assert sigmoid_eql_loss(logits, targets, tail).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    # An image of the tail class keeps its own (positive) term: nothing dropped.
    assert sigmoid_eql_loss(logits, torch.tensor([2]), tail).item() == pytest.approx(3 * math.log(2), rel=1e-6)


def test_softmax_eql_hand_value_and_gradient():
    logits = torch.zeros(2, 3, requires_grad=True)
    targets = torch.tensor([0, 2])
    tail = torch.tensor([False, True, True])
    drop = torch.tensor([[True, True, False], [True, True, True]])
    loss = softmax_eql_loss(logits, targets, tail, gamma=0.5, drop=drop)
    # Image 0: class 1 (tail, dropped) leaves the denominator: -log(1/2). Image 1: its own class 2 is never dropped,
    # class 1 is, class 0 is a head class (never dropped): -log(1/2). Mean: log 2.
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 1] == 0  # the tail class gets no negative gradient
    assert logits.grad[0, 2] < 0 or logits.grad[0, 2] > 0  # class 2 was not dropped for image 0
    assert logits.grad[1, 0] > 0  # head-class negatives are kept


def test_softmax_eql_gamma_limits():
    logits, targets = _batch(4)
    tail = torch.tensor([False, False, True, True])
    # γ = 0: β is never 1, so nothing is dropped: plain CE.
    assert softmax_eql_loss(logits, targets, tail, 0.0).item() == pytest.approx(
        F.cross_entropy(logits, targets).item(), rel=1e-6)
    # γ = 1: every tail negative is dropped, the same as masking them out by hand.
    mask = tail.unsqueeze(0) & (F.one_hot(targets, 4) == 0)
    expected = F.cross_entropy(logits.masked_fill(mask, float("-inf")), targets)
    assert softmax_eql_loss(logits, targets, tail, 1.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() < F.cross_entropy(logits, targets).item()


def test_build_loss_eql_uses_lambda_and_variant():
    logits, targets = _batch(5)
    counts = torch.tensor([600, 300, 90, 10])  # f = [.6, .3, .09, .01]
    sig = build_loss(LossConfig(name="eql", eql_variant="sigmoid", eql_lambda=0.05), counts)
    assert sig(logits, targets).item() == pytest.approx(
        sigmoid_eql_loss(logits, targets, torch.tensor([False, False, False, True])).item(), rel=1e-6)
    soft = build_loss(LossConfig(name="eql", eql_lambda=0.05, eql_gamma=1.0), counts)
    assert soft(logits, targets).item() == pytest.approx(
        softmax_eql_loss(logits, targets, torch.tensor([False, False, False, True]), 1.0).item(), rel=1e-6)
