"""Label store benchmark: generation overhead next to the teacher, single-id and streaming reads, bytes per image."""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from store import LabelsetReader, LabelsetSpec, LabelsetWriter, Provenance, tempering
from trainer.labels import teacher_logits_block
from trainer.models import build_classifier
from trainer.report import write_results
from trainer.soft_targets import InMemorySoftLabels, read_all_rows
from trainer.context import resolve_device

log = logging.getLogger("bench.label_store")

TEMPERATURE = 2.0  # Stage3Config's default T
MEAN, STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)  # CIFAR-100 statistics; any values time the same
# Estimates, not measurements (no GPU was available for the CPU run): every row that uses one says so.
H100_TEACHER_IMG_S = 75_000  # ResNet-32 inference at 32x32 on one H100: roughly 50-100k img/s
H100_STUDENT_IMG_S = 30_000  # ResNet-32 two-head student training on one H100: roughly 20-40k img/s
STREAM_TARGET = 20.0  # streaming reads must be >= 20x the student's consumption
LABELGEN_TARGET = 0.9  # generation with the store >= 0.9x the teacher alone


def synthetic_logits(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Trained-teacher-like logits (n, c) float32 (noise + a margin on the true class) and their int64 labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = (rng.standard_normal((n, c)) * 2.0).astype(np.float32)
    logits[np.arange(n), labels] += 8.0
    return logits, labels


def make_spec(n: int, c: int, **options) -> LabelsetSpec:
    """A labelset spec with placeholder provenance; `options` are the storage settings under test."""
    return LabelsetSpec(teacher_checkpoint_hash="bench", dataset_name="bench", dataset_fingerprint="bench",
                        num_images=n, num_classes=c, temperature=TEMPERATURE, **options)


def write_labelset(root: Path, labelset_id: str, logits: np.ndarray, labels: np.ndarray, **options) -> dict:
    """Create, fill and publish one labelset from precomputed logits; seconds for the writes and for it all."""
    t0 = time.perf_counter()
    writer = LabelsetWriter.create(root, labelset_id, make_spec(len(logits), logits.shape[1], **options))
    t1 = time.perf_counter()
    for chunk in range(writer.num_chunks):
        start, stop = writer.chunk_bounds(chunk)
        writer.write_chunk(chunk, logits[start:stop], labels[start:stop])
    t2 = time.perf_counter()
    writer.publish()
    t3 = time.perf_counter()
    return {"write_s": t2 - t1, "total_s": t3 - t0, "chunk_rows": writer.provenance.chunk_rows}


def folder_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under `path`, as `du --apparent-size` and `du` count them."""
    files = [p.stat() for p in path.rglob("*") if p.is_file()]
    return sum(s.st_size for s in files), sum(s.st_blocks * 512 for s in files)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer around it measures the kernels and not their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- labelgen: the teacher alone vs the teacher + the store, the same chunk loop as LabelShardWriter.write.

def bench_labelgen(c: int, n: int, device: torch.device, rounds: int, root: Path, seed: int) -> list[dict]:
    """Images/s of teacher_logits_block per chunk (baseline) vs the same plus write_chunk and publish (ours)."""
    torch.manual_seed(seed)
    model = build_classifier("resnet32", 3, c).to(device).eval()
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    labels = np.random.default_rng(seed).integers(0, c, n)
    chunk_rows = Provenance.from_spec("bench", make_spec(n, c)).chunk_rows  # the store's default chunking
    chunks = [(s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]
    # warm-up, untimed: the teacher once over every chunk (each batch shape primes its kernels), and the store
    warm = torch.cat([teacher_logits_block(model, images[start:stop], MEAN, STD) for start, stop in chunks])
    write_labelset(root, f"warm-store-{c}", warm.numpy(), labels)

    def timed(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    def one_round(r: int) -> tuple[float, float]:
        """Seconds of (teacher alone, teacher + store) over all chunks, the two interleaved chunk by chunk so a
        burst of other work on this shared machine slows both sides alike; create and publish count for ours."""
        t = time.perf_counter()
        writer = LabelsetWriter.create(root, f"gen-{c}-{r}", make_spec(n, c))
        base_s, ours_s = 0.0, time.perf_counter() - t
        for chunk, (start, stop) in enumerate(chunks):
            def teacher_only():
                teacher_logits_block(model, images[start:stop], MEAN, STD).numpy()

            def with_store():
                logits = teacher_logits_block(model, images[start:stop], MEAN, STD)
                writer.write_chunk(chunk, logits.numpy(), labels[start:stop])

            # alternate which side runs first, so neither always finds the warmer caches
            if (r + chunk) % 2:
                ours_s += timed(with_store)
                base_s += timed(teacher_only)
            else:
                base_s += timed(teacher_only)
                ours_s += timed(with_store)
        return base_s, ours_s + timed(writer.publish)

    rounds_s = [one_round(r) for r in range(rounds)]
    for r, (base_s, ours_s) in enumerate(rounds_s):
        log.info("labelgen C=%d round %d: teacher %.1f img/s, teacher+store %.1f img/s", c, r, n / base_s, n / ours_s)
    # totals over all rounds: every round's noise lands on both sides, so the ratio is the paired one
    ours = n * rounds / sum(o for _, o in rounds_s)
    base = n * rounds / sum(b for b, _ in rounds_s)
    return [{
        "name": "labelgen", "variant": "teacher_plus_store_vs_teacher", "classes": c,
        "ours": round(ours, 1), "baseline": round(base, 1), "ratio": round(ours / base, 3),
        "unit": "img/s", "target_ratio": LABELGEN_TARGET, "meets_target": ours / base >= LABELGEN_TARGET,
        "teacher": "resnet32 (random init)", "device": device.type, "n_images": n, "chunk_rows": chunk_rows,
        "batch_size": 512, "rounds": rounds, "timing": "teacher-only and teacher+write_chunk interleaved per chunk; "
        "ours also counts LabelsetWriter.create and publish; totals over all rounds",
        "ours_runs": [round(n / o, 1) for _, o in rounds_s], "baseline_runs": [round(n / b, 1) for b, _ in rounds_s],
    }]


def store_only_row(c: int, n: int, rounds: int, root: Path, logits, labels, chunk_rows: int | None) -> dict:
    """write_chunk alone on precomputed logits (rows/s), and what it would cost a fast GPU teacher run serially."""
    runs = [write_labelset(root, f"store-only-{c}-{chunk_rows}-{r}", logits, labels, chunk_rows=chunk_rows)
            for r in range(rounds)]
    write_rows_s = max(n / x["write_s"] for x in runs)
    total_rows_s = max(n / x["total_s"] for x in runs)
    # LabelShardWriter runs teacher then write_chunk one after the other: seconds per image add up
    combined = 1.0 / (1.0 / H100_TEACHER_IMG_S + 1.0 / total_rows_s)
    log.info("store-only C=%d chunk_rows=%d: write_chunk %.0f rows/s, with create+publish %.0f rows/s",
             c, runs[0]["chunk_rows"], write_rows_s, total_rows_s)
    return {
        "name": "labelgen", "variant": "store_only_vs_h100_teacher_estimate", "classes": c,
        "ours": round(combined, 1), "baseline": H100_TEACHER_IMG_S, "ratio": round(combined / H100_TEACHER_IMG_S, 3),
        "unit": "img/s", "estimate": True, "target_ratio": LABELGEN_TARGET,
        "meets_target": combined / H100_TEACHER_IMG_S >= LABELGEN_TARGET,
        "store_write_rows_s": round(write_rows_s, 1), "store_total_rows_s": round(total_rows_s, 1),
        "n_images": n, "chunk_rows": runs[0]["chunk_rows"], "chunk_rows_default": chunk_rows is None,
        "note": "baseline is an estimated H100 ResNet-32 teacher rate (50-100k img/s), not measured; ours = "
                "1/(1/teacher + 1/store create+write+publish rate measured here on CPU)",
    }


# --- reads

def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds of durations in seconds."""
    p50, p99 = np.percentile(np.asarray(samples) * 1e3, [50, 99])
    return round(float(p50), 4), round(float(p99), 4)


def time_single(read, ids: np.ndarray) -> list[float]:
    """Seconds of `read([i])` for each id in turn (one id per call: the latency a random lookup sees)."""
    out = []
    for i in ids.tolist():
        t = time.perf_counter()
        read([i])
        out.append(time.perf_counter() - t)
    return out


def bench_read_single(c: int, root: Path, labelset_id: str, logits, reads: int, seed: int) -> list[dict]:
    """Random single-id soft_labels latency: cache hit and chunk miss, against InMemorySoftLabels (a numpy index)."""
    n = len(logits)
    ids = np.random.default_rng(seed).integers(0, n, reads)
    memory = InMemorySoftLabels(logits, TEMPERATURE)
    base = time_single(memory.soft_labels, ids)
    t = time.perf_counter()
    warm = LabelsetReader(root, labelset_id)
    open_ms = (time.perf_counter() - t) * 1e3
    warm.soft_labels(np.arange(n))  # every chunk decoded, checked and cached
    # cache_mib=0 keeps one chunk: a random id almost always decodes its chunk (the first touch also checksums it)
    cases = {"warm_cache": warm, "chunk_miss": LabelsetReader(root, labelset_id, cache_mib=0)}
    rows = []
    b50, b99 = percentiles_ms(base)
    for variant, reader in cases.items():
        p50, p99 = percentiles_ms(time_single(reader.soft_labels, ids))
        log.info("read_single C=%d %s: p50 %.3f ms p99 %.3f ms (in-memory p50 %.4f ms)", c, variant, p50, p99, b50)
        rows.append({
            "name": "read_single", "variant": variant, "classes": c, "ours": p50, "baseline": b50,
            "ratio": round(p50 / b50, 1), "unit": "ms (p50)", "p50_ms": p50, "p99_ms": p99,
            "baseline_p50_ms": b50, "baseline_p99_ms": b99, "reads": reads, "n_images": n,
            "chunk_rows": reader.chunk_rows, "open_ms": round(open_ms, 2),
            "baseline_impl": "trainer.soft_targets.InMemorySoftLabels.soft_labels (numpy fancy index of float32 rows)",
        })
    return rows


def bench_read_stream(c: int, root: Path, labelset_id: str, logits, labels, rounds: int, scratch: Path) -> dict:
    """Whole-pass labels/s of iter_blocks (fresh reader, so checksums included) against np.load of raw .npy files."""
    n = len(logits)
    # the very numbers the writer stores: softmax of the float16-cast logits, kept as float16
    soft16 = tempering.softmax(logits.astype(np.float16), TEMPERATURE).astype(np.float16)
    np.save(scratch / f"soft-{c}.npy", soft16)
    np.save(scratch / f"hard-{c}.npy", labels.astype(np.int32))

    def rate(fn) -> float:
        t = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t)

    def passes():
        reader = LabelsetReader(root, labelset_id)
        first = rate(lambda: sum(len(b["image_ids"]) for b in reader.iter_blocks()))
        second = rate(lambda: sum(len(b["image_ids"]) for b in reader.iter_blocks()))
        return first, second

    def npy():
        np.load(scratch / f"soft-{c}.npy")
        np.load(scratch / f"hard-{c}.npy")

    firsts, seconds, block, table, base = [], [], [], [], []
    for _ in range(rounds):
        first, second = passes()
        firsts.append(first)
        seconds.append(second)
        block.append(rate(lambda: LabelsetReader(root, labelset_id).read_block(0, n)))
        table.append(rate(lambda: read_all_rows(LabelsetReader(root, labelset_id), n)))
        base.append(rate(npy))
    ours, baseline = max(firsts), max(base)
    log.info("read_stream C=%d: iter_blocks %.0f labels/s (second pass %.0f), np.load %.0f labels/s",
             c, ours, max(seconds), baseline)
    vs_student = ours / H100_STUDENT_IMG_S
    return {
        "name": "read_stream", "classes": c, "ours": round(ours, 1), "baseline": round(baseline, 1),
        "ratio": round(ours / baseline, 3), "unit": "labels/s", "n_images": n,
        "chunk_rows": LabelsetReader(root, labelset_id).chunk_rows,
        "second_pass_labels_s": round(max(seconds), 1), "read_block_labels_s": round(max(block), 1),
        "read_all_rows_labels_s": round(max(table), 1),
        "student_img_s_estimate": H100_STUDENT_IMG_S, "ratio_vs_student": round(vs_student, 2),
        "target_vs_student": STREAM_TARGET, "meets_target": vs_student >= STREAM_TARGET,
        "baseline_impl": "np.load of the float16 soft-label and int32 hard-label .npy files (page cache warm)",
        "note": "ours = first iter_blocks pass of a fresh reader (decode + sha256 check + float32 renormalise); "
                "student rate is an estimate (ResNet-32 on one H100, 20-40k img/s), not measured",
    }


# --- bytes per image

def bench_bytes(c: int, n: int, root: Path, seed: int) -> list[dict]:
    """On-disk bytes per image of the stored forms, against raw float16 dense rows (C x 2 bytes)."""
    logits, labels = synthetic_logits(n, c, seed)
    forms = {"float16": {}, "float32": {"logits_dtype": "float32"}, "topk5": {"top_k": 5}, "topk10": {"top_k": 10}}
    sizes = {}
    for form, options in forms.items():
        write_labelset(root, f"bytes-{c}-{form}", logits, labels, **options)
        folder = root / f"bytes-{c}-{form}"
        sizes[form] = {p.name: folder_bytes(p) for p in folder.iterdir() if p.is_dir()}
        sizes[form]["_total"] = folder_bytes(folder)
    baseline = 2 * c
    rows = []

    def row(variant: str, form: str, arrays: list[str], what: str) -> dict:
        apparent = sum(sizes[form][a][0] for a in arrays) / n
        allocated = sum(sizes[form][a][1] for a in arrays) / n
        log.info("bytes_per_image C=%d %s: %.1f B/image (raw float16 dense %d)", c, variant, apparent, baseline)
        return {
            "name": "bytes_per_image", "variant": variant, "classes": c, "ours": round(apparent, 1),
            "baseline": baseline, "ratio": round(apparent / baseline, 3), "unit": "bytes/image",
            "allocated_bytes_per_image": round(allocated, 1), "arrays": arrays, "what": what,
            "whole_labelset_bytes_per_image": round(sizes[form]["_total"][0] / n, 1), "n_images": n,
            "per_array_bytes_per_image": {a: round(v[0] / n, 1) for a, v in sizes[form].items() if a != "_total"},
        }

    rows.append(row("float16_dense", "float16", ["logits", "soft_labels", "hard_labels"],
                    "default labelset: float16 logits + float16 soft labels + int32 hard labels"))
    rows.append(row("float16_soft_labels_only", "float16", ["soft_labels"], "the float16 soft-label array alone"))
    rows.append(row("float32_logits", "float32", ["logits", "soft_labels", "hard_labels"],
                    "labelset with float32 logits (+ float16 soft labels + hard labels)"))
    for k in (5, 10):
        rows.append(row(f"topk{k}", f"topk{k}", ["topk_indices", "topk_values", "hard_labels"],
                        f"top-{k} indices (int32) + values (float16) + hard labels; the layout stores them next to "
                        "the dense arrays, so whole_labelset_bytes_per_image is the real footprint"))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto", help="teacher device: auto (CUDA when present), cpu, cuda, ...")
    parser.add_argument("--classes", default="100,1000", help="comma-separated C values")
    parser.add_argument("--labelgen-images", type=int, default=None, help="images per labelgen pass "
                        "(default 1024 on CPU, where the teacher runs ~100 img/s; 50000 on CUDA)")
    parser.add_argument("--read-images", type=int, default=20_000, help="N of the labelset the reads use")
    parser.add_argument("--bytes-images", type=int, default=8192, help="N of the labelsets measured on disk")
    parser.add_argument("--reads", type=int, default=2000, help="random single-id reads per latency case")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements; the best is kept")
    parser.add_argument("--alt-chunk-rows", type=int, default=2048,
                        help="also time store-only writes with this chunk_rows where the default is smaller (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    device = resolve_device(args.device)
    n_gen = args.labelgen_images or (50_000 if device.type == "cuda" else 1024)
    rows: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="ltd-bench-store-"))
    try:
        for c in (int(x) for x in args.classes.split(",")):
            rows += bench_labelgen(c, n_gen, device, args.rounds, root, args.seed)
            logits, labels = synthetic_logits(args.read_images, c, args.seed)
            rows.append(store_only_row(c, args.read_images, args.rounds, root, logits, labels, None))
            default_rows = LabelsetReader(root, f"store-only-{c}-None-0").chunk_rows
            if args.alt_chunk_rows and default_rows < args.alt_chunk_rows:
                rows.append(store_only_row(c, args.read_images, args.rounds, root, logits, labels,
                                           args.alt_chunk_rows))
            rows += bench_read_single(c, root, f"store-only-{c}-None-0", logits, args.reads, args.seed)
            rows.append(bench_read_stream(c, root, f"store-only-{c}-None-0", logits, labels, args.rounds, root))
            rows += bench_bytes(c, args.bytes_images, root, args.seed)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    path = write_results("label_store", rows, command=command, out_dir=args.out,
                         extra={"logits": "synthetic trained-like logits (N(0, 2^2) noise, +8 on the true class), "
                                          f"T={TEMPERATURE}; estimates are marked estimate/note, not measured"})
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
