"""The multi-expert rules against hand-computed cases: BBN's adaptor and mixing, RIDE's diversity loss, router labels
and routing, LFME's groups, expert weights and curriculum, test-time averaging's disagreement counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.experts import (
    BBNNet,
    ExpertTrunks,
    ExpertView,
    MultiExpertNet,
    backbone_pieces,
    bbn_alpha,
    bbn_loss,
    build_expert_model,
    curriculum_weights,
    difficulty_ranks,
    disagreement,
    diversity_loss,
    diversity_temperature,
    expert_weight,
    frequency_groups,
    included_fraction,
    route,
    router_targets,
    share_cut,
)
from trainer.losses import kd_loss, kd_per_image
from trainer.models import build_backbone


def test_bbn_alpha_is_the_parabolic_adaptor():
    assert [bbn_alpha(p) for p in (0.0, 0.5, 1.0)] == [1.0, 0.75, 0.0]


def test_bbn_loss_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    loss = bbn_loss(logits, torch.tensor([1]), torch.tensor([0]), alpha=0.75)
    assert loss.item() == pytest.approx(0.75 * math.log(4 / 3) + 0.25 * math.log(4), rel=1e-6)


def test_bbn_mixes_branch_features_with_alpha_and_uses_the_reversed_batch():
    torch.manual_seed(0)
    net = BBNNet("resnet8", 1, 4).eval()
    x, x_r = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    shared, shared_r = net.trunks.shared(x), net.trunks.shared(x_r)
    f_c, f_r = net.trunks.experts[0](shared), net.trunks.experts[1](shared_r)
    w, b = net.classifier.weight, net.classifier.bias
    d = f_c.shape[1]
    with torch.no_grad():
        expected = 0.3 * f_c @ w[:, :d].T + 0.7 * f_r @ w[:, d:].T + b
        torch.testing.assert_close(net(x, x_r, alpha=0.3), expected)
        # test time: one image through both branches, α = 0.5
        f_r_same = net.trunks.experts[1](shared)
        torch.testing.assert_close(net(x), 0.5 * f_c @ w[:, :d].T + 0.5 * f_r_same @ w[:, d:].T + b)


def test_route_stops_at_the_first_router_that_says_no():
    # 3 experts, 3 images; expert i outputs the constant logits row [i, 0].
    expert_logits = torch.tensor([[[0.0, 0.0]] * 3, [[1.0, 0.0]] * 3, [[2.0, 0.0]] * 3])
    help_logits = torch.tensor([[-1.0, 1.0, 1.0],    # router 0: image 0 stops at expert 0
                                [1.0, -1.0, 1.0]])   # router 1: image 1 stops at 2 experts; image 0 already stopped
    logits, used = route(expert_logits, help_logits)
    assert used.tolist() == [1, 2, 3]
    torch.testing.assert_close(logits[:, 0], torch.tensor([0.0, 0.5, 1.0]))  # means of 0 | 0,1 | 0,1,2
    # threshold above every sigmoid: every image uses expert 0 only
    assert route(expert_logits, help_logits, threshold=0.99)[1].tolist() == [1, 1, 1]


def test_router_targets_say_whether_more_experts_would_help():
    # 2 classes, target 0 for every image; columns: images a, b, c, d
    z = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 3.0]],  # expert 0
        [[0.0, 1.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0]],  # expert 1
        [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [6.0, 0.0]],  # expert 2
    ])
    # running-mean argmax: a: 0,?,? right first -> [0, 0]; b: wrong, right (mean [1, .5]) -> [1, 0];
    # c: always wrong -> [0, 0]; d: wrong, wrong (mean [0, 1.5]), right (mean [2, 1]) -> [1, 1]
    targets = router_targets(z, torch.zeros(4, dtype=torch.long))
    assert targets.tolist() == [[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]


def test_diversity_loss_hand_value():
    same = torch.randn(3, 5, 4)[:1].repeat(3, 1, 1)
    assert diversity_loss(same, torch.ones(4)).item() == pytest.approx(0.0, abs=1e-6)
    z = torch.tensor([[[0.0, 0.0]], [[math.log(9.0), 0.0]]])  # 2 experts, 1 image; mean logits [log 3, 0]
    q = torch.tensor([0.75, 0.25])
    p1, p2 = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    expected = float((q * (q / p1).log()).sum() + (q * (q / p2).log()).sum())
    assert diversity_loss(z, torch.ones(2)).item() == pytest.approx(expected, rel=1e-5)
    # temperature 2 on logits 2z gives the same distributions, times T̄² = 4
    assert diversity_loss(2 * z, torch.full((2,), 2.0)).item() == pytest.approx(4 * expected, rel=1e-5)


def test_diversity_loss_pushes_experts_apart_under_a_negative_weight():
    z = torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]]], requires_grad=True)
    (-0.2 * diversity_loss(z, torch.ones(2))).backward()
    # descending -0.2·KL moves each expert away from the mean (1 above it, 2 below it)
    assert z.grad[0, 0, 0] < 0 and z.grad[1, 0, 0] > 0


def test_diversity_temperature_before_and_after_reweighting():
    assert diversity_temperature([3, 1], 1.5, 0.5, reweighted=False).tolist() == [1.5, 1.5]
    # prior [.75, .25]: w = 2·0.5·prior + 0.5 = [1.25, 0.75], / max -> [1, 0.6]
    torch.testing.assert_close(diversity_temperature([3, 1], 2.0, 0.5, reweighted=True), torch.tensor([2.0, 1.2]))


def test_frequency_groups_shots_equal_and_merging():
    counts = [500, 200, 150, 80, 50, 30, 10, 5]
    assert [g.tolist() for g in frequency_groups(counts)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    # one many-shot class alone would be a one-class expert: merged into the medium group
    assert [g.tolist() for g in frequency_groups([120, 90, 60, 15, 10])] == [[0, 1, 2], [3, 4]]
    # no few-shot classes (IF 10): two groups
    assert [g.tolist() for g in frequency_groups([500, 300, 200, 90, 50])] == [[0, 1, 2], [3, 4]]
    assert [g.tolist() for g in frequency_groups([5, 1, 4, 2, 3, 6], "equal", 3)] == [[0, 5], [2, 4], [1, 3]]


def test_expert_weight_self_paced_selection():
    assert expert_weight(0.40, 0.8, beta=0.6) == 1.0
    assert expert_weight(0.48, 0.8, beta=0.6) == pytest.approx(1.0)
    assert expert_weight(0.64, 0.8, beta=0.6) == pytest.approx(0.5)
    assert expert_weight(0.80, 0.8, beta=0.6) == 0.0
    assert expert_weight(0.95, 0.8, beta=0.6) == 0.0


def test_curriculum_goes_from_easy_to_all():
    assert [included_fraction(p, 0.5, 0.5) for p in (0.0, 0.25, 0.5, 0.9)] == [0.5, 0.75, 1.0, 1.0]
    ranks = difficulty_ranks(torch.tensor([0.9, 0.1, 0.5, 0.7]), torch.tensor([0, 0, 1, 1]))
    assert ranks.tolist() == [0.0, 0.5, 0.5, 0.0]
    assert curriculum_weights(ranks, 0.0, 0.5, 0.5).tolist() == [1.0, 0.0, 0.0, 1.0]  # the easier half of each group
    assert curriculum_weights(ranks, 0.5, 0.5, 0.5).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_kd_per_image_is_the_hand_computed_kl_and_averages_to_kd_loss():
    s, t = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    q = torch.softmax(t / 2.0, 1)
    # row 0: q = (1/2, 1/2), p = softmax(1, 0); KL = Σ q log(q/p), times T² = 4
    p0 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    expected0 = 4 * float((0.5 * torch.log(0.5 / p0)).sum())
    per_image = kd_per_image(s, q, 2.0)
    assert per_image[0].item() == pytest.approx(expected0, rel=1e-5)
    assert per_image[1].item() > 0  # row 1: uniform student against a confident teacher
    assert kd_loss(s, q, 2.0).item() == pytest.approx(per_image.mean().item(), rel=1e-6)


def test_disagreement_counts():
    labels = torch.tensor([0, 1, 2, 3])
    average = torch.tensor([0, 1, 0, 0])  # right on images 0, 1
    experts = torch.tensor([[0, 0, 2, 3],   # right on 0, 2, 3
                            [0, 1, 0, 0]])  # same as the average
    assert disagreement(experts, average, labels) == [
        {"expert_right_average_wrong": 2, "average_right_expert_wrong": 1},
        {"expert_right_average_wrong": 0, "average_right_expert_wrong": 0}]


@pytest.mark.parametrize("arch", ["resnet8", "resnet10"])
def test_backbone_pieces_compute_the_backbone(arch):
    torch.manual_seed(0)
    backbone = build_backbone(arch, 3).eval()
    pieces, second = backbone_pieces(backbone)
    x = torch.randn(2, 3, 32, 32)
    out = x
    for piece in pieces:
        out = piece(out)
    torch.testing.assert_close(out, backbone(x))
    if arch == "resnet8":  # stem, 3 blocks, pool; stage 2 starts at block 2
        assert (len(pieces), second) == (5, 2)
        assert [share_cut(s, 5, 2) for s in ("none", "stem", "first_stage", "all_but_last_block")] == [0, 1, 2, 3]


def test_shared_trunk_is_shared_and_experts_differ():
    torch.manual_seed(0)
    trunks = ExpertTrunks("resnet8", 1, 3, "first_stage").eval()
    assert len(trunks.shared) == 2 and all(len(e) == 3 for e in trunks.experts)
    feats = trunks(torch.randn(4, 1, 28, 28))
    assert feats.shape == (3, 4, 64) and not torch.allclose(feats[0], feats[1])


def test_multi_expert_output_is_the_scaled_mean_and_round_trips_through_export_args():
    torch.manual_seed(0)
    net = MultiExpertNet("resnet8", 1, 5, 3, "stem", head="cosine", scale=30.0,
                         router={"top_k": 3, "hidden": 4}).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        views = torch.stack([ExpertView(net, i)(x) for i in range(3)])
        net.routing = False
        torch.testing.assert_close(net(x), 30.0 * views.mean(0))
        net.routing = True
        features, raw = net.expert_outputs(x)
        expected, _ = route(raw * 30.0, net.router(features, raw * 30.0))
        torch.testing.assert_close(net(x), expected)
        copy = build_expert_model("resnet8", 1, 5, net.export_args())
        copy.load_state_dict(net.state_dict())
        torch.testing.assert_close(copy.eval()(x), net(x))
    assert np.all(np.asarray(net.route(x)[1]) >= 1)
