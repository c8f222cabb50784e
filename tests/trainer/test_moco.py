"""MoCo branch: label-aware InfoNCE by hand, momentum update, ring-buffer queue, gradients, a short training run."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.moco import MoCo, label_aware_info_nce


def small_encoder(in_dim=6, feature_dim=8, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU())


def test_label_aware_masking_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queue_labels = torch.tensor([3, -1, 5])
    labels = torch.tensor([3, 5])
    t = 0.5
    # Query 0 (class 3): positive 0.6; negatives 1 (class 3, masked), 0, -1.
    loss0 = -0.6 / t + math.log(math.exp(0.6 / t) + math.exp(0 / t) + math.exp(-1 / t))
    # Query 1 (class 5): positive 1; negatives 0, 1 (unlabelled, kept), 0 (class 5, masked).
    loss1 = -1 / t + math.log(math.exp(1 / t) + math.exp(0 / t) + math.exp(1 / t))
    got = label_aware_info_nce(q, k, queue, queue_labels, labels, t)
    assert got.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-6)
    # Without masking, query 0 also counts e^{1/t} and query 1 counts e^{0/t}.
    plain0 = -0.6 / t + math.log(math.exp(0.6 / t) + math.exp(1 / t) + 1 + math.exp(-1 / t))
    plain1 = -1 / t + math.log(math.exp(1 / t) + 1 + math.exp(1 / t) + 1)
    plain = label_aware_info_nce(q, k, queue, queue_labels, labels, t, label_aware=False)
    assert plain.item() == pytest.approx((plain0 + plain1) / 2, rel=1e-6)


def test_without_label_awareness_equals_plain_info_nce():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    k = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    queue = F.normalize(torch.randn(7, 4, generator=g), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    queue_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    t = 0.2
    pos = torch.exp((q * k).sum(1) / t)
    neg = torch.exp(q @ queue.t() / t).sum(1)
    expected = -torch.log(pos / (pos + neg)).mean()
    got = label_aware_info_nce(q, k, queue, queue_labels, labels, t, label_aware=False)
    assert torch.allclose(got, expected, rtol=1e-5)
    # With masking the same-class terms drop out of the sum (SSD_LT/builder.py zeroes their exponentials).
    keep = (queue_labels[None, :] != labels[:, None]).float()
    neg_masked = (torch.exp(q @ queue.t() / t) * keep).sum(1)
    masked = label_aware_info_nce(q, k, queue, queue_labels, labels, t)
    assert torch.allclose(masked, -torch.log(pos / (pos + neg_masked)).mean(), rtol=1e-5)


def test_unlabelled_queue_entries_are_never_masked():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    k = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    queue = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    unlabelled = torch.full((6,), -1)
    for labels in (torch.tensor([0, 1, 2]), torch.tensor([-1, -1, -1])):
        aware = label_aware_info_nce(q, k, queue, unlabelled, labels, 0.2)
        plain = label_aware_info_nce(q, k, queue, unlabelled, labels, 0.2, label_aware=False)
        assert torch.equal(aware, plain)


def test_init_builds_frozen_key_copies_and_random_unit_queue():
    encoder = small_encoder()
    moco = MoCo(encoder, feature_dim=8, dim=4, queue_size=10, seed=3)
    assert moco.queue.shape == (10, 4) and torch.allclose(moco.queue.norm(dim=1), torch.ones(10))
    assert torch.equal(moco.queue_labels, torch.full((10,), -1))
    assert torch.equal(moco.queue, MoCo(small_encoder(), 8, 4, 10, seed=3).queue)
    assert not torch.equal(moco.queue, MoCo(small_encoder(), 8, 4, 10, seed=4).queue)
    for pq, pk in zip(encoder.parameters(), moco.key_encoder.parameters()):
        assert torch.equal(pq, pk) and pq is not pk and not pk.requires_grad
    assert all(not p.requires_grad for p in moco.key_projector.parameters())
    # The caller's backbone is not registered: MoCo's trainable parameters are the projector only.
    trainable = {id(p) for p in moco.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in moco.projector.parameters()}
    assert not any(name.startswith("_query") for name in moco.state_dict())


@pytest.mark.parametrize("m", [0.0, 0.5, 1.0])
def test_momentum_update(m):
    encoder = small_encoder()
    moco = MoCo(encoder, feature_dim=8, dim=4, queue_size=4, momentum=m)
    old_key = [p.clone() for p in (*moco.key_encoder.parameters(), *moco.key_projector.parameters())]
    with torch.no_grad():
        for p in (*encoder.parameters(), *moco.projector.parameters()):
            p.add_(torch.randn_like(p))
    new_query = [p.clone() for p in (*encoder.parameters(), *moco.projector.parameters())]
    moco.momentum_update()
    now_key = [*moco.key_encoder.parameters(), *moco.key_projector.parameters()]
    for k_old, q_new, k_now in zip(old_key, new_query, now_key):
        if m == 0.0:
            assert torch.equal(k_now, q_new)
        elif m == 1.0:
            assert torch.equal(k_now, k_old)
        else:
            assert torch.allclose(k_now, (k_old + q_new) / 2, atol=1e-6)


def test_key_encoder_keeps_its_own_bn_buffers():
    encoder = small_encoder()
    moco = MoCo(encoder, feature_dim=8, dim=4, queue_size=4, momentum=0.0)
    encoder.train()
    encoder(torch.randn(16, 6) * 5 + 3)  # moves only the query encoder's running stats
    moco.momentum_update()
    assert not torch.equal(moco.key_encoder[1].running_mean, encoder[1].running_mean)
    assert torch.equal(moco.key_encoder[0].weight, encoder[0].weight)


def test_enqueue_ring_order_with_wrap_around():
    moco = MoCo(small_encoder(), feature_dim=8, dim=2, queue_size=5)
    keys = torch.arange(20, dtype=torch.float32).view(10, 2)
    labels = torch.arange(10)
    moco.enqueue(keys[:3], labels[:3])
    assert moco.queue_labels.tolist() == [0, 1, 2, -1, -1] and int(moco.queue_ptr) == 3
    moco.enqueue(keys[3:6], labels[3:6])  # slots 3, 4, then wraps to 0
    assert moco.queue_labels.tolist() == [5, 1, 2, 3, 4] and int(moco.queue_ptr) == 1
    assert torch.equal(moco.queue[0], keys[5]) and torch.equal(moco.queue[4], keys[4])
    # A batch larger than the queue keeps the newest 5, placed as if written one by one from the pointer (1):
    # labels 0..6 go to slots 1,2,3,4,0,1,2 -> slot 0 holds 4, 1 holds 5, 2 holds 6, 3 holds 2, 4 holds 3.
    moco.enqueue(keys[:7], labels[:7])
    assert moco.queue_labels.tolist() == [4, 5, 6, 2, 3] and int(moco.queue_ptr) == 3
    assert torch.equal(moco.queue[2], keys[6])


def test_forward_grads_reach_query_side_only_and_enqueue_keys():
    encoder = small_encoder()
    moco = MoCo(encoder, feature_dim=8, dim=4, queue_size=6, momentum=0.9)
    x = torch.randn(4, 6)
    labels = torch.tensor([0, 1, 0, 2])
    loss = moco(encoder(x), x + 0.1 * torch.randn(4, 6), labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moco.projector.parameters())
    assert all(p.grad is None for p in (*moco.key_encoder.parameters(), *moco.key_projector.parameters()))
    assert moco.queue_labels.tolist() == [0, 1, 0, 2, -1, -1] and int(moco.queue_ptr) == 4
    assert torch.allclose(moco.queue[:4].norm(dim=1), torch.ones(4))


def test_forward_applies_momentum_before_encoding_keys():
    encoder = small_encoder()
    moco = MoCo(encoder, feature_dim=8, dim=4, queue_size=8, momentum=0.0)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    x = torch.randn(4, 6)
    moco(encoder(x), x, torch.arange(4))
    # m = 0: keys come from an exact copy of the current query side, so the key equals the projected query.
    q = F.normalize(moco.projector(encoder(x)), dim=1)
    assert torch.allclose(moco.queue[:4], q, atol=1e-5)


def test_short_training_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    encoder = small_encoder(in_dim=10, feature_dim=16)
    moco = MoCo(encoder, feature_dim=16, dim=8, queue_size=64, momentum=0.9, temperature=0.2)
    opt = torch.optim.SGD([*encoder.parameters(), *moco.projector.parameters()], lr=0.5, momentum=0.9)
    x = torch.randn(32, 10)
    labels = torch.arange(32)  # one "class" per image: its own older keys are masked, the others are negatives
    keys = x + 0.05 * torch.randn(32, 10)
    losses = []
    for _ in range(40):
        loss = moco(encoder(x), keys, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[2:7]) / 5
