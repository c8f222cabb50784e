"""Service jobs that share stage Is, with and without the runner holding back the jobs that would only wait.

The same six train jobs (CE, LWS, cRT for two seeds, posted in that order: two stage-I recipes) go to the service
with two job slots on local Ray (`jobs_per_device=2`), once per side, in one process:
- "in_task" (the baseline): every job goes to Ray at once; one of a recipe trains its stage I, the others wait for
  it on the recipe's lock inside their tasks, holding a slot (what the service did before it held jobs back).
- "held" (ours): a job whose stage I another job is about to train stays queued in the service until it is
  published, so the second recipe's CE job takes the free slot.
Reports the makespan (first post to last end), the summed time jobs held a slot, and whether every job's numbers
came out the same. Writes bench/results/job_scheduling-<device>.json.

    python bench/job_scheduling.py      # Fashion-MNIST-LT (embedded recipe, 30 stage-I epochs): ~5 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

import service.runner
from service.app import create_app
from service.settings import Settings
from trainer.report import write_results
from trainer.workers import init_ray

METHODS = ("ce", "lws", "crt")


def _post(client: TestClient, body: dict) -> str:
    response = client.post("/v1/jobs", json=body)
    if response.status_code != 201:
        raise SystemExit(f"the service refused a job: {response.status_code} {response.text}")
    return response.json()["id"]


def run_side(side: str, bodies: list[dict], root: Path) -> tuple[float, list[dict]]:
    """(makespan seconds, finished job records) of one side, through the service's own HTTP API."""
    recipe_key = service.runner.stage1_recipe_key
    if side == "in_task":  # no job has a recipe key, so none is held back: each waits in its task, as before
        service.runner.stage1_recipe_key = lambda job: None
    try:
        settings = Settings(store_root=root / "store", runs_root=root / "runs", jobs_per_device=2)
        with TestClient(create_app(settings)) as client:
            tic = time.time()
            ids = [_post(client, body) for body in bodies]
            jobs = []
            for job_id in ids:
                while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
                    time.sleep(0.5)
                jobs.append(job)
        finished = max(datetime.fromisoformat(job["finished"]).timestamp() for job in jobs)
        return finished - tic, jobs
    finally:
        service.runner.stage1_recipe_key = recipe_key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/embedded/ce.yaml")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--stage1-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    base = yaml.safe_load(Path(args.config).read_text())  # as a client would send it: the method fills the rest
    base.setdefault("stage1", {})["optim"] = {"epochs": args.stage1_epochs, "warmup_epochs": 0}
    bodies = [{"kind": "train", "config": {**base, "method": method, "seed": int(seed)}}
              for seed in args.seeds.split(",") for method in METHODS]
    init_ray()
    rows, numbers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("in_task", "held"):
            makespan, jobs = run_side(side, bodies, Path(tmp) / side)
            states = [job["state"] for job in jobs]
            slot_s = sum(datetime.fromisoformat(j["finished"]).timestamp()
                         - datetime.fromisoformat(j["started"]).timestamp() for j in jobs if j["started"])
            numbers[side] = [{k: v for k, v in (job["metrics"] or {}).items() if k != "stage1_reused"} for job in jobs]
            rows.append({"side": side, "jobs": len(jobs), "all_succeeded": set(states) == {"succeeded"},
                         "stage1_reused": sum(bool((job["metrics"] or {}).get("stage1_reused")) for job in jobs),
                         "makespan_s": round(makespan, 1), "slot_s": round(slot_s, 1),
                         "order": [f"{job['request']['config']['method']}{job['request']['config']['seed']}"
                                   for job in sorted(jobs, key=lambda j: j["started"] or "")]})
            print(f"{side}: makespan {makespan:.0f} s, slots held {slot_s:.0f} s, states {states}", flush=True)
    in_task, held = rows
    held.update(makespan_speedup=round(in_task["makespan_s"] / held["makespan_s"], 3),
                slot_time_ratio=round(held["slot_s"] / in_task["slot_s"], 3),
                same_numbers=numbers["in_task"] == numbers["held"])
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    path = write_results("job_scheduling", rows, command=command, out_dir=args.out,
                         extra={"workload": {"config": args.config, "methods": list(METHODS), "seeds": args.seeds,
                                             "stage1_epochs": args.stage1_epochs, "jobs_per_device": 2}})
    print(f"makespan x{held['makespan_speedup']}, slot time x{held['slot_time_ratio']}, same numbers: "
          f"{held['same_numbers']} -> {path}")


if __name__ == "__main__":
    main()
