"""Earlier SSD-vs-LWS measurements as rows of bench/results/ssd_vs_teacher-cpu.json, each naming its source.

Their per-seed LWS numbers were not kept, so per_seed_diff is null and diff_std is the spread of the means' seeds.
Run once after bench/ssd_vs_teacher.py; re-running replaces these rows.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path("bench/results")


def _rows(source: str) -> dict:
    return {r["method"]: r for r in json.loads((RESULTS / source).read_text())["rows"]}


def earlier_rows() -> list[dict]:
    out = []
    cpu30 = _rows("accuracy_cifar10_lt_30ep-cpu.json")
    for method, variant in (("ssd", "moco_weight_1.0_step30"), ("ssd_moco03", "moco_weight_0.3_step30")):
        lws, ssd = cpu30["lws"], cpu30[method]
        out.append(_row("cifar10_lt", 30, variant, lws, ssd, "accuracy_cifar10_lt_30ep-cpu.json",
                        "stages I/III 30 epochs, step schedule, warm-up 1; SSD's own stage I (CE + MoCo) -> LWS teacher"))
    for source, tag in (("accuracy_embedded-cpu.json", "nchw"), ("accuracy_embedded_nhwc-cpu.json", "nhwc")):
        rows = _rows(source)
        out.append(_row("fashion_mnist_lt", 30, f"embedded_default_{tag}", rows["lws"], rows["ssd"], source,
                        "configs/embedded/ssd.yaml (MoCo 0.3): the Fashion-MNIST-LT default, unchanged by issue 19"))
        out[-1]["default"] = tag == "nhwc"  # channels_last is the default layout since that table
    return out


def _row(dataset, epochs, variant, lws, ssd, source, note) -> dict:
    row = {"dataset": dataset, "imbalance_factor": 100, "epochs": epochs, "variant": variant, "seeds": ssd["seeds"],
           "default": False}
    for name, r in (("lws", lws), ("ssd", ssd)):
        for group in ("overall", "many", "medium", "few"):
            row[f"{name}_{group}"] = r[group]
    row.update(diff_mean=round(ssd["overall"] - lws["overall"], 2), diff_std=None, per_seed_diff=None,
               source=source, note=note)
    return row


def main() -> None:
    path = RESULTS / "ssd_vs_teacher-cpu.json"
    doc = json.loads(path.read_text())
    mine = {r["variant"] for r in earlier_rows()}
    doc["rows"] = [r for r in doc["rows"] if r["variant"] not in mine] + earlier_rows()
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"added {len(mine)} earlier rows to {path}")


if __name__ == "__main__":
    main()
