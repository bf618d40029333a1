"""One Prefect task runs one DVC stage, here or on another work pool's worker: `pool` says where.

Here (`pool` None): `dvc repro --single-item <stage>` in this workspace, the stage's output streamed
into the Prefect logger; DVC decides whether the stage runs or is restored from cache (`ran` or
`cached`), and a cached stage gets a nested MLflow run tagged cached=true. A stage the flow already
found up to date (`up_to_date`: one `dvc status` of the whole pipeline before the first stage) starts
no `dvc repro` at all: it is `cached` and gets the same nested run.

On a pool (distributed mode, a stage mapped to gpu): this task is the parent's side of the hand-over
flows/routing.py draws: push the stage's data deps, snapshot the workspace to a git ref, run the
run-stage deployment on that pool (whose worker runs this same task, placed there), then take the
lock entry it publishes into dvc.lock and pull the outputs. Results travel as a Prefect artifact, not
as the child flow's return value, because a return value is stored on the worker's host.

Either way the task reads metrics/<stage>.json afterwards and returns a StageResult.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from lmline import config, guard, progress, stage_host
from lmline.errors import LmlineError
from lmline.io import read_json
from lmline.tracking import runs, store
from lmline.vcs import data_targets, dvc, dvc_command, is_clean, lock_entry, record_lock_entry, snapshot

RUN_STAGE_DEPLOYMENT = "run-stage/run-stage"
RESULT_ARTIFACT = "lmline-stage-result"
STAGE_DONE_MARKERS = ("Running stage",)  # DVC prints this only when it executes the stage's cmd


@dataclass
class StageResult:
    stage: str
    status: str  # ran | cached
    seconds: float
    metrics: dict = field(default_factory=dict)


class StageFailed(LmlineError):
    pass


@task(name="stage")
def pipeline_stage(
    stage: str,
    root: str,
    force: bool,
    parent_run_id: str | None,
    params_file: str,
    pool: str | None = None,
    up_to_date: bool = False,
    host: str | None = None,
) -> StageResult:
    """Run one DVC stage in the workspace `root`: here, or (`pool`: a work pool's name) through the
    run-stage deployment on that pool's worker. `up_to_date`: `dvc status` found the stage up to date
    and nothing ran before it in this flow run, so `dvc repro` would only say so: report it cached.
    `host`: the address of the run's warm stage host (warm_host), which the stage's process hands itself to."""
    log = get_run_logger()
    root_path = Path(root)
    params = config.load(root_path / params_file)
    started = time.perf_counter()
    if up_to_date and pool is None and not force:
        status = "cached"
    elif pool is None:
        status = dvc_repro(stage, root_path, force, parent_run_id, log, host)
    else:
        status = hand_over(stage, root_path, force, parent_run_id, params_file, pool, log)
    metrics_file = root_path / config.metrics_path(params, stage)
    metrics = read_json(metrics_file) if metrics_file.exists() else {}
    if pool is None and status == "cached" and parent_run_id:
        runs.log_cached_stage(stage, params, metrics, parent_run_id, root_path)
    seconds = round(time.perf_counter() - started, 2)
    if pool is None:
        log.info("stage %s %s in %.1fs", stage, status, seconds)
    else:
        log.info("stage %s %s on the %s pool; %.1fs with the hand-over", stage, status, pool, seconds)
    return StageResult(stage, status, seconds, metrics)


# ---------------------------------------------------------------- here
def stage_env(parent_run_id: str | None, root: Path | None = None, host: str | None = None) -> dict[str, str]:
    """The stage subprocess environment: our venv's bin first (dvc runs `lmline stage`), parent run id."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if root is not None:
        # the workspace's own lmline/tasks code, not wherever the venv's editable install points: a
        # worker's clone sits at the revision it was handed, and DVC hashed that code as the stage's deps
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    if parent_run_id:
        env[runs.PARENT_ENV] = parent_run_id
    if host:
        env[stage_host.ADDRESS_ENV] = host
    return env


@contextlib.contextmanager
def warm_host(root: Path, wanted: bool = True) -> Iterator[str | None]:
    """A warm stage host (lmline/stage_host.py) for the stages this run will execute here, started
    with their environment (what a stage's request carries replaces it in the child: the parent run's
    id, DVC's variables); yields its address for pipeline_stage's `host`, or None if not `wanted`
    (every stage up to date: nothing would use it). The host `lmline run` started while Prefect's server
    booted (flows/retrain.py:early_host) is taken as it is."""
    if not wanted:
        yield None
        return
    started = os.environ.get(stage_host.ADDRESS_ENV)
    if started and os.path.exists(started):
        yield started
        return
    with stage_host.hosting(root, stage_env(None, root)) as address:
        yield address


def dvc_repro(stage: str, root: Path, force: bool, parent_run_id: str | None, log, host: str | None = None) -> str:
    """Run one DVC stage, streaming its output to `log`; return 'ran' or 'cached'. `dvc` and the stage
    it runs die with this process, however it ends, leaving DVC's lock free: interrupted here, their
    process group is stopped; killed, the watcher of lmline/guard.py ends them."""
    guard.watch_children()  # already running under `lmline run`; a deployment's flow run starts its own
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    # Under a host DVC forks from it too, its imports (about half a second a stage) done there.
    cmd = stage_host.handing_command(host, "dvc.cli:main", ["dvc", *args]) if host else dvc_command(*args)
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=stage_env(parent_run_id, root, host),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # dvc and the `lmline stage` it runs: one group, stopped together
    )
    lines = []
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                log.info(line, extra={progress.STAGE_OUTPUT: True})  # all in Prefect; the terminal shows it with -v
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM, an error while logging): stop the group
            stop_group(proc)
    if proc.wait():
        # Our CLI prints one `error: ...` line naming the file/key; surface it as the failure message.
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        detail = errors[-1] if errors else (lines[-1] if lines else f"exit code {proc.returncode}")
        raise StageFailed(f"stage {stage} failed: {detail}")
    return "ran" if any(m in line for line in lines for m in STAGE_DONE_MARKERS) else "cached"


def stop_group(proc: subprocess.Popen, grace_s: float = guard.GRACE_S) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL whatever is left of it after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # no process of the group is left
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------- on a work pool: the parent's side
def hand_over(stage: str, root: Path, force: bool, parent_run_id: str | None, params_file: str, pool: str, log) -> str:
    """Run `stage` as a run-stage deployment run on `pool` and take its result into this workspace;
    returns the worker's 'ran' or 'cached'."""
    targets = data_targets(root, stage)
    if targets:
        dvc(root, "push", *targets)
    ref = f"refs/lmline/{flow_run.id or 'adhoc'}/{stage}"
    revision = snapshot(root, ref, include=[params_file])
    log.info("stage %s -> %s pool at %s (%s)", stage, pool, revision[:12], ref)
    child = run_deployment(
        RUN_STAGE_DEPLOYMENT,
        parameters={"stage": stage, "git_ref": ref, "revision": revision, "force": force, "params_file": params_file},
        job_variables={"env": job_env(pool, parent_run_id, root)},
        flow_run_name=f"{stage}-{revision[:8]}",
        poll_interval=1,  # the default 5 s adds up to seconds per stage
    )
    if not child.state.is_completed():
        raise StageFailed(f"stage {stage} failed on the {pool} pool ({child.state.name}): {child.state.message}")
    outcome = read_outcome(child.id)
    record_lock_entry(root, stage, outcome["lock"])
    dvc(root, "pull", stage)
    if not is_clean(root, stage):
        raise StageFailed(f"stage {stage}: the outputs pulled from the {pool} worker do not match its lock entry")
    return outcome["status"]


def job_env(pool: str, parent_run_id: str | None, root: Path) -> dict[str, str]:
    """The child run's env: the pool's own defaults (CUDA_VISIBLE_DEVICES) plus MLflow nesting. A run's
    `env` job variable replaces the pool's default wholesale, so the defaults are merged in here."""
    with get_client(sync_client=True) as client:
        template = client.read_work_pool(pool).base_job_template
    defaults = template.get("variables", {}).get("properties", {}).get("env", {}).get("default") or {}
    env = {**defaults, "MLFLOW_TRACKING_URI": store.tracking_uri(root)}
    if parent_run_id:
        env[runs.PARENT_ENV] = parent_run_id
    return env


def publish_outcome(root: Path, result: StageResult) -> dict:
    """The worker's side of the result: the stage's lock entry and status, as a Prefect artifact."""
    outcome = {
        "stage": result.stage,
        "status": result.status,
        "seconds": result.seconds,
        "lock": lock_entry(root, result.stage),
    }
    create_markdown_artifact(
        key=RESULT_ARTIFACT,
        markdown=f"# {result.stage}: {result.status} in {result.seconds} s\n\n"
        f"```json\n{json.dumps(outcome, indent=2)}\n```\n",
        description=f"lmline stage {result.stage}: lock entry for the parent flow",
    )
    return outcome


def read_outcome(child_run_id: UUID) -> dict:
    """What publish_outcome wrote in the child flow run."""
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[RESULT_ARTIFACT])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child_run_id])),
        )
    return json.loads(artifact.data.split("```json\n", 1)[1].rsplit("\n```", 1)[0])
