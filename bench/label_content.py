"""What a run's soft labels carry, in the two regimes SSD can distil from (issue 19, item 1).

clean:    our stored labels: the eval-mode teacher on the un-augmented training images (one row per image).
official: the reference code's stage III (MCG-NJU/SSD-LT): the teacher labels the student's augmented view, with
          its BatchNorm in train mode (batch statistics), batch 128 in instance-sampler order, over one epoch.

Both are summarised by `store.content` (per shot group, teacher right vs wrong: mean max-probability, entropy, mass
off the argmax and off the hard label, argmax != hard label) and written as one results file, one row per run and
regime. Usage: python bench/label_content.py RUN_DIR [RUN_DIR ...] (each holding config.yaml and teacher.pt, or see --teacher).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from store.content import class_sums, label_content, summarize
from trainer.config import load_config
from trainer.export import load_model
from trainer.report import write_results
from trainer.soft_targets import OnlineTargets
from trainer.context import prepare
from trainer.stages import teacher_logits


def official_content(ctx, teacher, temperature: float, batch_size: int, seed: int) -> dict:
    """One epoch of the reference regime: train-mode-BN teacher (a copy) on each augmented student batch."""
    targets = OnlineTargets(teacher, temperature, batchnorm="train")
    batches = ctx.batches(ctx.data.train, train=True, batch_size=batch_size)
    sums = 0
    for batch in batches.epoch(0.0, torch.Generator().manual_seed(seed)):
        sums = sums + class_sums(targets(batch).cpu().numpy(), batch.labels.cpu().numpy(), ctx.data.num_classes)
    return summarize(sums, 1, ctx.data.class_names)


def row(run: Path, regime: str, content: dict, cfg, teacher_top1: float | None) -> dict:
    groups = content["groups"]
    return {"dataset": f"{cfg.data.name}_lt", "imbalance_factor": cfg.data.imbalance_factor, "run": run.name,
            "epochs": cfg.stage1.optim.epochs, "seed": cfg.seed, "regime": regime, "temperature":
            cfg.stage3.temperature, "teacher_top1": teacher_top1, "overall": content["overall"],
            **{g: groups[g] for g in ("many", "medium", "few")},
            "classes": content.get("classes"), "uniform_entropy": content["uniform_entropy"]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--temperature", type=float, default=None, help="default: the run's stage3.temperature")
    parser.add_argument("--teacher", default="teacher.pt", help="model file in each run folder (an LWS run's "
                        "model.pt is the teacher an SSD run of the same stage I would train)")
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="label_content")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for run in args.runs:
        overrides = [] if args.temperature is None else [f"stage3.temperature={args.temperature}"]
        cfg = load_config(run / "config.yaml", [f"out_dir={run}", *overrides])
        ctx = prepare(cfg)
        teacher, spec = load_model(run / args.teacher)
        teacher.to(ctx.device)
        top1 = (spec.metrics or {}).get("overall")
        temperature = cfg.stage3.temperature
        probs = torch.softmax(teacher_logits(ctx, teacher) / temperature, dim=1).numpy()
        clean = label_content(probs, ctx.data.train.labels.numpy(), ctx.data.class_names)
        rows.append(row(run, "clean", clean, cfg, top1))
        official = official_content(ctx, teacher, temperature, cfg.stage3.optim.batch_size, cfg.seed)
        rows.append(row(run, "official", official, cfg, top1))
        for r in rows[-2:]:
            o = r["overall"]
            print(f"{run.name} {r['regime']:>8} T={temperature}: max-prob {o['max_prob']:.3f} entropy "
                  f"{o['entropy']:.3f} off-label {o['off_label_mass']:.3f} argmax!=label {o['argmax_differs']:.3f}")
    command = "python bench/label_content.py " + " ".join(shlex.quote(a) for a in argv)
    path = write_results("label_content", rows, command, args.results_dir, name=args.name)
    print(f"wrote {path}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main(sys.argv[1:])
