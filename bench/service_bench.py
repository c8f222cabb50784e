"""Service benchmark: single-label GET latency at 1/16/64 clients, batch-label and predict throughput, each next to a
minimal FastAPI endpoint returning a constant, with both servers on 127.0.0.1 in their own uvicorn processes.

    python bench/service_bench.py            # writes bench/results/service-<device>.json
"""

import argparse
import asyncio
import contextlib
import io
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

log = logging.getLogger("bench.service")
BENCH_DIR = Path(__file__).resolve().parent
LABELSET = "bench-t2"
MODEL = "bench-run"


# ---- the two apps (uvicorn --factory imports these in the server processes) -----------------------------------------


def ours_app():
    """The service as `ltd serve` runs it (its label GET is an `async def` reading inline on the event loop), plus
    two variants of that handler for comparison: a plain `def` (thread pool) and `async def` + run_in_threadpool."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    from service.app import create_app
    from service.labels import read_rows
    from service.schemas import LabelOut

    app = create_app()

    def answer(request: Request, labelset_id: str, image_id: int) -> LabelOut:
        rows = read_rows(request.state.readers.get(labelset_id), [image_id])
        return LabelOut(labelset_id=labelset_id, temperature=rows.temperature, **rows.as_json_rows()[0])

    @app.get("/bench/def/labelsets/{labelset_id}/labels/{image_id}")
    def in_thread_pool(labelset_id: str, image_id: int, request: Request) -> LabelOut:
        return answer(request, labelset_id, image_id)

    @app.get("/bench/offload/labelsets/{labelset_id}/labels/{image_id}")
    async def offloaded(labelset_id: str, image_id: int, request: Request) -> LabelOut:
        return await run_in_threadpool(answer, request, labelset_id, image_id)

    return app


def baseline_app():
    """Minimal FastAPI endpoints returning pre-encoded constants of the same shapes and sizes as our answers: the
    framework's floor on this machine (no store, no model, no validation, no serialisation)."""
    import json
    from typing import Annotated

    from fastapi import FastAPI, File, Response, UploadFile

    classes = int(os.environ.get("BENCH_CLASSES", "100"))
    batch = int(os.environ.get("BENCH_BATCH_IDS", "1000"))
    row = {"image_id": 0, "hard_label": 0, "classes": None, "probs": [0.012345] * classes}
    single = json.dumps({**row, "labelset_id": LABELSET, "temperature": 2.0}).encode()
    batch_json = json.dumps({"labelset_id": LABELSET, "temperature": 2.0, "num_classes": classes,
                             "data": [row] * batch, "count": batch}).encode()
    buffer = io.BytesIO()
    np.save(buffer, np.full((batch, classes), 1.0 / classes, np.float16))
    batch_npy = buffer.getvalue()
    predicted = json.dumps({"model_id": MODEL, "count": 16, "data": [
        {"file": f"img{i}.png", "top_k": [{"class_id": 0, "class_name": "0", "prob": 0.5}] * 5} for i in range(16)]})
    app = FastAPI()

    @app.get("/labels/{image_id}")
    async def label(image_id: int):
        return Response(single, media_type="application/json")

    @app.post("/batch")
    async def batch_rows(format: str = "json"):
        if format == "npy":
            return Response(batch_npy, media_type="application/octet-stream")
        return Response(batch_json, media_type="application/json")

    @app.post("/predict")
    def predict(files: Annotated[list[UploadFile], File()]):  # parses the same upload, then answers a constant
        return Response(predicted, media_type="application/json")

    return app


# ---- fixtures: a labelset and a model of realistic size ------------------------------------------------------------


def prepare(root: Path, images: int, classes: int) -> None:
    """A CIFAR-100-sized labelset (float16, T=2) and an untrained ResNet-32 model file (speed ignores weights)."""
    from store import LabelsetSpec, LabelsetWriter
    from trainer.export import ModelSpec, save_model
    from trainer.models import Classifier, build_backbone

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((images, classes)) * 2).astype(np.float32)
    labels = rng.integers(0, classes, images)
    spec = LabelsetSpec(teacher_checkpoint_hash="bench", dataset_name="bench", dataset_fingerprint="bench",
                        num_images=images, num_classes=classes, temperature=2.0)
    writer = LabelsetWriter.create(root / "store", LABELSET, spec)
    for chunk in range(writer.num_chunks):
        a, b = writer.chunk_bounds(chunk)
        writer.write_chunk(chunk, logits[a:b], labels[a:b])
    writer.publish()
    import torch

    backbone = build_backbone("resnet32", 3)
    model = Classifier(backbone, torch.nn.Linear(backbone.feature_dim, classes)).eval()
    save_model(root / "runs" / MODEL / "model.pt", model, ModelSpec(
        arch="resnet32", in_channels=3, num_classes=classes, head="linear",
        class_names=[str(i) for i in range(classes)], mean=[0.5] * 3, std=[0.25] * 3, image_size=32,
        role="student", method="ssd", fingerprint="bench"))


@contextlib.contextmanager
def server(factory: str, env: dict):
    """uvicorn serving `factory` on a free loopback port in a child process; yields the port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "uvicorn", "--factory", factory, "--app-dir", str(BENCH_DIR), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{factory} did not start") from None
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- load generation -------------------------------------------------------------------------------------------------


def encode(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """One HTTP/1.1 request as bytes (httpx builds bodies; the raw send keeps client overhead out of the numbers)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _exchange(reader, writer, raw: bytes) -> int:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return int(head[9:12])


async def _load(port: int, requests: list[bytes], concurrency: int) -> tuple[np.ndarray, float]:
    """Send `requests` over `concurrency` keep-alive connections, each one request at a time; (latencies s, wall s)."""
    queue = iter(requests)
    latencies: list[float] = []

    async def client():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for raw in queue:
            start = time.perf_counter()
            status = await _exchange(reader, writer, raw)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"status {status} for {raw[:80]!r}")
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return np.array(latencies), time.perf_counter() - start


def measure(port: int, requests: list[bytes], concurrency: int, warmup: int = 100) -> dict:
    asyncio.run(_load(port, requests[:warmup], min(concurrency, 4)))  # caches, first model load, connections
    latencies, wall = asyncio.run(_load(port, requests, concurrency))
    return {"p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 3), "rps": round(len(requests) / wall, 1),
            "requests": len(requests)}


def _png_batch(count: int, seed: int) -> tuple[bytes, dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        files.append(("files", (f"img{i}.png", buffer.getvalue(), "image/png")))
    request = httpx.Request("POST", "http://x/", files=files)
    return request.read(), {"Content-Type": request.headers["content-type"]}


def workloads(args) -> list[tuple[str, int, dict[str, list[bytes]]]]:
    """(kind, concurrency, {side: requests}): the same workload for our endpoint, its variants and the baseline."""
    rng = np.random.default_rng(1)
    single_ids = rng.integers(0, args.images, args.single_requests)
    out = []
    for c in (1, 16, 64):
        sides = {"ours": [encode("GET", f"/v1/labelsets/{LABELSET}/labels/{i}") for i in single_ids],
                 "baseline": [encode("GET", f"/labels/{i}") for i in single_ids]}
        for variant in ("def", "offload"):
            sides[variant] = [encode("GET", f"/bench/{variant}/labelsets/{LABELSET}/labels/{i}") for i in single_ids]
        out.append(("single", c, sides))
    for fmt in ("json", "npy"):
        query = "?format=npy" if fmt == "npy" else ""
        ids = [",".join(map(str, rng.integers(0, args.images, args.batch_ids))) for _ in range(args.batch_requests)]
        ours = [encode("POST", f"/v1/labelsets/{LABELSET}/labels:batch{query}", f'{{"image_ids": [{i}]}}'.encode(),
                       {"Content-Type": "application/json"}) for i in ids]
        baseline = [encode("POST", f"/batch?format={fmt}")] * len(ours)
        out += [(f"batch_{fmt}", c, {"ours": ours, "baseline": baseline}) for c in (1, 4)]
    body, headers = _png_batch(args.predict_images, 2)
    n = args.predict_requests
    out += [("predict", c, {"ours": [encode("POST", f"/v1/models/{MODEL}:predict", body, headers)] * n,
                            "baseline": [encode("POST", "/predict", body, headers)] * n}) for c in (1, 4)]
    # one image per request: the dynamic batcher against the same service with batching off
    ones = [encode("POST", f"/v1/models/{MODEL}:predict", *_png_batch(1, 3 + i)) for i in range(args.single_predicts)]
    out += [("predict1", c, {"ours": ones, "unbatched": ones}) for c in (1, 16)]
    return [w for w in out if not args.only or w[0] in args.only]


def run(args) -> list[dict]:
    """Both servers up at once; every workload alternates between them for `--rounds`, and each side keeps its round
    with the lowest p99 (as timeit keeps its best run): load from other users of the machine hits both sides."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), args.images, args.classes)
        env = {"LTD_STORE_ROOT": f"{tmp}/store", "LTD_RUNS_ROOT": f"{tmp}/runs", "BENCH_CLASSES": str(args.classes),
               "BENCH_BATCH_IDS": str(args.batch_ids)}
        with (server("service_bench:ours_app", env) as ours, server("service_bench:baseline_app", env) as baseline,
              server("service_bench:ours_app", {**env, "LTD_PREDICT_BATCHING": "false"}) as unbatched):
            ports = {"ours": ours, "def": ours, "offload": ours, "baseline": baseline, "unbatched": unbatched}
            results: dict = {}
            for kind, c, sides in workloads(args):
                log.info("%s at concurrency %d", kind, c)
                warmup = 100 if kind == "single" else 5
                for _ in range(args.rounds):
                    for side, requests in sides.items():
                        got = measure(ports[side], requests, c, warmup=warmup)
                        best = results.get((side, kind, c))
                        results[side, kind, c] = got if best is None or got["p99_ms"] < best["p99_ms"] else best
    return rows_from(results, args)


def rows_from(results: dict, args) -> list[dict]:
    endpoints = {"single": "GET /v1/labelsets/{id}/labels/{image_id}",
                 "batch_json": f"POST /v1/labelsets/{{id}}/labels:batch ({args.batch_ids} ids, JSON)",
                 "batch_npy": f"POST /v1/labelsets/{{id}}/labels:batch ({args.batch_ids} ids, npy float16)",
                 "predict": f"POST /v1/models/{{id}}:predict ({args.predict_images} PNG 32x32, ResNet-32)",
                 "predict1": "POST /v1/models/{id}:predict (1 image)"}
    rows = []
    for (name, kind, c), ours in results.items():
        if kind == "predict1" and name in ("ours", "unbatched"):
            other = results["unbatched" if name == "ours" else "ours", kind, c]
            rows.append({"endpoint": endpoints[kind], "concurrency": c, "batching": name == "ours", **ours,
                         "images_s": ours["rps"], "ratio_vs_other": round(ours["rps"] / other["rps"], 3),
                         "image": "PNG 32x32", "arch": "resnet32", "rounds": args.rounds})
            continue
        if name != "ours":
            continue
        base = results["baseline", kind, c]
        row = {"endpoint": endpoints[kind], "concurrency": c, **ours, "baseline_p50_ms": base["p50_ms"],
               "baseline_p99_ms": base["p99_ms"], "baseline_rps": base["rps"],
               "ratio_rps": round(ours["rps"] / base["rps"], 3), "rounds": args.rounds}
        if kind == "single":
            row["handler"] = "async def, reader inline"
            for variant in ("def", "offload"):
                alt = results[variant, kind, c]
                row.update({f"{variant}_p50_ms": alt["p50_ms"], f"{variant}_p99_ms": alt["p99_ms"],
                            f"{variant}_rps": alt["rps"]})
        if kind.startswith("batch"):
            row["rows_s"] = round(ours["rps"] * args.batch_ids)
        if kind == "predict":
            row["images_s"] = round(ours["rps"] * args.predict_images, 1)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="Labelset rows (CIFAR-100-LT has ~10.8k)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--single-requests", type=int, default=2000, help="Requests per concurrency level")
    parser.add_argument("--batch-ids", type=int, default=1000)
    parser.add_argument("--batch-requests", type=int, default=60)
    parser.add_argument("--predict-images", type=int, default=16)
    parser.add_argument("--predict-requests", type=int, default=40)
    parser.add_argument("--single-predicts", type=int, default=400, help="One-image predict requests per level")
    parser.add_argument("--rounds", type=int, default=3, help="Alternations of ours and the baseline per workload")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        help="Comma-separated workloads (single, batch_json, batch_npy, predict, predict1); the "
                             "results file keeps the other workloads' earlier rows")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from trainer.report import write_results

    rows = run(args)
    if args.only:  # keep the earlier rows of the workloads not re-measured, marked with their own date
        import json

        from trainer.report import device_tag

        path = args.out / f"service-{device_tag()}.json"
        if path.exists():
            earlier = json.loads(path.read_text())
            measured = {r["endpoint"] for r in rows}
            rows += [{**r, "measured": r.get("measured", earlier["date"])} for r in earlier["rows"]
                     if r["endpoint"] not in measured]
    command = "python bench/service_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = write_results("service", rows, command, args.out)
    for row in rows:
        against = (f"baseline p99 {row['baseline_p99_ms']:.2f} ms {row['baseline_rps']:.0f} rps"
                   if "baseline_rps" in row else f"batching={row.get('batching')} x{row.get('ratio_vs_other')}")
        log.info("%s c=%d p50 %.2f ms p99 %.2f ms %.0f rps | %s", row["endpoint"], row["concurrency"], row["p50_ms"],
                 row["p99_ms"], row["rps"], against)
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
