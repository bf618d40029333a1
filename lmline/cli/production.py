"""Production commands (docs/production.md): `lmline deploy` and `lmline data add`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flows import deploy as deployment
from lmline import config, data
from lmline.cli.root import ParamsOpt, SetOpt, app


@app.command()
def deploy(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Create the work pools if missing and register prefect.yaml's deployments (needs PREFECT_API_URL)."""
    cfg = config.load(params, set_)
    typer.echo(json.dumps(deployment.deploy(cfg, Path.cwd()), indent=2))


data_app = typer.Typer(no_args_is_help=True, help="Add data to a source: DVC-tracked, announced to Prefect.")
app.add_typer(data_app, name="data")


@data_app.command("add")
def data_add(
    path: Annotated[Path, typer.Argument(help="a file (or a directory of text files) with the new data")],
    source: Annotated[str, typer.Option("--source", "-s", help="the ingest source it belongs to")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Add PATH to a source under corpus/, `dvc add` it, and emit lmline.data.updated (starts a retrain).
    All or nothing: a failing step puts everything back; re-running adds nothing twice."""
    cfg = config.load(params, None)
    result = data.add(cfg, Path.cwd(), path, source)
    typer.echo(json.dumps(result, indent=2))
    if not result["event"]:
        typer.echo("note: PREFECT_API_URL is not set, so no lmline.data.updated event was sent", err=True)
