"""`lmline run` without PREFECT_API_URL: Prefect's temporary server, launched by lmline itself at the
command's start (lmline/temporary_prefect.py). The run must land in the local Prefect
database, as in Prefect's own ephemeral mode, the summary must say how to see it, and the server must be
gone when the command ends."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from conftest import lmline_cli, make_dvc_repo, tiny_params


def servers_of(prefect_home: Path) -> list[int]:
    """Pids of live Prefect server processes whose PREFECT_HOME is `prefect_home`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):  # not a process, gone meanwhile, or not ours to read
            continue
        if b"prefect.server.api.server:create_app" in cmdline and f"PREFECT_HOME={prefect_home}".encode() in environ:
            found.append(int(proc.name))
    return found


def test_a_run_without_a_server_is_recorded_in_the_local_database_and_leaves_no_server(tmp_path):
    root = make_dvc_repo(tmp_path, tiny_params())
    run = lmline_cli(root, "run", "--stage", "ingest")
    assert run.returncode == 0, run.stderr[-2000:]
    # ephemeral mode has no UI to link: the summary names the command that serves the local database
    link = re.search(r"server start, then http://127\.0\.0\.1:4200/runs/flow-run/([0-9a-f-]{36})", run.stdout)
    assert link, run.stdout
    with sqlite3.connect(root / "prefect-home" / "prefect.db") as db:
        flow_runs = db.execute("SELECT id, state_type FROM flow_run").fetchall()
        task_runs = db.execute("SELECT name, state_type FROM task_run").fetchall()
        events = [e for (e,) in db.execute("SELECT event FROM events")]
    assert [(str(i), s) for i, s in flow_runs] == [(link.group(1), "COMPLETED")]
    assert [s for name, s in task_runs if name.startswith("ingest")] == ["COMPLETED"]
    # The task run's states reached the server as events; no flow-run heartbeat did: they are off for a
    # server that ends with the run (stopping their thread made every flow's end wait up to a second).
    assert "prefect.task-run.Completed" in events
    assert "prefect.flow-run.heartbeat" not in events
    assert servers_of(root / "prefect-home") == []
