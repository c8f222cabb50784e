"""Dynamic batching of predict: concurrent requests share forward passes, and each gets exactly its own rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service.batching import DynamicBatcher
from tests.service.test_models_api import encode, load_model, pixels


def test_concurrent_requests_share_calls_and_get_their_own_results():
    calls = []

    def run(items):
        calls.append(len(items))
        time.sleep(0.02)  # a forward pass: requests arriving meanwhile form the next batch
        return [item * 10 for item in items]

    batcher = DynamicBatcher(run, max_batch=8)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: batcher([i, i + 0.5]), range(40)))
    assert answers == [[i * 10, (i + 0.5) * 10] for i in range(40)]
    assert sum(calls) == 80 and max(calls) <= 8 and max(calls) > 2  # batched, never past max_batch
    assert len(calls) < 40
    batcher.close()


def test_a_lone_request_is_not_held_back_and_a_failing_call_fails_only_its_batch():
    def run(items):
        if "bad" in items:
            raise ValueError("cannot run on 'bad'")
        return [x.upper() for x in items]

    batcher = DynamicBatcher(run, max_batch=4, max_wait_s=0.0)
    start = time.perf_counter()
    assert batcher(["a"]) == ["A"]
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ValueError, match="bad"):
        batcher(["bad"])
    assert batcher(["b", "c"]) == ["B", "C"]  # the worker survived
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher(["d"])


def test_max_wait_gathers_requests_that_arrive_within_it():
    calls = []
    batcher = DynamicBatcher(lambda items: calls.append(len(items)) or items, max_batch=64, max_wait_s=0.2)
    barrier = threading.Barrier(6)

    def one(i):
        barrier.wait()
        return batcher([i])

    with ThreadPoolExecutor(6) as pool:
        assert sorted(x for r in pool.map(one, range(6)) for x in r) == list(range(6))
    assert len(calls) < 6
    batcher.close()


@pytest.mark.parametrize("batching", [True, False])
def test_batched_predict_answers_each_request_with_its_own_images(api_roots, live_server, batching):
    """16 clients at once, one image each: every answer equals the model's own forward pass on that image."""
    from service.app import create_app
    from service.inference import classify, to_model_input, decode_image
    from tests.service.conftest import api_settings

    model, spec = load_model(api_roots["runs"] / "run1" / "model.pt")
    images = [encode(pixels((16, 16, 3), seed)) for seed in range(16)]
    expected = [classify(model, spec, [to_model_input(decode_image(b, "x.png", 10**6), spec)], 3) for b in images]
    settings = api_settings(api_roots, predict_batching=batching, predict_max_wait_ms=5)
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        def predict(i):
            answer = client.post("/v1/models/run1:predict", params={"top_k": 3},
                                 files=[("files", (f"img{i}.png", images[i]))])
            assert answer.status_code == 200, answer.text
            return answer.json()["data"][0]

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(predict, range(16)))
    for i, (answer, (probs, classes)) in enumerate(zip(answers, expected)):
        assert answer["file"] == f"img{i}.png"
        assert [c["class_id"] for c in answer["top_k"]] == classes[0].tolist()
        np.testing.assert_allclose([c["prob"] for c in answer["top_k"]], probs[0].numpy(), atol=1e-5)
