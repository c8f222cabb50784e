"""Model endpoints on a live server: listing, and predictions equal to the model's own forward pass; bad uploads 4xx."""

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.export import load_model


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def pixels(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_list_and_describe(api):
    listing = api.get("/v1/models").json()
    assert [(m["id"], m["role"]) for m in listing["data"]] == [("run1", "classifier"), ("run1/teacher", "teacher")]
    model = api.get("/v1/models/run1").json()
    assert model["metrics"]["overall"] == 20.0 and model["image_size"] == 16 and model["num_classes"] == 5


@pytest.mark.parametrize("model_id, status, kind", [
    ("nope", 404, "model_not_found"), ("run1/student", 404, "model_not_found"),
    ("..%2F..%2Fetc", 422, "invalid_id"), ("run1%2F..%2F..", 422, "invalid_id"), ("a/b/c/d/e", 422, "invalid_id"),
])
def test_unknown_or_unsafe_ids(api, model_id, status, kind):
    response = api.get(f"/v1/models/{model_id}")
    assert (response.status_code, response.json()["type"]) == (status, kind)


def test_predict_equals_the_models_forward_pass(api, api_roots):
    model, spec = load_model(api_roots["runs"] / "run1" / "model.pt")
    images = [pixels((16, 16, 3), seed) for seed in range(3)]
    files = [("files", (f"img{i}.png", encode(a), "image/png")) for i, a in enumerate(images)]
    body = api.post("/v1/models/run1:predict", params={"top_k": 3}, files=files).json()
    # the oracle: uint8 HWC -> CHW in [0, 1], per-channel (x - mean) / std, softmax of the logits
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    assert body["count"] == 3 and [p["file"] for p in body["data"]] == ["img0.png", "img1.png", "img2.png"]
    for row, expected in zip(body["data"], probs):
        top = np.argsort(-expected)[:3]
        assert [c["class_id"] for c in row["top_k"]] == top.tolist()
        assert [c["class_name"] for c in row["top_k"]] == [spec.class_names[i] for i in top]
        np.testing.assert_allclose([c["prob"] for c in row["top_k"]], expected[top], atol=1e-5)


def test_batched_equals_one_by_one_and_other_sizes_and_channels(api):
    uploads = [("a.jpg", encode(pixels((40, 30, 3), 4), "JPEG")), ("b.png", encode(pixels((20, 20), 5))),
               ("c.png", encode(pixels((16, 16, 4), 6)))]  # JPEG 40x30, grayscale, RGBA
    together = api.post("/v1/models/run1/teacher:predict", files=[("files", u) for u in uploads]).json()["data"]
    alone = [api.post("/v1/models/run1/teacher:predict", files=[("files", u)]).json()["data"][0] for u in uploads]
    for a, b in zip(together, alone):
        assert [c["class_id"] for c in a["top_k"]] == [c["class_id"] for c in b["top_k"]]
        np.testing.assert_allclose([c["prob"] for c in a["top_k"]], [c["prob"] for c in b["top_k"]], atol=1e-5)
        assert len(a["top_k"]) == 5  # top_k defaults to 5 = all classes here


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with one empty data chunk: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_bad_uploads_get_precise_4xx(api):
    png = encode(pixels((16, 16, 3), 0))
    gif = io.BytesIO()
    Image.fromarray(pixels((8, 8, 3), 1)).save(gif, "GIF")
    cases = [
        ([("files", ("ok.png", png)), ("files", ("junk.png", b"not an image"))], 400, "image_decode", "junk.png"),
        ([("files", ("anim.gif", gif.getvalue()))], 400, "image_decode", "send PNG or JPEG"),
        ([("files", ("cut.png", png[: len(png) // 2]))], 400, "image_decode", "cut.png"),
        ([("files", ("huge.png", encode(np.zeros((300, 300, 3), np.uint8))))], 413, "payload_too_large", "pixels"),
        ([("files", ("bomb.png", png_header(100_000, 100_000)))], 413, "payload_too_large", "limit is 65536"),
        ([("files", ("tall.png", png_header(300, 300)))], 413, "payload_too_large", "limit is 65536"),
        ([("files", (f"{i}.png", png)) for i in range(9)], 413, "payload_too_large", "at most 8"),
        ([("files", ("big.png", png + b"\0" * 300_000))], 413, "payload_too_large", "bytes"),
    ]
    for files, status, kind, says in cases:
        response = api.post("/v1/models/run1:predict", files=files)
        assert response.status_code == status, (says, response.text)
        assert response.json()["type"] == kind and says in response.json()["detail"]
        assert " at 0x" not in response.text and "Traceback" not in response.text  # no reprs, no internals
    assert api.post("/v1/models/run1:predict").json()["type"] == "validation_error"
    assert api.post("/v1/models/ghost:predict", files=[("files", ("ok.png", png))]).status_code == 404
    assert api.post("/v1/models/run1:predict?top_k=0", files=[("files", ("ok.png", png))]).status_code == 422


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["PNG", "JPEG"]), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4))
def test_damaged_images_are_a_4xx_never_a_5xx(api, fmt, cut, flips):
    data = bytearray(encode(pixels((24, 24, 3), 9), fmt))
    for position, xor in flips:
        data[position % len(data)] ^= xor
    data = bytes(data[: len(data) - cut])
    response = api.post("/v1/models/run1:predict", files=[("files", ("x.img", data))])
    assert response.status_code in (200, 400, 413), response.text
    body = response.json()
    if response.status_code == 200:  # damage in pixel data can still decode: then it is a valid prediction
        assert abs(sum(c["prob"] for c in body["data"][0]["top_k"]) - 1) < 1e-4
    elif response.status_code == 413:  # a flipped header byte can declare a huge image: refused before decoding
        assert body["type"] == "payload_too_large" and "x.img" in body["detail"] and "pixels" in body["detail"]
    else:
        assert body["type"] == "image_decode" and "x.img" in body["detail"]


def test_upload_publishes_a_model_that_predicts_and_refuses_bad_files(tmp_path, api_roots, live_server, api_key):
    """PUT /v1/models/{id}: keyed, checked by loading and running it, never overwriting, nothing left on refusal."""
    import httpx

    from service.app import create_app
    from tests.service.conftest import api_settings, write_model

    roots = {**api_roots, "runs": tmp_path / "runs"}
    write_model(tmp_path / "made" / "model.pt")
    good = (tmp_path / "made" / "model.pt").read_bytes()
    png = encode(pixels((16, 16, 3), 0))
    keyed = {"X-API-Key": api_key}
    with live_server(create_app(api_settings(roots, max_upload_bytes=2**20))) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.put("/v1/models/imported/r1", files={"file": ("m.pt", good)}).status_code == 401
        made = client.put("/v1/models/imported/r1", files={"file": ("m.pt", good)}, headers=keyed)
        assert made.status_code == 201 and made.json()["id"] == "imported/r1" and made.json()["num_classes"] == 5
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["imported/r1"]
        assert client.post("/v1/models/imported/r1:predict", files=[("files", ("a.png", png))]).status_code == 200
        again = client.put("/v1/models/imported/r1", files={"file": ("m.pt", good)}, headers=keyed)
        assert (again.status_code, again.json()["type"]) == (409, "model_exists")
        assert "replace=true" in again.json()["detail"]
        write_model(tmp_path / "newer" / "model.pt", image_size=8)
        newer = (tmp_path / "newer" / "model.pt").read_bytes()
        replaced = client.put("/v1/models/imported/r1", params={"replace": "true"},
                              files={"file": ("m.pt", newer)}, headers=keyed)
        assert replaced.status_code == 201 and replaced.json()["image_size"] == 8
        assert (roots["runs"] / "imported" / "r1" / "model.previous.pt").read_bytes() == good  # kept, not lost
        assert client.get("/v1/models/imported/r1").json()["image_size"] == 8
        for body, status, kind in [(b"not a torch file", 400, "model_file"), (good[: len(good) // 2], 400, "model_file"),
                                   (good + b"\0" * 2**20, 413, "payload_too_large")]:
            bad = client.put("/v1/models/imported/r2", files={"file": ("m.pt", body)}, headers=keyed)
            assert (bad.status_code, bad.json()["type"]) == (status, kind), bad.text
        for unsafe in ("..%2Fescape", "a/b/c/d", "a/b/c/d/teacher", ".hidden/teacher"):
            assert client.put(f"/v1/models/{unsafe}", files={"file": ("m.pt", good)},
                              headers=keyed).status_code == 422, unsafe
        # '<run>/teacher' is that run's teacher.pt: the id an upload takes is the id it is served under
        teacher = client.put("/v1/models/imported/r1/teacher", files={"file": ("t.pt", good)}, headers=keyed)
        assert teacher.status_code == 201 and teacher.json()["id"] == "imported/r1/teacher"
        assert client.post("/v1/models/imported/r1/teacher:predict",
                           files=[("files", ("a.png", png))]).status_code == 200
    # refused uploads left no file behind: only the good model, its previous version and the teacher exist
    assert sorted(p.relative_to(roots["runs"]).as_posix() for p in roots["runs"].rglob("*.pt")) == [
        "imported/r1/model.previous.pt", "imported/r1/model.pt", "imported/r1/teacher.pt"]


def test_images_are_resized_as_the_models_eval_split_was(tmp_path):
    """A list-file model (eval: shorter side to 18, centre crop 16) sees an upload exactly as its test images."""
    from torchvision.transforms import v2

    from service.inference import decode_image, to_model_input
    from tests.service.conftest import write_model

    write_model(tmp_path / "model.pt", image_size=16, resize=18)
    _, spec = load_model(tmp_path / "model.pt")
    array = pixels((40, 30, 3), 7)
    served = to_model_input(decode_image(encode(array), "a.png", 10**6), spec)
    expected = v2.Compose([v2.Resize(18), v2.CenterCrop(16)])(torch.from_numpy(array).permute(2, 0, 1))
    assert torch.equal(served, expected)
    plain = to_model_input(decode_image(encode(array), "a.png", 10**6), spec.__class__(**{**vars(spec), "resize": None}))
    assert not torch.equal(plain, expected)  # without the recorded resize the crop would differ
