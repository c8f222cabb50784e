"""`ltd`: parse the command line, load a config, call one function."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from service.cli_jobs import jobs_app, labels_get
from trainer.config import RunConfig, load_config

app = typer.Typer(help="Long-tailed recognition with SSD soft-label distillation.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
log = logging.getLogger("ltd")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_BAND = CONFIGS.parent / "bench" / "results" / "accuracy_embedded_nhwc-cpu.json"  # the demo configs, 10 seeds
TABLES = {  # reproduction tables: config folder, methods, imbalance factors
    "cifar100_lt": ("cifar100_lt", ("ce", "lws", "ssd"), (100, 50, 10)),
    "cifar10_lt": ("cifar10_lt", ("ce", "lws", "ssd"), (100, 50, 10)),
    "embedded": ("embedded", ("ce", "lws", "ssd", "ssd_views", "ssd_online", "ssd_no_ssl"), (100,)),
    # the deck's table (issue 6): re-weighting, the multi-expert methods and SSD side by side
    "cifar10_lt_deck": ("cifar10_lt", ("cb", "ldam_drw", "bbn", "ride", "experts_ta", "ssd"), (100, 50, 10)),
    "cifar100_lt_deck": ("cifar100_lt", ("cb", "ldam_drw", "bbn", "ride", "experts_ta", "ssd"), (100, 50, 10)),
    "embedded_experts": ("embedded", ("cb", "ldam_drw", "eql", "bbn", "ride", "lfme", "experts_ta"), (100,)),
}

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config (see configs/)")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Overrides such as stage1.optim.epochs=5 seed=1")]
RayOpt = Annotated[bool, typer.Option("--ray/--no-ray", help="Run as Ray work (default) or in this process")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: local Ray)")]
PackOpt = Annotated[int, typer.Option("--runs-per-gpu", min=1,
                                      help="Runs training at once in one process on each GPU (threads, one CUDA "
                                           "stream each; ResNet-32 on CIFAR leaves most of a GPU idle)")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _load(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(config, overrides or [])
    except (ValueError, FileNotFoundError) as err:
        typer.secho(f"bad config: {err}", fg="red", err=True)
        raise typer.Exit(2) from err


def _run(cfgs: list[RunConfig], use_ray: bool, address: str | None, runs_per_gpu: int = 1) -> list[dict]:
    """Train `cfgs` on Ray, or in this process one after another; `runs_per_gpu` > 1 trains that many at once in
    one process (trainer/packing.py): on Ray one task per GPU, with --no-ray here. A failed run does not stop the
    rest; the failed ones are named at the end."""
    if not use_ray and any(cfg.distributed.num_workers > 1 for cfg in cfgs):
        typer.secho("bad config: distributed.num_workers > 1 trains on Ray Train; drop --no-ray", fg="red", err=True)
        raise typer.Exit(2)
    from trainer.stages import RunsFailedError

    try:
        if use_ray:
            from trainer.workers import init_ray, run_pipelines

            init_ray(address)
            return run_pipelines(cfgs, runs_per_gpu=runs_per_gpu)
        from trainer.packing import raise_failures, run_packed

        return raise_failures(run_packed(cfgs, runs_per_gpu))
    except RunsFailedError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from err


def _row(report: dict, **extra) -> dict:
    final = report["final"]
    return {"method": report["method"], "imbalance_factor": report["imbalance_factor"],
            **{g: final[g] for g in ("overall", "many", "medium", "few")}, **extra}


@app.command()
def train(overrides: Overrides = None, config: ConfigOpt = None, ray: RayOpt = True, address: AddressOpt = None,
          verbose: bool = False):
    """Train one method (SSD by default) and print its last-epoch many/medium/few accuracy."""
    from trainer.report import format_table

    _setup_logging(verbose)
    cfg = _load(config, overrides)
    report = _run([cfg], ray, address)[0]
    typer.echo(format_table([_row(report)]))
    typer.echo(f"\nwrote {cfg.out_dir}/ (metrics.json, model.pt, config.yaml, per_class_accuracy.png)")


@app.command()
def multiseed(overrides: Overrides = None, config: ConfigOpt = None, seeds: str = "0,1,2", ray: RayOpt = True,
              address: AddressOpt = None, runs_per_gpu: PackOpt = 1):
    """Run one config over several seeds (in parallel on Ray) and report mean ± std."""
    from trainer.report import aggregate, format_table

    _setup_logging()
    base = _load(config, overrides)
    cfgs = [base.model_copy(update={"seed": int(s), "out_dir": base.out_dir / f"seed{s}"}) for s in seeds.split(",")]
    reports = _run(cfgs, ray, address, runs_per_gpu)
    row = {"method": base.method, "imbalance_factor": base.data.imbalance_factor, **aggregate(reports)}
    (base.out_dir / "summary.json").write_text(json.dumps(row, indent=1))
    typer.echo(format_table([row]))
    typer.echo(f"\nwrote {base.out_dir}/summary.json and one folder per seed")


def table_configs(table: str, seeds: list[int], factors: list[int], methods: list[str], extra: list[str],
                  out_root: Path) -> list[tuple[str, int, RunConfig]]:
    """One config per (method, IF, seed); a 'method' here is a config file name, e.g. ssd or ssd_views."""
    folder = CONFIGS / TABLES[table][0]
    out = []
    for method in methods:
        for factor in factors:
            for seed in seeds:
                run_dir = out_root / table / f"{method}_if{factor}_s{seed}"
                # Methods with the same stage I (CE and the decoupled ones; SSD's soft-label modes) train it once.
                overrides = [f"data.imbalance_factor={factor}", f"seed={seed}", f"out_dir={run_dir}",
                             f"stage1_cache={out_root / table / 'stage1_cache'}", *extra]
                out.append((method, factor, load_config(folder / f"{method}.yaml", overrides)))
    return out


@app.command()
def reproduce(
    table: Annotated[str, typer.Argument(help=f"One of {', '.join(TABLES)}")],
    overrides: Overrides = None,
    seeds: str = "0",
    imbalance: Annotated[Optional[str], typer.Option(help="Comma-separated IFs (default: the table's)")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: the table's)")] = None,
    out_root: Path = Path("runs"),
    results_dir: Path = Path("bench/results"),
    ray: RayOpt = True,
    address: AddressOpt = None,
    runs_per_gpu: PackOpt = 1,
):
    """Reproduce a results table (CE / LWS / SSD over imbalance factors) and write bench/results/accuracy_*.json.

    Runs with the same stage I (CE and LWS; SSD's soft-label modes) train it once, in runs/<table>/stage1_cache
    (stage1_cache=null: each run trains its own)."""
    from trainer.report import aggregate, format_table, write_results

    _setup_logging()
    if table not in TABLES:
        typer.secho(f"unknown table {table!r}; choose one of {', '.join(TABLES)}", fg="red", err=True)
        raise typer.Exit(2)
    _, default_methods, default_factors = TABLES[table]
    method_list = methods.split(",") if methods else list(default_methods)
    factor_list = [int(f) for f in imbalance.split(",")] if imbalance else list(default_factors)
    runs = table_configs(table, [int(s) for s in seeds.split(",")], factor_list, method_list, overrides or [], out_root)
    reports = _run([cfg for _, _, cfg in runs], ray, address, runs_per_gpu)
    rows = []
    for method in method_list:
        for factor in factor_list:
            group = [r for (m, f, _), r in zip(runs, reports) if (m, f) == (method, factor)]
            cfg = next(c for m, f, c in runs if (m, f) == (method, factor))
            epochs = cfg.stage1.optim.epochs
            row = {"dataset": f"{group[0]['dataset']}_lt", "imbalance_factor": factor, "method": method,
                   "epochs": epochs, "arch": cfg.model.arch, **aggregate(group)}
            if all("router" in r["stages"] for r in group):  # RIDE: its cost next to its accuracy
                row["experts_used"] = round(sum(r["stages"]["router"]["experts_used"] for r in group) / len(group), 3)
            rows.append(row)
    command = "ltd reproduce " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    path = write_results("accuracy", rows, command, results_dir, name=f"accuracy_{table}")
    typer.echo(format_table(rows))
    typer.echo(f"\nwrote {path} and the run folders under {out_root / table}/")


labels_app = typer.Typer(help="Soft-label sets in the Zarr store: generate, list, show, delete, restore, purge.",
                         no_args_is_help=True)
app.add_typer(labels_app, name="labels")
app.add_typer(jobs_app, name="jobs")
labels_app.command("get")(labels_get)
StoreOpt = Annotated[Path, typer.Option("--store", envvar="LTD_STORE_ROOT", help="Label store root folder")]


@labels_app.command("generate")
def labels_generate(
    labelset_id: Annotated[str, typer.Argument(help="Id of the new labelset, e.g. fmnist-lws-t2")],
    teacher: Annotated[Path, typer.Option(help="Teacher model file (a run's teacher.pt)")],
    overrides: Overrides = None,
    config: ConfigOpt = None,
    store: StoreOpt = Path("store"),
    temperature: Annotated[Optional[float], typer.Option(help="T of the soft labels (default stage3.temperature)")] = None,
    mode: Annotated[Optional[str], typer.Option(help="clean or views (default from stage3.soft_labels)")] = None,
    views: Annotated[Optional[int], typer.Option(help="Views per image in views mode")] = None,
    logits_dtype: str = "float16",
    top_k: Annotated[Optional[int], typer.Option(help="Also store a renormalised top-k sparse form")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray workers (default: one per GPU, else up to 4 CPUs)")] = None,
    chunk_rows: Annotated[Optional[int], typer.Option(help="Images per chunk (default: ~512 KiB of logits)")] = None,
    address: AddressOpt = None,
):
    """Run a teacher over its training set on Ray workers and publish the soft labels into the store."""
    from trainer.workers import WorkerDiedError, generate_labelset, init_ray

    _setup_logging()
    cfg = _load(config, overrides)
    init_ray(address)
    try:
        prov = generate_labelset(teacher, cfg, store, labelset_id, temperature=temperature, mode=mode, views=views,
                                 logits_dtype=logits_dtype, top_k=top_k, num_workers=workers, chunk_rows=chunk_rows)
    except (WorkerDiedError, ValueError, FileExistsError) as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"published {prov.labelset_id}: {prov.num_images} images x {prov.num_classes} classes, "
               f"T={prov.temperature}, mode={prov.mode}, at {store / prov.labelset_id}")


@labels_app.command("list")
def labels_list(store: StoreOpt = Path("store"),
                deleted: Annotated[bool, typer.Option("--deleted", help="List the trash instead")] = False):
    """Published labelsets in the store (with --deleted: those in its trash, still restorable)."""
    from store import list_labelsets, list_trash

    for item in list_trash(store) if deleted else list_labelsets(store):
        typer.echo(json.dumps(item.model_dump(mode="json")))


@labels_app.command("show")
def labels_show(labelset_id: str, store: StoreOpt = Path("store")):
    """A labelset's provenance (teacher hash, dataset fingerprint, temperature, mode, counts) and what its soft labels
    carry (`content`: per shot group and teacher right/wrong, max-probability, entropy, mass off the hard label)."""
    from store import StoreError, describe

    try:
        prov = describe(store, labelset_id)
    except (StoreError, FileNotFoundError) as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from err
    typer.echo(json.dumps(prov.model_dump(mode="json", exclude={"checksums", "config"}), indent=1))


@labels_app.command("delete")
def labels_delete(labelset_id: str, store: StoreOpt = Path("store"),
                  days: Annotated[float, typer.Option(help="Days it stays restorable (env LTD_TRASH_DAYS)",
                                                      envvar="LTD_TRASH_DAYS")] = 7.0):
    """Move a published labelset into the store's trash: readers stop seeing it at once, `restore` brings it back."""
    from store import StoreError, delete

    try:
        entry = delete(store, labelset_id, retention_days=days)
    except (StoreError, FileNotFoundError) as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"moved {labelset_id} to the trash until {entry.purge_after:%Y-%m-%d %H:%M} UTC; "
               f"undo: ltd labels restore {labelset_id} --store {store}")


@labels_app.command("restore")
def labels_restore(labelset_id: str, store: StoreOpt = Path("store")):
    """Bring back the most recently deleted copy of a labelset from the trash."""
    from store import StoreError, restore

    try:
        restore(store, labelset_id)
    except (StoreError, FileNotFoundError) as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"restored {labelset_id}")


@labels_app.command("purge")
def labels_purge(store: StoreOpt = Path("store"),
                 everything: Annotated[bool, typer.Option("--all", help="Erase the whole trash, due or not")] = False):
    """Erase trashed labelsets past their retention (or all with --all): this cannot be undone."""
    from store import purge

    gone = purge(store, everything=everything)
    typer.echo(f"erased {len(gone)} trashed labelset(s)" + "".join(f"\n  {e.trash_id}" for e in gone))


data_app = typer.Typer(help="Your own images (data.name=folder): inspect a dataset before training on it.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    source: Annotated[Path, typer.Argument(help="A run config (YAML) or an ImageFolder-layout folder: root with "
                                                "train/ and val/ (or test/), or one split folder")],
    out: Annotated[Path, typer.Option("--out", help="PNG of the sorted class-size curve (log scale)")] = Path(
        "class_sizes.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of lines")] = False,
):
    """Classes, images, many/medium/few class counts, image sizes (from headers) and unreadable files of a dataset,
    with its class-size curve as a PNG; reads headers only (well under a minute for 100k files)."""
    from trainer.data_inspect import format_inspection, inspect_source

    try:
        summary = inspect_source(source, out)
    except (ValueError, FileNotFoundError) as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from err
    typer.echo(json.dumps(summary, indent=1) if as_json else format_inspection(summary))


@app.command()
def distill(
    labelset: Annotated[str, typer.Option(help="Labelset id to learn from")],
    overrides: Overrides = None,
    config: ConfigOpt = None,
    store: StoreOpt = Path("store"),
    address: AddressOpt = None,
):
    """SSD stages III-IV from a stored labelset: the student streams hard and soft targets from the store.

    With distributed.num_workers > 1 the student trains on Ray Train, each worker reading its share of the rows.
    """
    from store import LabelsetReader, StoreError
    from trainer.report import format_table
    from trainer.stages import run_pipeline

    _setup_logging()
    cfg = _load(config, ["method=ssd", *(overrides or [])])
    try:
        reader = LabelsetReader(store, labelset)
    except (StoreError, FileNotFoundError) as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from err
    cfg = cfg.model_copy(update={"stage3": cfg.stage3.model_copy(update={"temperature": reader.temperature})})
    if cfg.distributed.num_workers > 1:
        from trainer.workers import init_ray, train_distributed

        init_ray(address)
        report = train_distributed(cfg, labelset=(str(store), labelset))
    else:
        report = run_pipeline(cfg, source=reader)
    typer.echo(format_table([_row(report)]))
    typer.echo(f"\nlearned from labelset {labelset}; wrote {cfg.out_dir}/")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    store: Annotated[Optional[Path], typer.Option("--store", help="Label store root (env LTD_STORE_ROOT)")] = None,
    runs: Annotated[Optional[Path], typer.Option("--runs", help="Runs root: job outputs, served models "
                                                                 "(env LTD_RUNS_ROOT)")] = None,
    address: AddressOpt = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Leave mutating endpoints open: throwaway local use, "
                                                             "loopback binds only")] = False,
):
    """Serve labelsets, jobs and models over HTTP (docs at /docs).

    Mutating endpoints always need X-API-Key: LTD_API_KEY, or else a token generated at the first start and kept in
    ~/.config/ltd/token (LTD_TOKEN_FILE), mode 0600, reused on restart."""
    import uvicorn

    from service.auth import is_loopback, with_key
    from service.settings import Settings

    _setup_logging()
    # the app factory reads LTD_* settings from the environment: options given here win over it
    for var, value in (("LTD_STORE_ROOT", store), ("LTD_RUNS_ROOT", runs), ("LTD_RAY_ADDRESS", address),
                       ("LTD_NO_AUTH", "true" if no_auth else None)):
        if value is not None:
            os.environ[var] = str(value)
    settings = Settings()
    if settings.no_auth and not is_loopback(host):
        typer.secho(f"refusing to serve {host} without a key: --no-auth (LTD_NO_AUTH) is for loopback binds only; "
                    "drop it (a token is generated) or set LTD_API_KEY", fg="red", err=True)
        raise typer.Exit(2)
    settings = with_key(settings)  # makes the token file now, so the lines below can point at it
    typer.echo(f"serving {settings.store_root}/ and {settings.runs_root}/ at http://{host}:{port} (docs: /docs); try:")
    for line in example_requests(f"http://{host}:{port}", settings):
        typer.echo("  " + line)
    typer.echo(_key_hint(settings))
    uvicorn.run("service.app:create_app", factory=True, host=host, port=port, log_level=log_level)


def _key_hint(settings) -> str:
    if settings.no_auth:
        return "WARNING: --no-auth: jobs, deletes and uploads are open to anyone who can reach this port"
    return f"mutating requests (jobs, deletes, uploads) need -H \"X-API-Key: {_key_ref(settings)}\""


def _key_ref(settings) -> str:
    """How a shell line refers to the key without printing it: the variable, or the token file."""
    return "$LTD_API_KEY" if os.environ.get("LTD_API_KEY") else f"$(cat {settings.token_file})"


def example_requests(base_url: str, settings, labelset_id: str | None = None, model_id: str | None = None,
                     image: Path | None = None) -> list[str]:
    """curl lines that work as printed against `ltd serve` (defaults: the first labelset and student found)."""
    from service.inference import ModelRegistry
    from store import list_labelsets

    if labelset_id is None:
        labelset_id = next((s.labelset_id for s in list_labelsets(settings.store_root)), None)
    if model_id is None:
        models = ModelRegistry(settings.runs_root).list()
        model_id = next((m.model_id for m in sorted(models, key=lambda m: m.spec.role != "student")), None)
    # the key is referred to by its variable, never printed
    key = f" -H \"X-API-Key: {_key_ref(settings)}\"" if settings.read_key_required and settings.api_key else ""
    lines = [f"curl -s{key} {base_url}/v1/labelsets", f"curl -s{key} {base_url}/v1/models"]
    if labelset_id:
        lines += [f"curl -s{key} '{base_url}/v1/labelsets/{labelset_id}/labels/0?top_k=3'",
                  f"curl -s{key} -X POST {base_url}/v1/labelsets/{labelset_id}/labels:batch "
                  "-H 'Content-Type: application/json' -d '{\"image_ids\": [0, 1, 2], \"temperature\": 4}'"]
    if model_id and image:
        lines.append(f"curl -s{key} -X POST '{base_url}/v1/models/{model_id}:predict?top_k=3' -F files=@{image}")
    return lines


@app.command()
def demo(
    out_root: Path = Path("runs/demo"),
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="End by serving what was trained")] = True,
    port: int = 8000,
    ray: RayOpt = True,
    address: AddressOpt = None,
):
    """The main job on the embedded dataset: CE, LWS and SSD side by side (a few minutes on 2 CPU cores), then the
    SSD teacher's soft labels published to a store and served with the student on 127.0.0.1."""
    from store import LabelsetReader, StoreError
    from trainer.datasets import load_dataset
    from trainer.report import band_lines, format_table, reference_band
    from trainer.workers import generate_labelset, init_ray

    _setup_logging()
    # LWS starts from CE's stage I (same recipe), so it waits for CE and then trains only its classifier.
    shared = f"stage1_cache={out_root / 'stage1_cache'}"
    cfgs = [load_config(CONFIGS / "embedded" / f"{m}.yaml", [f"out_dir={out_root / m}", shared])
            for m in ("ce", "lws", "ssd")]
    reports = _run(cfgs, ray, address)
    rows = [_row(r) for r in reports]
    typer.echo("\n" + format_table(rows))
    if DEMO_BAND.exists():  # one seed against the 10-seed spread of the same configs
        typer.echo(f"\nthis run against the reference band ({DEMO_BAND.relative_to(CONFIGS.parent)}, mean ± 2 std):")
        for line in band_lines(rows, reference_band(DEMO_BAND)):
            typer.echo("  " + line)
    typer.echo(f"\ndataset: {reports[0]['dataset']}-LT, class sizes {reports[0]['class_counts']}")
    for cfg in cfgs:
        typer.echo(f"wrote {cfg.out_dir}/: metrics.json model.pt per_class_accuracy.png label_distributions.png")

    ssd, store_root, labelset_id = cfgs[-1], out_root / "store", "demo-ssd-t2"
    try:
        LabelsetReader(store_root, labelset_id)
    except (StoreError, FileNotFoundError):
        init_ray(address)
        generate_labelset(ssd.out_dir / "teacher.pt", ssd, store_root, labelset_id)
    typer.echo(f"wrote {store_root / labelset_id}/: the SSD teacher's soft labels (T={ssd.stage3.temperature})")
    image = out_root / "example.png"
    _save_test_image(load_dataset(ssd.data), image)
    if not serve_after:
        return
    os.environ.update(LTD_STORE_ROOT=str(store_root), LTD_RUNS_ROOT=str(out_root))
    from service.settings import Settings

    base = f"http://127.0.0.1:{port}"
    typer.echo(f"\nserving at {base} (docs: {base}/docs); Ctrl-C stops. Try:")
    from service.auth import with_key

    settings = with_key(Settings())
    for line in example_requests(base, settings, labelset_id=labelset_id, model_id="ssd", image=image):
        typer.echo("  " + line)
    typer.echo(_key_hint(settings))
    import uvicorn

    uvicorn.run("service.app:create_app", factory=True, host="127.0.0.1", port=port, log_level="warning")


def _save_test_image(data, path: Path) -> None:
    """A real test image as PNG, so the printed predict request works as printed."""
    from PIL import Image

    pixels = data.test.images[0].permute(1, 2, 0).numpy()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


if __name__ == "__main__":
    app()
