"""Data-parallel scaling: stage-I images/s with 1 and 2 Ray Train workers (same per-worker batch), in one process.

Each worker count trains the same stage I (CE + MoCo, the SSD objective) through `train_distributed`; images/s is
the engine's own epoch record (all workers' images / epoch wall time), averaged over epochs after the first.
Writes bench/results/scaling-<device>.json (../shared/BENCHMARKS.md: rows {"workers", "img_s", "speedup_vs_1"}).

    python bench/scaling.py                       # CPU: Fashion-MNIST-LT, ResNet-8, 1 CPU per worker
    python bench/scaling.py --workers 1,2,4 --epochs 4 --batch 256 --arch resnet32   # a GPU host
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import ray

from trainer.checkpoint import load_checkpoint
from trainer.config import load_config
from trainer.report import write_results
from trainer.workers import train_distributed


def stage1_img_s(workers: int, args, root: Path) -> tuple[float, list[float], float]:
    """(mean img/s over epochs 2.., per-epoch img/s, wall seconds of the whole Ray Train run)."""
    out = root / f"w{workers}"
    cfg = load_config(None, [
        "data.name=embedded", "data.imbalance_factor=100", f"data.max_per_class={args.max_per_class}",
        "data.test_per_class=10", f"model.arch={args.arch}", "method=ssd", f"stage1.optim.epochs={args.epochs}",
        "stage1.optim.warmup_epochs=0", "stage1.moco.queue_size=1024", f"stage1.optim.batch_size={args.batch}",
        "stage2.optim.epochs=1", "stage3.optim.epochs=1", "stage3.optim.warmup_epochs=0", "stage4.enabled=false",
        f"distributed.num_workers={workers}", f"distributed.cpus_per_worker={args.cpus_per_worker}",
        f"out_dir={out}",
    ])
    tic = time.perf_counter()
    train_distributed(cfg)
    wall = time.perf_counter() - tic
    history = load_checkpoint(out / "stage1" / "checkpoint.pt")["history"]
    rates = [h["img_s"] for h in history]
    steady = rates[1:] or rates
    return sum(steady) / len(steady), rates, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch")
    parser.add_argument("--arch", default="resnet8")
    parser.add_argument("--max-per-class", type=int, default=1000)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--address", default=None, help="Ray cluster (default: a local Ray in this process)")
    args = parser.parse_args()
    ray.init(address=args.address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ltd-scaling-") as tmp:
        for workers in (int(w) for w in args.workers.split(",")):
            img_s, rates, wall = stage1_img_s(workers, args, Path(tmp))
            rows.append({"workers": workers, "img_s": round(img_s, 1), "per_worker_batch": args.batch,
                         "global_batch": args.batch * workers, "epoch_img_s": [round(r, 1) for r in rates],
                         "run_wall_s": round(wall, 1), "stage": "I (CE + MoCo)", "arch": args.arch})
    for row in rows:
        row["speedup_vs_1"] = round(row["img_s"] / rows[0]["img_s"], 3)
    command = "python bench/scaling.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = write_results("scaling", rows, command.strip(), extra={
        "note": "img/s = all workers' stage-I images / epoch wall time (the engine's record), mean over epochs 2..; "
                "run_wall_s includes Ray Train start-up, per-epoch checkpoint reports and stages II-III (1 epoch)"})
    print(path.read_text())


if __name__ == "__main__":
    main()
