"""A reproduction table with and without stage-I sharing (RunConfig.stage1_cache), in one process, on local Ray.

Both sides run the same `ltd reproduce` runs through the same Ray scheduling (`run_pipelines`); "own" has every run
train its own stage I (the baseline), "shared" keeps one stage1_cache beside the runs, as `ltd reproduce` does.
Reports the table's wall time, the summed task time and whether every run's reported numbers came out equal.
Writes bench/results/stage1_sharing-<device>.json (rows: {"table", "side", "wall_s", "task_s", ...}).

    python bench/stage1_sharing.py                      # the embedded table, seed 0 (about 14 min on 2 CPU cores)
    python bench/stage1_sharing.py --table cifar10_lt --seeds 0 --imbalance 100      # a GPU host
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from service.cli import TABLES, table_configs
from trainer.report import write_results
from trainer.workers import init_ray, run_pipelines


def run_side(table: str, seeds: list[int], factors: list[int], methods: list[str], root: Path, shared: bool):
    """(wall seconds, reports) of one side; "own" turns the cache off with the same override a user would pass."""
    extra = [] if shared else ["stage1_cache=null"]
    cfgs = [cfg for _, _, cfg in table_configs(table, seeds, factors, methods, extra, root)]
    tic = time.perf_counter()
    reports = run_pipelines(cfgs)
    return time.perf_counter() - tic, reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="embedded", choices=sorted(TABLES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--imbalance", default=None, help="Comma-separated IFs (default: the table's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    _, methods, factors = TABLES[args.table]
    factors = [int(f) for f in args.imbalance.split(",")] if args.imbalance else list(factors)
    seeds = [int(s) for s in args.seeds.split(",")]
    init_ray()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("own", "shared"):
            wall, reports = run_side(args.table, seeds, factors, list(methods), Path(tmp) / side, side == "shared")
            task = sum(r["ray_task"]["ended"] - r["ray_task"]["started"] for r in reports)
            results[side] = [(r["method"], r["imbalance_factor"], r["seed"], r["stages"], r["final"]) for r in reports]
            rows.append({"table": args.table, "side": side, "runs": len(reports), "seeds": seeds,
                         "stage1_reused": sum("stage1_reused" in r for r in reports),
                         "wall_s": round(wall, 1), "task_s": round(task, 1)})
            print(f"{side}: {len(reports)} runs, {rows[-1]['stage1_reused']} reusing a stage I, wall {wall:.0f} s, "
                  f"task time {task:.0f} s", flush=True)
    own, shared = rows
    shared.update(wall_speedup=round(own["wall_s"] / shared["wall_s"], 3),
                  task_time_ratio=round(shared["task_s"] / own["task_s"], 3),
                  same_numbers=results["own"] == results["shared"])
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    path = write_results("stage1_sharing", rows, command=command, out_dir=args.out, name="stage1_sharing")
    print(f"wall x{shared['wall_speedup']}, task time x{shared['task_time_ratio']}, same numbers: "
          f"{shared['same_numbers']} -> {path}")


if __name__ == "__main__":
    main()
