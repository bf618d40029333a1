"""Pipeline commands: `lmline stage` (what dvc.yaml's cmd runs), `lmline sources`, `lmline run`.

Prefect is imported inside `run` alone: it adds about a second to every `lmline` call, --help included.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmline import config, guard, progress, stage_process, temporary_prefect
from lmline.cli.root import ParamsOpt, SetOpt, app
from lmline.cli.summary import print_summary
from lmline.errors import LmlineError
from lmline.stages import NAMES
from lmline.tracking import store
from tasks import ingest


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(NAMES)}")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one pipeline stage (what dvc.yaml's cmd calls)."""
    if name not in NAMES:
        raise LmlineError(f"unknown stage {name!r} (stages: {', '.join(NAMES)})")
    cfg = config.load(params, set_)
    devices = getattr(cfg.section(name), "devices", 1)
    if devices > 1 and "WORLD_SIZE" not in os.environ:
        code = stage_process.launch_distributed(name, devices, params, set_)
        if code:
            raise typer.Exit(code)
        return
    metrics = stage_process.run_dvc_stage(name, cfg)
    if stage_process.is_rank_zero():  # one result, not one per process
        typer.echo(json.dumps({name: metrics}, indent=2, sort_keys=True))


@app.command()
def sources(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """List the configured sources with their sizes."""
    cfg = config.load(params, set_)
    rows = ingest.describe_sources(cfg.ingest)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['type']:<10} {r['role']:<8} {r['size']:>12}  {r['where']}")


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    stages: Annotated[Optional[list[str]], typer.Option("--stage", help="run only these stages")] = None,
    force: Annotated[bool, typer.Option(help="re-run stages even if DVC has them cached")] = False,
    promote: Annotated[bool, typer.Option(help="promote the candidate if it beats the champion")] = True,
) -> None:
    """Run the pipeline as the Prefect `retrain` flow (ephemeral Prefect unless PREFECT_API_URL is set)."""
    config.load(params, set_)  # fail on bad params before Prefect or any stage starts
    guard.watch_children()  # Prefect's temporary server, dvc and the stages die with this process
    if progress.stream() is sys.stderr:
        os.environ[progress.TTY_ENV] = "1"  # stage output goes to Prefect's logs: stages draw bars on the terminal
    # Unreachable servers fail here, in one line each, within PROBE_TIMEOUT_S: Prefect's and
    # MLflow's clients would retry for minutes and end in a traceback.
    check_prefect_api()
    store.check_server()
    # boots in its own process while this one imports what the flow needs (the `lmline` script launched it
    # before the CLI's imports when it saw `run`)
    server = temporary_prefect.take_early() or temporary_prefect.TemporaryPrefect.launch()
    import dvc.repo  # noqa: F401  (the flow's `dvc status`; imported here, the import overlaps the server's start)
    import mlflow  # noqa: F401  (the flow's parent run, likewise)

    if store.tracking_uri().startswith("sqlite:"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (the embedded store's module: ~1 s, likewise)

    from flows.retrain import early_host, retrain

    # Python's last garbage collection at exit walks every object Prefect, MLflow and DVC created, for
    # nothing: the process ends anyway, so freeze them out of it (atexit handlers still run first).
    atexit.register(gc.freeze)
    # While a temporary server boots, the stage host can start (when a stage will run): it imports for the
    # first stages in time this command would spend waiting. A server of the user's answers at once.
    head_start = early_host(Path.cwd(), stages, force) if server.process else contextlib.nullcontext()
    with head_start, server.settings():
        started = time.perf_counter()
        summary = retrain(overrides=set_, stages=stages, promote=promote, force=force, params_file=str(params))
        # the flow's wall time, its run's creation and end in Prefect included: what issue-style overhead
        # figures ("flow wall time minus the stages' compute") start from; the process adds start-up
        summary["flow_seconds"] = round(time.perf_counter() - started, 2)
        print_summary(summary)


def check_prefect_api() -> None:
    """With PREFECT_API_URL set, the server must answer before a flow starts (without it, Prefect
    starts a temporary server of its own)."""
    api = os.environ.get("PREFECT_API_URL", "")
    if api and (reason := store.health_error(api, store.PROBE_TIMEOUT_S)):
        raise LmlineError(
            f"the Prefect API at {api} does not answer ({reason}); "
            "start the server or unset PREFECT_API_URL for a temporary one"
        )
