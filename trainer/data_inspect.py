"""`ltd data inspect`: what a dataset holds before training on it, read from image headers only.

Class count, images, many/medium/few class counts (store.content.shot_groups), an image-size summary, the files a
scan skips (trainer/folder.py), and the sorted class-size curve as a PNG with a log y-axis (trainer/plots.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.folder import scan_split

def inspect_source(source: Path, out_png: Path, threads: int | None = None) -> dict:
    """`ltd data inspect`: what a folder (root with train/, or one split folder) or a run config's data holds.

    Class count, images, many/medium/few class counts (store.content.shot_groups), image sizes from the headers,
    the skipped files, and the sorted class-size curve written to `out_png` (log y-axis).
    """
    source = Path(source)
    if source.is_file():
        from trainer.config import load_config

        data_cfg = load_config(source).data
        if data_cfg.name != "folder":
            return _inspect_loaded(data_cfg, out_png)
        if data_cfg.root is None:
            raise ValueError(f"{source}: data.name=folder needs data.root")
        source = Path(data_cfg.root)
    if not source.is_dir():
        raise ValueError(f"{source} is neither a config file nor a folder")
    train_dir = source / "train" if (source / "train").is_dir() else source
    train = scan_split(train_dir, threads=threads)
    evals = {}
    if train_dir != source:
        for name in ("val", "test"):
            if (source / name).is_dir():
                evals[name] = scan_split(source / name, {n: i for i, n in enumerate(train.class_names)}, threads)
    counts = train.usable_counts()
    usable = train.usable
    summary = _summary(str(train_dir), train.class_names, counts, out_png)
    summary["files"] = len(train.files)
    summary["sizes"] = _size_summary(train.sizes[usable])
    summary["empty_classes"] = [train.class_names[i] for i in np.flatnonzero(counts == 0).tolist()]
    summary["eval_splits"] = {name: {"images": int(scan.usable.sum()), "classes": int((scan.usable_counts() > 0).sum())}
                              for name, scan in evals.items()}
    summary["skipped"] = train.skipped("train") + [r for n, s in evals.items() for r in s.skipped(n)]
    return summary


def _inspect_loaded(data_cfg, out_png: Path) -> dict:
    """A built-in dataset (CIFAR, Fashion-MNIST, list files): counts after the configured LT split."""
    from trainer.datasets import load_dataset

    data = load_dataset(data_cfg.model_copy(update={"cache_size": None}))  # counting needs no decoded cache
    summary = _summary(data.name, data.class_names, data.class_counts, out_png)
    summary["files"] = len(data.train)
    if data.in_memory:
        h, w = data.train.images.shape[-2:]
        summary["sizes"] = _size_summary(np.array([[w, h]] * len(data.train)))
    summary["empty_classes"] = [data.class_names[i] for i in np.flatnonzero(data.class_counts == 0).tolist()]
    summary["eval_splits"] = {"test": {"images": len(data.test), "classes": int(len(np.unique(data.test.labels)))}}
    summary["skipped"] = list(data.skipped)
    return summary


def _summary(source: str, class_names: list[str], counts: np.ndarray, out_png: Path) -> dict:
    from store.content import FEW_SHOT, MANY_SHOT, shot_groups
    from trainer.plots import plot_class_sizes

    counts = np.asarray(counts)
    groups = shot_groups(counts)
    nonzero = counts[counts > 0]
    order = np.argsort(-counts, kind="stable")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    plot_class_sizes(counts[order], out_png, title=f"{source}: {len(counts)} classes, {int(counts.sum())} images")
    return {
        "source": source, "classes": len(class_names), "images": int(counts.sum()),
        "shot_groups": {name: int(len(idx)) for name, idx in groups.items()},
        "shot_rule": f"many > {MANY_SHOT}, medium {FEW_SHOT}..{MANY_SHOT}, few < {FEW_SHOT} training images",
        "largest": {"class": class_names[int(order[0])], "images": int(counts[order[0]])} if len(counts) else None,
        "smallest": {"class": class_names[int(order[-1])], "images": int(counts[order[-1]])} if len(counts) else None,
        "imbalance_ratio": round(float(nonzero.max() / nonzero.min()), 2) if len(nonzero) else None,
        "plot": str(out_png),
    }


def _size_summary(sizes: np.ndarray) -> dict | None:
    if not len(sizes):
        return None
    sizes = np.asarray(sizes)
    short = sizes.min(axis=1)

    def q(values: np.ndarray) -> dict:
        p = np.percentile(values, [0, 5, 50, 95, 100]).round().astype(int).tolist()
        return dict(zip(("min", "p5", "median", "p95", "max"), p))

    distinct, freq = np.unique(sizes, axis=0, return_counts=True)
    top = np.argsort(-freq, kind="stable")[:3]
    return {"width": q(sizes[:, 0]), "height": q(sizes[:, 1]), "shorter_side": q(short),
            "most_common": [{"size": f"{int(distinct[i][0])}x{int(distinct[i][1])}", "images": int(freq[i])}
                            for i in top]}


def format_inspection(summary: dict, max_skipped: int = 20) -> str:
    """The lines `ltd data inspect` prints."""
    g = summary["shot_groups"]
    lines = [f"source: {summary['source']}",
             f"classes: {summary['classes']}",
             f"images: {summary['images']} usable of {summary['files']} files, {len(summary['skipped'])} skipped",
             f"many/medium/few classes: {g['many']}/{g['medium']}/{g['few']} ({summary['shot_rule']})"]
    if summary["largest"]:
        lines.append(f"largest class: {summary['largest']['class']} ({summary['largest']['images']} images), "
                     f"smallest: {summary['smallest']['class']} ({summary['smallest']['images']}), "
                     f"imbalance ratio {summary['imbalance_ratio']}")
    sizes = summary.get("sizes")
    if sizes:
        def fmt(q: dict) -> str:
            return f"min {q['min']} / p5 {q['p5']} / median {q['median']} / p95 {q['p95']} / max {q['max']}"

        common = ", ".join(f"{c['size']} ({c['images']})" for c in sizes["most_common"])
        lines += [f"image width:  {fmt(sizes['width'])}", f"image height: {fmt(sizes['height'])}",
                  f"shorter side: {fmt(sizes['shorter_side'])}", f"most common sizes: {common}"]
    for name, split in summary["eval_splits"].items():
        lines.append(f"{name} split: {split['images']} images in {split['classes']} classes")
    if summary["empty_classes"]:
        lines.append(f"classes without a usable image: {', '.join(summary['empty_classes'][:20])}")
    if summary["skipped"]:
        lines.append(f"skipped files ({len(summary['skipped'])}):")
        lines += [f"  {r['split']}/{r['path']}: {r['reason']}" for r in summary["skipped"][:max_skipped]]
        if len(summary["skipped"]) > max_skipped:
            lines.append(f"  ... and {len(summary['skipped']) - max_skipped} more")
    lines.append(f"class-size curve: {summary['plot']}")
    return "\n".join(lines)
