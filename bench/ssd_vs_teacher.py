"""SSD against the LWS baseline it must beat, seed by seed (issue 19): one row per SSD variant.

Reads run folders written by `ltd reproduce … --methods lws,ssd` (`lws_if<F>_s<S>` beside `ssd_if<F>_s<S>`, each
with metrics.json), pairs them by seed, and writes (or updates, variant by variant) bench/results/ssd_vs_teacher-
<device>.json: lws_overall, ssd_overall, diff_mean (SSD − LWS, mean over seeds), diff_std, per_seed_diff,
many/medium/few of both, SSD's stages, and what its soft labels carried. Usage:

    python bench/ssd_vs_teacher.py --variant teacher_ce_lws --runs runs/i19/cifar10_lt --default \\
        --note "moco.weight 0: SSD's teacher is the plain CE -> LWS baseline"
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from trainer.config import load_config
from trainer.report import GROUPS, device_tag, write_results


def paired_runs(root: Path, factor: int) -> dict[int, tuple[dict, dict]]:
    """{seed: (lws metrics, ssd metrics)} for every seed with both runs finished."""
    pairs = {}
    for lws_path in sorted(root.glob(f"lws_if{factor}_s*/metrics.json")):
        seed = int(re.search(r"_s(\d+)$", lws_path.parent.name).group(1))
        ssd_path = root / f"ssd_if{factor}_s{seed}" / "metrics.json"
        if ssd_path.is_file():
            pairs[seed] = (json.loads(lws_path.read_text()), json.loads(ssd_path.read_text()))
    return dict(sorted(pairs.items()))


def _mean(values):
    return None if any(v is None for v in values) else round(float(np.mean(values)), 2)


def variant_row(variant: str, pairs: dict[int, tuple[dict, dict]], epochs: int, note: str, default: bool) -> dict:
    lws, ssd = [p[0] for p in pairs.values()], [p[1] for p in pairs.values()]
    diffs = [s["final"]["overall"] - b["final"]["overall"] for b, s in zip(lws, ssd)]
    row = {"dataset": f"{ssd[0]['dataset']}_lt", "imbalance_factor": ssd[0]["imbalance_factor"], "epochs": epochs,
           "variant": variant, "seeds": list(pairs), "default": default}
    for name, runs in (("lws", lws), ("ssd", ssd)):
        for group in GROUPS:
            row[f"{name}_{group}"] = _mean([r["final"][group] for r in runs])
    row.update(diff_mean=round(float(np.mean(diffs)), 2),
               diff_std=round(float(np.std(diffs, ddof=1)), 2) if len(diffs) > 1 else 0.0,
               per_seed_diff=[round(d, 2) for d in diffs],
               per_seed_lws=[b["final"]["overall"] for b in lws], per_seed_ssd=[s["final"]["overall"] for s in ssd],
               ssd_stages={stage: {g: _mean([r["stages"][stage][g] for r in ssd]) for g in GROUPS}
                           for stage in ssd[0]["stages"]})
    contents = [r.get("soft_labels", {}).get("content") for r in ssd]
    if all(contents):
        row["soft_labels"] = {key: _mean([c["overall"][key] for c in contents])
                              for key in ("max_prob", "entropy", "off_label_mass", "argmax_differs")}
    if note:
        row["note"] = note
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--runs", type=Path, required=True, help="folder holding lws_if*_s* and ssd_if*_s* runs")
    parser.add_argument("--imbalance", type=int, default=100)
    parser.add_argument("--default", action="store_true", help="this variant is what method=ssd now does")
    parser.add_argument("--note", default="")
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    pairs = paired_runs(args.runs, args.imbalance)
    if not pairs:
        raise SystemExit(f"no finished lws/ssd pairs under {args.runs} at imbalance {args.imbalance}")
    cfg = load_config(args.runs / f"ssd_if{args.imbalance}_s{next(iter(pairs))}" / "config.yaml")
    epochs = cfg.stage1.optim.epochs
    row = variant_row(args.variant, pairs, epochs, args.note, args.default)
    command = "python bench/ssd_vs_teacher.py " + " ".join(shlex.quote(a) for a in argv)
    row["command"] = command
    path = args.results_dir / f"ssd_vs_teacher-{device_tag()}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = [r for r in rows if (r["variant"], r["dataset"], r["epochs"]) != (row["variant"], row["dataset"], epochs)]
    if args.default:  # one default per dataset
        for r in rows:
            r["default"] = r["default"] and r["dataset"] != row["dataset"]
    write_results("ssd_vs_teacher", [*rows, row], command, args.results_dir)
    print(json.dumps({k: row[k] for k in ("variant", "seeds", "lws_overall", "ssd_overall", "diff_mean",
                                          "diff_std", "per_seed_diff")}))


if __name__ == "__main__":
    main(sys.argv[1:])
