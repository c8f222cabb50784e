"""Classifier re-balancing (LWS, τ-norm, NCM) on toy feature sets whose right answer is known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.classifiers import (
    LWSClassifier,
    NCMClassifier,
    TauNormClassifier,
    ncm_centroids,
    search_tau,
    tau_normalize,
)


def _blobs(gen: torch.Generator, n0: int, n1: int, noise: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 2-D Gaussian classes at (2, 0) and (0, 2), mirror images of each other."""
    x0 = noise * torch.randn(n0, 2, generator=gen) + torch.tensor([2.0, 0.0])
    x1 = noise * torch.randn(n1, 2, generator=gen) + torch.tensor([0.0, 2.0])
    return torch.cat([x0, x1]), torch.cat([torch.zeros(n0), torch.ones(n1)]).long()


def _recalls(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    with torch.no_grad():
        preds = model(x).argmax(dim=1)
    return [(preds[y == c] == c).float().mean().item() for c in (0, 1)]


def _fit(module: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()


def _linear(weight: list[list[float]], bias: list[float] | None = None) -> nn.Linear:
    w = torch.tensor(weight)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(w)
        if bias is not None:
            linear.bias.copy_(torch.tensor(bias))
    return linear


def test_lws_starts_as_the_linear_and_trains_only_the_scales():
    linear = _linear([[1.0, 2.0], [-1.0, 0.5], [0.0, 3.0]], [0.1, -0.2, 0.3])
    lws = LWSClassifier(linear)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lws(x), linear(x))
    assert [name for name, _ in lws.named_parameters()] == ["scales"]
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([2.0, 1.0, 0.5]))
    torch.testing.assert_close(lws(x), linear(x) * torch.tensor([2.0, 1.0, 0.5]))
    torch.testing.assert_close(lws.fold()(x), lws(x))
    # A checkpoint loads into a fresh module built from any Linear of the same shape.
    restored = LWSClassifier(nn.Linear(2, 3))
    restored.load_state_dict(lws.state_dict())
    assert set(lws.state_dict()) == {"weight", "bias", "scales"}
    torch.testing.assert_close(restored(x), lws(x))


def test_lws_on_balanced_data_undoes_a_head_biased_weight_norm():
    # The head class has the larger weight norm (Kang et al.'s observation): logits (3 f0, f1) push the boundary
    # into the tail class. On mirror-image classes the right scales make 3·s0 = s1.
    gen = torch.Generator().manual_seed(0)
    lws = LWSClassifier(_linear([[3.0, 0.0], [0.0, 1.0]], [0.0, 0.0]))
    test_x, test_y = _blobs(gen, 500, 500)
    head_before, tail_before = _recalls(lws, test_x, test_y)
    assert tail_before < head_before - 0.1
    _fit(lws, *_blobs(gen, 200, 200), steps=300, lr=0.1)
    ratio = (3.0 * lws.scales[0] / lws.scales[1]).item()
    assert 0.8 < ratio < 1.25, ratio
    head_after, tail_after = _recalls(lws, test_x, test_y)
    assert tail_after > tail_before + 0.1 and abs(head_after - tail_after) < 0.05


def test_tau_normalize_hand_values():
    weight = torch.tensor([[3.0, 4.0], [0.0, 0.5], [0.0, 0.0]])
    torch.testing.assert_close(tau_normalize(weight, 0.0), weight)
    unit = tau_normalize(weight, 1.0)
    torch.testing.assert_close(unit[:2].norm(dim=1), torch.ones(2))
    assert torch.equal(unit[2], torch.zeros(2))  # a zero row stays zero, not NaN
    torch.testing.assert_close(tau_normalize(weight, 0.5)[0], torch.tensor([3.0, 4.0]) / math.sqrt(5.0))


def test_tau_norm_classifier_drops_the_bias():
    linear = _linear([[3.0, 4.0], [0.0, 2.0]], [10.0, -10.0])
    tau_norm = TauNormClassifier(linear, tau=1.0)
    x = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(tau_norm(x), torch.tensor([[7.0 / 5.0, 1.0]]))
    restored = TauNormClassifier(nn.Linear(2, 2), tau=1.0)
    restored.load_state_dict(tau_norm.state_dict())
    torch.testing.assert_close(restored(x), tau_norm(x))


def test_search_tau_finds_the_only_tau_that_balances_the_norms():
    # Weight norms 4 and 1 on orthogonal axes: logits (4^{1-τ} f0, f1). Validation points (1, b) of class 0 and
    # (b, 1) of class 1 with b up to 0.95 are all right only when 4^{|1-τ|} < 1/0.95, i.e. only at τ = 1.0.
    b = torch.tensor([0.2, 0.7, 0.9, 0.95])
    features = torch.cat([torch.stack([torch.ones(4), b], 1), torch.stack([b, torch.ones(4)], 1)])
    labels = torch.tensor([0] * 4 + [1] * 4)
    best, scores = search_tau(features, labels, torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    assert best == pytest.approx(1.0) and scores.shape == (21,)
    assert scores[10].item() == 1.0 and torch.all(scores[torch.arange(21) != 10] < 1.0)
    # At τ = 0 the logits are (4 f0, f1): every class-0 point is right, class 1 only at b = 0.2: (1 + 1/4) / 2.
    assert scores[0].item() == pytest.approx(0.625)


def test_search_tau_breaks_ties_towards_the_smallest_tau():
    # Equal norms: τ rescales all logits alike, so every τ scores the same and the least change (τ = 0.3) wins.
    features = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 3
    weight = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    best, scores = search_tau(features, labels, weight, taus=[0.9, 0.3, 1.5])
    assert best == pytest.approx(0.3) and torch.all(scores == scores[0])


def test_ncm_centroids_and_logits_by_hand():
    features = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    centroids, mean = ncm_centroids(features, torch.tensor([0, 0, 1, 1]), num_classes=2)
    torch.testing.assert_close(mean, torch.tensor([1.5, 1.5]))
    # cl2n: (2,0) -> (0.5, -1.5)/√2.5 and (4,0) -> (2.5, -1.5)/√8.5; class 1 mirrors class 0.
    c0 = [(0.5 / math.sqrt(2.5) + 2.5 / math.sqrt(8.5)) / 2, (-1.5 / math.sqrt(2.5) - 1.5 / math.sqrt(8.5)) / 2]
    torch.testing.assert_close(centroids, torch.tensor([c0, c0[::-1]]))
    # Query (3, 1) -> cl2n (1.5, -0.5)/√2.5; logit_j = -‖x - c_j‖².
    x = [1.5 / math.sqrt(2.5), -0.5 / math.sqrt(2.5)]
    expected = [-sum((xi - ci) ** 2 for xi, ci in zip(x, c)) for c in (c0, c0[::-1])]
    logits = NCMClassifier(centroids, mean)(torch.tensor([[3.0, 1.0]]))
    torch.testing.assert_close(logits, torch.tensor([expected]))


def test_ncm_cosine_ignores_centroid_norms_euclidean_does_not():
    # Unit query x = (0.6, 0.8) after removing the mean; centroids (1, 0) and (0, 0.1).
    centroids, mean = torch.tensor([[1.0, 0.0], [0.0, 0.1]]), torch.tensor([1.0, 1.0])
    query = torch.tensor([[1.6, 1.8]])
    euclidean = NCMClassifier(centroids, mean, "euclidean")(query)
    cosine = NCMClassifier(centroids, mean, "cosine")(query)
    torch.testing.assert_close(euclidean, torch.tensor([[-0.8, -0.85]]))
    torch.testing.assert_close(cosine, torch.tensor([[0.6, 0.8]]))
    assert euclidean.argmax().item() == 0 and cosine.argmax().item() == 1
    with pytest.raises(ValueError, match="cosine"):
        NCMClassifier(centroids, mean, "manhattan")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ncm_classifies_separated_clusters_perfectly(metric):
    gen = torch.Generator().manual_seed(0)
    means = 5.0 * torch.eye(5, 8)
    labels = torch.arange(5).repeat_interleave(torch.tensor([50, 20, 10, 5, 2]))
    features = means[labels] + 0.3 * torch.randn(len(labels), 8, generator=gen)
    ncm = NCMClassifier.from_features(features, labels, num_classes=5, metric=metric)
    test_labels = torch.arange(5).repeat(20)
    test_features = means[test_labels] + 0.3 * torch.randn(100, 8, generator=gen)
    assert torch.equal(ncm(test_features).argmax(dim=1), test_labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_classifiers_run_on_cuda():
    gen = torch.Generator().manual_seed(0)
    x, y = _blobs(gen, 50, 50)
    linear = _linear([[3.0, 0.0], [0.0, 1.0]], [0.0, 0.0]).cuda()
    x, y = x.cuda(), y.cuda()
    for module in (LWSClassifier(linear), TauNormClassifier(linear, 1.0), NCMClassifier.from_features(x, y, 2)):
        assert module(x).device.type == "cuda"
        cpu = module.cpu()(x.cpu())
        torch.testing.assert_close(module.cuda()(x).cpu(), cpu, rtol=1e-4, atol=1e-4)
    weight = linear.weight.detach()
    gpu_best, gpu_scores = search_tau(x, y, weight)
    cpu_best, cpu_scores = search_tau(x.cpu(), y.cpu(), weight.cpu())
    assert gpu_best == cpu_best
    torch.testing.assert_close(gpu_scores, cpu_scores)
