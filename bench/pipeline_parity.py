"""Accuracy parity: does our on-device input pipeline train as well as the plain torchvision DataLoader recipe?

The throughput benchmark shows DeviceBatches is faster; this one checks it costs no accuracy. Both sides train the
same CE config (ResNet-32, CIFAR-10-LT IF 100, the LDAM-DRW step schedule at the given epochs) through the same
`train_stage1` (objective, engine.fit, checkpoints) from the same initial weights, and the same code evaluates
them. Only the training batches differ: ours come from `DeviceBatches` (uint8 tensor, batched crop + flip), the
baseline's from a `DataLoader` over PIL images with torchvision's RandomCrop(32, 4) + RandomHorizontalFlip +
ToTensor + Normalize.
A gap larger than the seed-to-seed spread would mean our augmentation or sampling differs from the recipe.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from train_throughput import PlainCifar, load_data, plain_transforms
from trainer.batches import Batch
from trainer.config import RunConfig, load_config
from trainer.report import aggregate, write_results
from trainer.context import RunContext, evaluate, prepare
from trainer.stages import train_stage1

log = logging.getLogger("bench.pipeline_parity")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10_lt" / "ce.yaml"


class PlainEpochs:
    """The plain recipe as an engine.fit batch source: one shuffled DataLoader pass per epoch."""

    def __init__(self, ctx: RunContext, workers: int):
        data, optim = ctx.data, ctx.cfg.stage1.optim
        query, _ = plain_transforms(data.train.images.shape[-1], data.mean, data.std, key_view=False, flavour="v1")
        self.dataset = PlainCifar(data.train.images, data.train.labels, query)
        self.batch_size, self.workers, self.device = optim.batch_size, workers, ctx.device

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    def epoch(self, progress: float = 0.0, generator: torch.Generator | None = None):
        cuda = self.device.type == "cuda"
        loader = DataLoader(self.dataset, self.batch_size, shuffle=True, num_workers=self.workers, pin_memory=cuda,
                            generator=generator)
        for ids, labels, images, _ in loader:
            yield Batch(ids=ids.to(self.device), labels=labels.to(self.device),
                        images=images.to(self.device, non_blocking=cuda))


def run_side(side: str, cfg: RunConfig, data, workers: int) -> dict:
    ctx = prepare(cfg.model_copy(update={"out_dir": cfg.out_dir / side}), data)
    model = train_stage1(ctx, batches=None if side == "ours" else PlainEpochs(ctx, workers))
    report = {"seed": cfg.seed, "final": evaluate(ctx, model.eval())}
    log.info("%s seed %d: top-1 %.2f, few %s", side, cfg.seed, report["final"]["overall"], report["final"]["few"])
    return report


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30, help="Stage I epochs (the recipe's 200 on a GPU)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--workers", type=int, default=2, help="Baseline DataLoader workers")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="Both sides' forward precision")
    parser.add_argument("--sides", default="ours,baseline",
                        help="Which pipelines to train (baseline alone: ours at this seed and schedule is stage I of "
                             "the table's LWS run, e.g. on a GPU where the table already trains it)")
    parser.add_argument("--runs", type=Path, default=Path("runs/pipeline_parity"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    data = load_data()
    warmup = max(1, round(5 * args.epochs / 200))  # the recipe's 5 warm-up epochs of 200, scaled
    sides = args.sides.split(",")
    if not set(sides) <= {"ours", "baseline"}:
        parser.error(f"--sides takes ours and/or baseline, got {args.sides!r}")
    reports: dict[str, list[dict]] = {side: [] for side in sides}
    for seed in (int(s) for s in args.seeds.split(",")):
        overrides = [f"stage1.optim.epochs={args.epochs}", f"stage1.optim.warmup_epochs={warmup}", f"seed={seed}",
                     f"precision={args.precision}", f"out_dir={args.runs / f's{seed}'}"]
        cfg = load_config(CONFIG, overrides)
        for side in reports:
            reports[side].append(run_side(side, cfg, data, args.workers))
    rows = [{"dataset": "cifar10_lt" if data.name == "cifar10_npz" else f"{data.name}_lt", "imbalance_factor": 100,
             "method": "ce", "pipeline": side, "epochs": args.epochs, "precision": args.precision,
             **aggregate(group)} for side, group in reports.items()]
    if len(rows) == 2:
        rows[0]["overall_gap_vs_baseline"] = round(rows[0]["overall"] - rows[1]["overall"], 2)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    path = write_results("accuracy", rows, command, args.out, name="pipeline_parity")
    log.info("%s -> %s", ", ".join(f"{r['pipeline']} {r['overall']:.2f}" for r in rows), path)


if __name__ == "__main__":
    main()
