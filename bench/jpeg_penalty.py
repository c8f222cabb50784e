"""The penalty of a lossy copy (issue 19, 4b): the same split trained from lossless images and from a JPEG round trip.

Reads two run trees written by `ltd reproduce embedded --methods ce,lws --seeds 0,1,2,3,4` (one plain, one with
`data.jpeg_quality=75`: train and test images both round-tripped, as our CIFAR-10 copy is), pairs runs by method
and seed, and writes bench/results/jpeg_penalty-<device>.json: per method lossless and JPEG overall (and
many/medium/few), the paired difference JPEG − lossless (mean, std, per seed). Usage:

    python bench/jpeg_penalty.py --lossless runs/jpeg_lossless/embedded --jpeg runs/jpeg_q75/embedded --quality 75
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from trainer.report import GROUPS, write_results


def finals(root: Path, method: str) -> dict[int, dict]:
    """{seed: final metrics} of every finished `<method>_if*_s<seed>` run under root."""
    out = {}
    for path in sorted(root.glob(f"{method}_if*_s*/metrics.json")):
        metrics = json.loads(path.read_text())
        out[metrics["seed"]] = {**metrics["final"], "dataset": metrics["dataset"],
                                "imbalance_factor": metrics["imbalance_factor"]}
    return out


def penalty_row(method: str, lossless: dict[int, dict], jpeg: dict[int, dict], quality: int) -> dict:
    seeds = sorted(set(lossless) & set(jpeg))
    if not seeds:
        raise SystemExit(f"no seed has both a lossless and a JPEG {method} run")
    diffs = [jpeg[s]["overall"] - lossless[s]["overall"] for s in seeds]
    first = lossless[seeds[0]]
    row = {"dataset": f"{first['dataset']}_lt", "imbalance_factor": first["imbalance_factor"], "method": method,
           "jpeg_quality": quality, "seeds": seeds}
    for name, runs in (("lossless", lossless), ("jpeg", jpeg)):
        for group in GROUPS:
            values = [runs[s][group] for s in seeds if runs[s].get(group) is not None]
            row[f"{name}_{group}"] = round(float(np.mean(values)), 2) if values else None
    row.update(diff_mean=round(float(np.mean(diffs)), 2), diff_std=round(float(np.std(diffs, ddof=1)), 2),
               per_seed_diff=[round(d, 2) for d in diffs])
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lossless", type=Path, required=True)
    parser.add_argument("--jpeg", type=Path, required=True)
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--methods", default="ce,lws")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--note", default=None)
    args = parser.parse_args(argv)
    rows = [penalty_row(m, finals(args.lossless, m), finals(args.jpeg, m), args.quality)
            for m in args.methods.split(",")]
    command = "python bench/jpeg_penalty.py " + " ".join(shlex.quote(a) for a in argv)
    path = write_results("jpeg_penalty", rows, command, args.out, extra={"note": args.note} if args.note else None)
    for row in rows:
        print(f"{row['method']}: lossless {row['lossless_overall']} jpeg {row['jpeg_overall']} "
              f"diff {row['diff_mean']:+.2f} ± {row['diff_std']:.2f} {row['per_seed_diff']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
