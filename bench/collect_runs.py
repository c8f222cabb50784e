"""What a folder of training runs holds, finished or stopped, as one small JSON: a short lease brings back only that.

    python bench/collect_runs.py RUNS_DIR OUT.json

Per run: the config, `metrics.json` where the run finished, and for every stage whose
checkpoint exists, its epoch records (loss parts, learning rate, img/s, CUDA-graph replays), so a run stopped
mid-stage still shows how far it got and how fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from trainer.checkpoint import load_checkpoint


def collect_run(run: Path) -> dict:
    config = run / "config.yaml"
    out: dict = {"config": yaml.safe_load(config.read_text()) if config.exists() else None}
    if (run / "metrics.json").exists():
        out["metrics"] = json.loads((run / "metrics.json").read_text())
    checkpoints = sorted(run.glob("stage*/checkpoint.pt"))
    out["history"] = {ckpt.parent.name: load_checkpoint(ckpt)["history"] for ckpt in checkpoints}
    return out


def main(runs_dir: str, out: str) -> None:
    runs = {run.name: collect_run(run) for run in sorted(Path(runs_dir).iterdir()) if run.is_dir()}
    Path(out).write_text(json.dumps(runs, indent=1))
    for name, run in runs.items():
        epochs = {stage: len(history) for stage, history in run["history"].items()}
        final = run.get("metrics", {}).get("final", {}).get("overall")
        print(f"{name}: epochs {epochs}, final {final}")


if __name__ == "__main__":
    main(*sys.argv[1:])
