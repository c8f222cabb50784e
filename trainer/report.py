"""Results: multi-seed aggregation (mean ± std), the text table, and bench/results JSON in the one format."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

GROUPS = ("overall", "many", "medium", "few")


def aggregate(reports: list[dict], stage: str = "final") -> dict:
    """Mean and std over seeds of one method's last-epoch accuracies; a group empty in any seed stays None."""
    row: dict = {"seeds": [r["seed"] for r in reports]}
    for group in GROUPS:
        values = [r[stage][group] if stage == "final" else r["stages"][stage][group] for r in reports]
        if any(v is None for v in values):
            row[group], row[f"{group}_std"] = None, None
        else:
            row[group] = round(float(np.mean(values)), 2)
            row[f"{group}_std"] = round(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 2)
    return row


def reference_band(path: Path) -> dict[str, dict]:
    """{method: row} of a multi-seed results file: where a single run of the same recipe should land."""
    return {row["method"]: row for row in json.loads(Path(path).read_text())["rows"] if row.get("overall_std")}


def band_lines(rows: list[dict], band: dict[str, dict], width: float = 2.0) -> list[str]:
    """One line per run: its overall accuracy beside the reference mean ± std, and whether it lies within
    mean ± width·std (2: where about 95 % of seeds fall, so one seed outside it is worth a look)."""
    lines = []
    for row in rows:
        ref = band.get(row["method"])
        if ref is None:
            continue
        low, high = ref["overall"] - width * ref["overall_std"], ref["overall"] + width * ref["overall_std"]
        verdict = "inside" if low <= row["overall"] <= high else "OUTSIDE"
        lines.append(f"{row['method']:<6} {row['overall']:6.2f}   reference {ref['overall']:.2f} ± "
                     f"{ref['overall_std']:.2f} over {len(ref['seeds'])} seeds: {verdict} [{low:.1f}, {high:.1f}]")
    return lines


def format_table(rows: list[dict], keys=("method", "imbalance_factor")) -> str:
    """Fixed-width text table: one line per row, 'mean ± std' per group, '-' for an empty group."""

    def cell(row, group):
        if row.get(group) is None:
            return "-"
        std = row.get(f"{group}_std")
        return f"{row[group]:.2f}" + (f" ± {std:.2f}" if std else "")

    head = [*keys, *GROUPS]
    lines = [[str(r.get(k, "")) for k in keys] + [cell(r, g) for g in GROUPS] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__, "python": sys.version.split()[0]}


def device_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return next((tag for tag in ("h200", "h100", "a100", "l4", "t4") if tag in name), "gpu")


def git_commit() -> str:
    """HEAD's short hash; LTD_GIT_COMMIT where the tree travelled without its .git (a lent GPU host)."""
    if os.environ.get("LTD_GIT_COMMIT"):
        return os.environ["LTD_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_results(benchmark: str, rows: list[dict], command: str, out_dir: Path = Path("bench/results"),
                  name: str | None = None, extra: dict | None = None) -> Path:
    """bench/results/<benchmark>-<device>.json as ../shared/BENCHMARKS.md describes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or benchmark}-{device_tag()}.json"
    doc = {"benchmark": benchmark, "date": datetime.date.today().isoformat(), "git_commit": git_commit(),
           "machine": machine_info(), "command": command, **(extra or {}), "rows": rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
