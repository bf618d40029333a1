"""Pipeline commands: `lmline stage` (what dvc.yaml's cmd runs), `lmline sources`, `lmline run`.

Prefect is imported inside `run` alone: it adds about a second to every `lmline` call, --help included.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmline import config, guard, progress, stage_process
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
    server = TemporaryPrefect.launch()  # boots in its own process while this one imports what the flow needs
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


class TemporaryPrefect:
    """The Prefect server of a run without PREFECT_API_URL (Prefect's ephemeral mode), launched as the
    command's first act. It is the server process Prefect's own `SubprocessASGIServer` would start (uvicorn
    on `prefect.server.api.server:create_app`, UI off, the local database in PREFECT_HOME), but Prefect
    starts it only when the flow first asks for a client, after this process has imported Prefect's server
    code just to launch it. Launched here instead, its boot overlaps this process importing
    DVC, MLflow and the flow on the other core, and this process never imports the server code: the flow's
    client is pointed at it with Prefect's `temporary_settings` (os.environ is untouched, so the stages and
    every `PREFECT_API_URL` check still see ephemeral mode). The UI address is left empty, as Prefect's
    ephemeral mode leaves it: the run lives in the local database (see lineage.flow_run_link)."""

    # Prefect's own server command and environment for its ephemeral server (SubprocessASGIServer)
    SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}

    def __init__(self, process: subprocess.Popen | None, port: int | None):
        self.process, self.port = process, port

    @classmethod
    def launch(cls) -> TemporaryPrefect:
        if os.environ.get("PREFECT_API_URL"):
            return cls(None, None)  # a server of the user's (check_prefect_api has probed it)
        with socket.socket() as sock:  # a free port, chosen by the OS
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory"]
        command += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--log-level", "error", "--lifespan", "on"]
        process = subprocess.Popen(command, env={**os.environ, **cls.SERVER_ENV}, stdin=subprocess.DEVNULL)
        server = cls(process, port)
        atexit.register(server.stop)
        return server

    def settings(self):
        """Prefect settings for the flow: this server's API (once it answers /health), no UI address.
        A no-op context when there is no server of ours to use: the user's PREFECT_API_URL (from the
        environment or a Prefect profile) or a disabled ephemeral mode leave Prefect to do as it would."""
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            PREFECT_UI_URL,
            temporary_settings,
        )
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as TIMEOUT

        if self.process is None:
            return contextlib.nullcontext()
        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            self.stop()
            return contextlib.nullcontext()
        api = f"http://127.0.0.1:{self.port}/api"
        deadline = time.monotonic() + TIMEOUT.value()
        while store.health_error(api, 1.0):
            code = self.process.poll()
            if code is not None or time.monotonic() > deadline:
                why = (
                    f"exited {code}; its errors are above"
                    if code is not None
                    else f"no answer in {TIMEOUT.value():g} s"
                )
                raise LmlineError(
                    f"Prefect's temporary server did not start ({why}); on a loaded machine raise "
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a running server"
                )
            time.sleep(0.05)
        return temporary_settings(updates={PREFECT_API_URL: api, PREFECT_UI_URL: ""})

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def check_prefect_api() -> None:
    """With PREFECT_API_URL set, the server must answer before a flow starts (without it, Prefect
    starts a temporary server of its own)."""
    api = os.environ.get("PREFECT_API_URL", "")
    if api and (reason := store.health_error(api, store.PROBE_TIMEOUT_S)):
        raise LmlineError(
            f"the Prefect API at {api} does not answer ({reason}); "
            "start the server or unset PREFECT_API_URL for a temporary one"
        )
