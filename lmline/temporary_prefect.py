"""Prefect's temporary server for `lmline run` without PREFECT_API_URL (Prefect's ephemeral mode).

Its own module, importing only the standard library until the flow asks for its settings, so that the
`lmline` script (lmline/entry.py) can launch it as its very first act, before the CLI's imports: the
server's own boot (mostly importing Prefect's server code: ~5 s of one core here) is what a no-op
`lmline run` waits for longest, and it starts that much sooner.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from lmline.errors import LmlineError

_early: TemporaryPrefect | None = None  # launched by the entry script, not yet taken by `lmline run`


def launch_early() -> None:
    """Launch the server now, for the `lmline run` this process is about to run (take_early)."""
    global _early
    _early = TemporaryPrefect.launch()


def take_early() -> TemporaryPrefect | None:
    """The server launch_early started, once (a second `lmline run` in one process launches its own)."""
    global _early
    server, _early = _early, None
    return server


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
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
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
        from lmline.tracking import store

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
        # No flow-run heartbeats: they tell a server that outlives the run that it is still alive, and this
        # one lives exactly as long as the run. Prefect stops its heartbeat thread by joining it, and the
        # thread sleeps in 1 s steps: up to a second each time (0.8 s in all in a profiled no-op run).
        updates = {PREFECT_API_URL: api, PREFECT_UI_URL: "", PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        return temporary_settings(updates=updates)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
