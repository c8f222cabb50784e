"""`ltd`: parse the command line, load a config, call one function."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from trainer.config import RunConfig, load_config

app = typer.Typer(help="Long-tailed recognition with SSD soft-label distillation.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
log = logging.getLogger("ltd")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TABLES = {  # reproduction tables: config folder, methods, imbalance factors
    "cifar100_lt": ("cifar100_lt", ("ce", "lws", "ssd"), (100, 50, 10)),
    "cifar10_lt": ("cifar10_lt", ("ce", "lws", "ssd"), (100, 50, 10)),
    "embedded": ("embedded", ("ce", "lws", "ssd"), (100,)),
}

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config (see configs/)")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Overrides such as stage1.optim.epochs=5 seed=1")]
RayOpt = Annotated[bool, typer.Option("--ray/--no-ray", help="Run as Ray work (default) or in this process")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: local Ray)")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _load(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(config, overrides or [])
    except (ValueError, FileNotFoundError) as err:
        typer.secho(f"bad config: {err}", fg="red", err=True)
        raise typer.Exit(2) from err


def _run(cfgs: list[RunConfig], use_ray: bool, address: str | None) -> list[dict]:
    if use_ray:
        from trainer.workers import init_ray, run_pipelines

        init_ray(address)
        return run_pipelines(cfgs)
    from trainer.stages import run_pipeline

    return [run_pipeline(cfg) for cfg in cfgs]


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
              address: AddressOpt = None):
    """Run one config over several seeds (in parallel on Ray) and report mean ± std."""
    from trainer.report import aggregate, format_table

    _setup_logging()
    base = _load(config, overrides)
    cfgs = [base.model_copy(update={"seed": int(s), "out_dir": base.out_dir / f"seed{s}"}) for s in seeds.split(",")]
    reports = _run(cfgs, ray, address)
    row = {"method": base.method, "imbalance_factor": base.data.imbalance_factor, **aggregate(reports)}
    (base.out_dir / "summary.json").write_text(json.dumps(row, indent=1))
    typer.echo(format_table([row]))
    typer.echo(f"\nwrote {base.out_dir}/summary.json and one folder per seed")


def table_configs(table: str, seeds: list[int], factors: list[int], methods: list[str], extra: list[str],
                  out_root: Path) -> list[tuple[str, int, RunConfig]]:
    folder = CONFIGS / TABLES[table][0]
    out = []
    for method in methods:
        for factor in factors:
            for seed in seeds:
                run_dir = out_root / table / f"{method}_if{factor}_s{seed}"
                overrides = [f"data.imbalance_factor={factor}", f"seed={seed}", f"out_dir={run_dir}", *extra]
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
):
    """Reproduce a results table (CE / LWS / SSD over imbalance factors) and write bench/results/accuracy_*.json."""
    from trainer.report import aggregate, format_table, write_results

    _setup_logging()
    if table not in TABLES:
        typer.secho(f"unknown table {table!r}; choose one of {', '.join(TABLES)}", fg="red", err=True)
        raise typer.Exit(2)
    _, default_methods, default_factors = TABLES[table]
    method_list = methods.split(",") if methods else list(default_methods)
    factor_list = [int(f) for f in imbalance.split(",")] if imbalance else list(default_factors)
    runs = table_configs(table, [int(s) for s in seeds.split(",")], factor_list, method_list, overrides or [], out_root)
    reports = _run([cfg for _, _, cfg in runs], ray, address)
    rows = []
    for method in method_list:
        for factor in factor_list:
            group = [r for (m, f, _), r in zip(runs, reports) if (m, f) == (method, factor)]
            cfg = next(c for m, f, c in runs if (m, f) == (method, factor))
            epochs = cfg.stage1.optim.epochs
            rows.append({"dataset": f"{group[0]['dataset']}_lt", "imbalance_factor": factor, "method": method,
                         "epochs": epochs, "arch": cfg.model.arch, **aggregate(group)})
    command = "ltd reproduce " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    path = write_results("accuracy", rows, command, results_dir, name=f"accuracy_{table}")
    typer.echo(format_table(rows))
    typer.echo(f"\nwrote {path} and the run folders under {out_root / table}/")


@app.command()
def demo(out_root: Path = Path("runs/demo"), ray: RayOpt = True, address: AddressOpt = None):
    """The main job on the embedded dataset: CE, LWS and SSD side by side (a few minutes on 2 CPU cores)."""
    from trainer.report import format_table

    _setup_logging()
    cfgs = [load_config(CONFIGS / "embedded" / f"{m}.yaml", [f"out_dir={out_root / m}"]) for m in ("ce", "lws", "ssd")]
    reports = _run(cfgs, ray, address)
    typer.echo("\n" + format_table([_row(r) for r in reports]))
    typer.echo(f"\ndataset: {reports[0]['dataset']}-LT, class sizes {reports[0]['class_counts']}")
    for cfg in cfgs:
        typer.echo(f"wrote {cfg.out_dir}/: metrics.json model.pt per_class_accuracy.png label_distributions.png")


if __name__ == "__main__":
    app()
