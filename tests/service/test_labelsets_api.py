"""Labelset endpoints on a live server: answers equal the tempered softmax of the stored logits; 404/413/422 paths."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def softmax(z, t):
    z = np.asarray(z, dtype=np.float64) / t
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_list_and_describe(api):
    listing = api.get("/v1/labelsets").json()
    assert listing["count"] == 1 and [d["labelset_id"] for d in listing["data"]] == ["known"]
    detail = api.get("/v1/labelsets/known").json()
    assert (detail["num_images"], detail["num_classes"], detail["temperature"]) == (100, 5, 2.0)
    assert detail["class_names"] == ["cat", "dog", "owl", "eel", "yak"] and detail["chunk_rows"] == 32
    assert "checksums" not in detail
    content = detail["content"]  # what the labels carry, computed when the set was published
    assert content["overall"]["rows"] == 100 and set(content["groups"]) == {"many", "medium", "few"}
    assert [c["class"] for c in content["classes"]] == detail["class_names"]


@pytest.mark.parametrize("image_id", [0, 31, 32, 99])  # first and last rows of chunks, and the short last chunk
def test_single_label_is_the_stored_soft_label(api, api_roots, image_id):
    row = api.get(f"/v1/labelsets/known/labels/{image_id}").json()
    expected = softmax(api_roots["logits"][image_id], 2.0)
    assert row["image_id"] == image_id and row["hard_label"] == image_id % 5 and row["temperature"] == 2.0
    assert row["classes"] is None
    np.testing.assert_allclose(row["probs"], expected, atol=2e-3)  # soft labels are stored as float16


def test_retempered_top_k(api, api_roots):
    row = api.get("/v1/labelsets/known/labels/7", params={"temperature": 4.0, "top_k": 2}).json()
    full = softmax(api_roots["logits"][7], 4.0)  # from the stored logits in float32: exact to 6 decimals
    top = np.argsort(-full)[:2]
    assert row["temperature"] == 4.0 and row["classes"] == top.tolist()
    np.testing.assert_allclose(row["probs"], full[top] / full[top].sum(), atol=2e-6)


def test_a_topk_labelset_is_served_at_its_temperature_and_refuses_another(api, api_roots, make_labelset):
    logits = np.random.default_rng(3).normal(0, 2, (12, 5)).astype(np.float16)
    make_labelset(api_roots["store"], "sparse", logits, chunk_rows=12, top_k=2, dense=False)
    row = api.get("/v1/labelsets/sparse/labels/3", params={"top_k": 2}).json()
    top = np.argsort(-softmax(logits[3].astype(np.float32), 2.0))[:2]
    assert row["classes"] == top.tolist()
    refused = api.get("/v1/labelsets/sparse/labels/3", params={"temperature": 4.0})
    assert refused.status_code == 409, refused.text  # a state of the labelset, not a malformed request
    assert refused.json()["type"] == "dense_not_stored" and "dense" in refused.json()["detail"]
    assert api.get("/v1/labelsets/sparse/labels/3").status_code == 200  # the refusal changed nothing


def test_batch_json_keeps_order_and_npy_matches(api, api_roots):
    ids = [5, 0, 99, 5, 64]
    body = api.post("/v1/labelsets/known/labels:batch", json={"image_ids": ids}).json()
    assert body["count"] == 5 and [r["image_id"] for r in body["data"]] == ids
    probs = np.array([r["probs"] for r in body["data"]])
    np.testing.assert_allclose(probs, softmax(api_roots["logits"][ids], 2.0), atol=2e-3)
    for kwargs in ({"headers": {"Accept": "application/octet-stream"}}, {"params": {"format": "npy"}}):
        response = api.post("/v1/labelsets/known/labels:batch", json={"image_ids": ids}, **kwargs)
        assert response.headers["content-type"] == "application/octet-stream"
        array = np.load(io.BytesIO(response.content), allow_pickle=False)
        assert array.dtype == np.float16 and array.shape == (5, 5)
        np.testing.assert_allclose(array, probs, atol=1e-3)
    topk = api.post("/v1/labelsets/known/labels:batch?format=npy", json={"image_ids": ids, "top_k": 1})
    dense = np.load(io.BytesIO(topk.content))
    assert np.all((dense > 0).sum(axis=1) == 1) and np.allclose(dense.max(axis=1), 1.0)


@pytest.mark.parametrize("method, url, kwargs, status, kind, says", [
    ("get", "/v1/labelsets/nope", {}, 404, "labelset_not_found", "nope"),
    ("get", "/v1/labelsets/nope/labels/0", {}, 404, "labelset_not_found", "nope"),
    ("get", "/v1/labelsets/known/labels/100", {}, 404, "image_id", "[100]"),
    ("get", "/v1/labelsets/known/labels/-3", {}, 404, "image_id", "[-3]"),
    ("get", "/v1/labelsets/known/labels/99999999999999999999999", {}, 404, "image_id", "integers"),
    ("get", "/v1/labelsets/.hidden/labels/0", {}, 422, "invalid_labelset_id", "invalid labelset id"),
    ("get", "/v1/labelsets/known/labels/1?temperature=0", {}, 422, "validation_error", "temperature"),
    ("get", "/v1/labelsets/known/labels/1?temperature=abc", {}, 422, "validation_error", "temperature"),
    ("get", "/v1/labelsets/known/labels/1?top_k=0", {}, 422, "validation_error", "top_k"),
    ("get", "/v1/labelsets/known/labels/x", {}, 422, "validation_error", "image_id"),
    ("post", "/v1/labelsets/known/labels:batch", {"json": {"image_ids": list(range(501))}}, 413, "payload_too_large",
     "at most 500"),
    ("post", "/v1/labelsets/known/labels:batch", {"json": {"image_ids": [1, 200, 300]}}, 404, "image_id", "[200, 300]"),
    ("post", "/v1/labelsets/known/labels:batch", {"json": {"image_ids": []}}, 422, "validation_error", "image_ids"),
    ("post", "/v1/labelsets/known/labels:batch", {"json": {"image_ids": [1], "T": 2}}, 422, "validation_error", "T"),
    # JSON types are taken as they are: a boolean is neither an image id (False would read as image 0) nor a T
    ("post", "/v1/labelsets/known/labels:batch", {"json": {"image_ids": [False]}}, 422, "validation_error", "integer"),
    ("post", "/v1/labelsets/known/labels:batch", {"json": {"image_ids": [1], "temperature": True}}, 422,
     "validation_error", "number"),
    ("post", "/v1/labelsets/known/labels:batch", {"content": b"{not json"}, 422, "validation_error", "json"),
    ("post", "/v1/labelsets/known/labels:batch", {"content": b"x" * 300_000}, 413, "payload_too_large", "bytes"),
])
def test_bad_requests_get_precise_4xx(api, method, url, kwargs, status, kind, says):
    response = getattr(api, method)(url, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == kind and says in str(body["detail"])


def test_a_body_streamed_past_the_limit_is_a_413(api):
    chunks = (b"[" + b"1," * 4000 + b"1]" for _ in range(40))  # no Content-Length: counted as it arrives
    response = api.post("/v1/labelsets/known/labels:batch", content=chunks)
    assert response.status_code == 413 and response.json()["type"] == "payload_too_large"


def test_delete_needs_the_key_and_readers_forget_the_set(api, api_roots, api_key, make_labelset):
    KEY = api_key
    make_labelset(api_roots["store"], "doomed", np.zeros((10, 5), np.float16), chunk_rows=10)
    assert api.get("/v1/labelsets/doomed/labels/3").status_code == 200  # the server now holds a reader for it
    assert api.delete("/v1/labelsets/doomed").status_code == 401
    assert api.delete("/v1/labelsets/doomed", headers={"X-API-Key": KEY + "x"}).status_code == 401
    deleted = api.delete("/v1/labelsets/doomed", headers={"X-API-Key": KEY})
    assert deleted.status_code == 200 and deleted.json()["restore"] == "POST /v1/labelsets/doomed:restore"
    assert api.get("/v1/labelsets/doomed/labels/3").json()["type"] == "labelset_not_found"
    assert api.delete("/v1/labelsets/doomed", headers={"X-API-Key": KEY}).status_code == 404
    assert "doomed" not in [d["labelset_id"] for d in api.get("/v1/labelsets").json()["data"]]
    trash = api.get("/v1/labelsets", params={"deleted": "true"}).json()["data"]
    assert [t["trash_id"] for t in trash if t["labelset_id"] == "doomed"] == [deleted.json()["trash_id"]]
    assert api.post("/v1/labelsets/doomed:restore").status_code == 401  # restoring is a mutation too
    restored = api.post("/v1/labelsets/doomed:restore", headers={"X-API-Key": KEY})
    assert restored.status_code == 200 and restored.json()["num_images"] == 10
    assert api.get("/v1/labelsets/doomed/labels/3").status_code == 200  # served again, the same rows
    assert api.post("/v1/labelsets/doomed:restore", headers={"X-API-Key": KEY}).status_code == 404
    assert api.delete("/v1/labelsets/doomed", headers={"X-API-Key": KEY}).status_code == 200


def test_a_damaged_chunk_is_a_json_500_naming_it_and_the_server_stays_up(api, api_roots, make_labelset):
    make_labelset(api_roots["store"], "damaged", np.zeros((10, 5), np.float16), chunk_rows=10)
    chunk = next((api_roots["store"] / "damaged" / "soft_labels").rglob("c/*/*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    response = api.get("/v1/labelsets/damaged/labels/1")
    assert response.status_code == 500 and response.json()["type"] == "corrupt_chunk"
    assert "soft_labels" in response.json()["detail"]
    assert api.get("/healthz").status_code == 200 and api.get("/v1/labelsets/known/labels/1").status_code == 200


def test_labels_are_served_while_a_new_set_is_being_written(api, api_roots, make_labelset):
    writer = make_labelset(api_roots["store"], "growing", np.ones((64, 5), np.float16), publish=False)
    assert api.get("/v1/labelsets/growing/labels/0").status_code == 404  # staging is invisible
    assert api.get("/v1/labelsets/known/labels/0").status_code == 200
    assert "growing" not in [d["labelset_id"] for d in api.get("/v1/labelsets").json()["data"]]
    writer.write_chunk(1, np.ones((32, 5), np.float16), np.arange(32, 64) % 5)
    writer.publish()
    np.testing.assert_allclose(api.get("/v1/labelsets/growing/labels/40").json()["probs"], [0.2] * 5, atol=1e-3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(-5, 120), min_size=1, max_size=20),
       temperature=st.one_of(st.none(), st.floats(0.05, 100)), top_k=st.one_of(st.none(), st.integers(1, 8)))
def test_any_batch_is_rows_summing_to_one_or_a_404(api, api_roots, ids, temperature, top_k):
    response = api.post("/v1/labelsets/known/labels:batch",
                        json={"image_ids": ids, "temperature": temperature, "top_k": top_k})
    if any(not 0 <= i < 100 for i in ids):
        assert response.status_code == 404 and response.json()["type"] == "image_id"
        return
    assert response.status_code == 200, response.text
    rows = response.json()["data"]
    assert [r["image_id"] for r in rows] == ids
    for row in rows:
        assert abs(sum(row["probs"]) - 1) < 1e-3 and len(row["probs"]) == (min(top_k, 5) if top_k else 5)
        assert row["probs"] == sorted(row["probs"], reverse=True) or top_k is None
