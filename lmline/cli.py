"""The `lmline` command. Thin: it loads params, calls the stage's run(), and hands results to tracking.

`lmline stage NAME` is what dvc.yaml's `cmd` runs; the Prefect flow runs the DVC stages, so every
path into a stage goes through `run_stage` below.
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import lmline  # noqa: F401  (sets the offline switches before any library import)
from lmline import config
from lmline.errors import LmlineError
from lmline.io import write_json

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and ship small language models.")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override, e.g. pretrain.lr=1e-3")]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def load_params(params: Path, overrides: list[str] | None) -> config.Params:
    try:
        return config.load(params, overrides)
    except LmlineError as exc:
        fail(str(exc))


def run_stage(name: str, params: config.Params, root: Path | None = None) -> dict:
    """Run one stage's run() with tracking around it; write metrics/<stage>.json; return metrics."""
    from lmline import tracking

    module = importlib.import_module(f"tasks.{name}")
    inputs, outputs = config.stage_io(params, name)
    with tracking.stage_run(name, params, root) as tracked:
        started = time.perf_counter()
        metrics = module.run(params, inputs, outputs)
        metrics["stage_seconds"] = round(time.perf_counter() - started, 3)
        # Which MLflow run produced these numbers: a later cached run of the stage links back to it.
        metrics["mlflow_run_id"] = tracked.run_id
        write_json(config.metrics_path(params, name), metrics)
        tracked.log_metrics(metrics)
        tracked.log_artifact(config.metrics_path(params, name), "metrics")
        for key, path in outputs.items():
            # small outputs go to MLflow as artifacts; big data and models are DVC's job
            if path.is_file() and path.stat().st_size < 5_000_000:
                tracked.log_artifact(path, key)
        tracked.log_stage_outputs(name, params, inputs, outputs, metrics)
    return metrics


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="warnings and errors only")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(config.STAGES)}")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one pipeline stage (what dvc.yaml's cmd calls)."""
    if name not in config.STAGES:
        fail(f"unknown stage {name!r} (stages: {', '.join(config.STAGES)})")
    cfg = load_params(params, set_)
    try:
        metrics = run_stage(name, cfg)
    except LmlineError as exc:
        fail(str(exc))
    typer.echo(json.dumps({name: metrics}, indent=2, sort_keys=True))


@app.command()
def sources(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """List the configured sources with their sizes."""
    from tasks import ingest

    cfg = load_params(params, set_)
    try:
        rows = ingest.describe_sources(cfg)
    except LmlineError as exc:
        fail(str(exc))
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['type']:<10} {r['role']:<8} {r['size']:>12}  {r['where']}")


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run the whole pipeline on the configured data (DVC skips what is up to date)."""
    import subprocess

    load_params(params, set_)  # fail on bad params before any stage runs
    if set_:
        fail("--set is not supported by `lmline run` yet: edit params.yaml")
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"])
    if proc.returncode:
        raise typer.Exit(proc.returncode)


if __name__ == "__main__":
    app()
