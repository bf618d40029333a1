"""Distributed mode: run a DVC stage on another work pool's worker, in that worker's own clone.

The hand-over, for a stage mapped to `gpu` in `orchestration.pools`:

  parent (retrain flow, its workspace)          worker (run-stage flow, its clone)
  flows.stage_task.pipeline_stage(pool=gpu):
  dvc push the stage's data deps
  snapshot commit -> push refs/lmline/<run>/<stage>
  run_deployment("run-stage/run-stage") ──────► pull step `enter_workspace`: fetch + check out the snapshot
                                                dvc pull --force the stage's data deps
                                                dvc repro --single-item <stage>  (pipeline_stage, placed here)
                                                dvc push <stage>; artifact: its lock entry, ran/cached
  write the lock entry into dvc.lock ◄────────
  dvc pull <stage>; assert `dvc status <stage>` clean

The snapshot carries the workspace exactly as it is (uncommitted params and dvc.lock included): handing
over HEAD alone would run the stage on other params. This module holds the preconditions, the choice
of placement and the worker's side; the parent's side is the stage task's (flows/stage_task.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from flows.stage_task import RUN_STAGE_DEPLOYMENT, pipeline_stage, publish_outcome
from lmline import config
from lmline.errors import LmlineError
from lmline.stages import NAMES, ROUTED_POOL
from lmline.tracking import runs
from lmline.vcs import (
    GIT_REMOTE,
    check_git_inputs,
    check_git_ref,
    data_targets,
    dvc,
    dvc_default_remote,
    git,
    has_git_remote,
    is_clean,
)

WORKSPACE_ENV = "LMLINE_WORKSPACE"  # each worker's own clone of the repo


# ---------------------------------------------------------------- parent side: before any stage runs
def check_ready(root: Path, params: config.Params) -> None:
    """Distributed mode's preconditions, checked before any stage runs, each with the fix."""
    if not dvc_default_remote(root):
        raise LmlineError(
            "orchestration.mode is distributed but the repo has no default DVC remote: workers exchange data "
            "through it (`dvc remote add -d store s3://bucket/lmline`, or a shared directory; docs/production.md)"
        )
    if not has_git_remote(root):
        raise LmlineError(
            f"orchestration.mode is distributed but {root} has no git remote {GIT_REMOTE!r}: workers fetch "
            "the workspace snapshot from it"
        )
    if not os.environ.get("PREFECT_API_URL"):
        raise LmlineError(
            "orchestration.mode is distributed but PREFECT_API_URL is not set: workers need a Prefect server"
        )
    if any(params.orchestration.pool_of(s) == ROUTED_POOL for s in NAMES):
        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name(RUN_STAGE_DEPLOYMENT)
            except ObjectNotFound:
                raise LmlineError(f"deployment {RUN_STAGE_DEPLOYMENT} not found: run `lmline deploy` first") from None


def pull_added_data(root: Path, params: config.Params) -> list[str]:
    """Fetch the `lmline data add`ed sources (their .dvc files under paths.corpus): a fresh worker clone
    has the .dvc files from git but not the data."""
    added = sorted(str(p.relative_to(root)) for p in (root / params.paths.corpus).rglob("*.dvc"))
    if added:
        dvc(root, "pull", *added)
    return added


def placement(params: config.Params, root: Path, stage: str, force: bool) -> str | None:
    """The work pool a stage runs on, or None for here: a gpu stage goes to the gpu pool unless DVC says
    it is up to date here (then the local task reports it cached)."""
    routed = params.orchestration.pool_of(stage) == ROUTED_POOL and (force or not is_clean(root, stage))
    return getattr(params.orchestration.work_pools, ROUTED_POOL) if routed else None


# ---------------------------------------------------------------- worker side
def flow_run_parameters() -> dict:
    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")  # set by the worker for the run it started
    if not run_id:
        return {}
    with get_client(sync_client=True) as client:
        return dict(client.read_flow_run(UUID(run_id)).parameters)


def enter_workspace(branch: str = "main") -> dict[str, str]:
    """Deployment pull step, run by the worker's flow-run process before it loads the flow: enter this
    worker's clone ($LMLINE_WORKSPACE) and check out the run's `revision` from its `git_ref` parameter,
    else the tip of `branch`. Checking out inside the flow would run the previous revision's flow code."""
    workspace = os.environ.get(WORKSPACE_ENV)
    if not workspace:
        raise LmlineError(f"{WORKSPACE_ENV} is not set: start the worker with {WORKSPACE_ENV}=<its clone of the repo>")
    root = Path(workspace).resolve()
    wanted = flow_run_parameters()
    check_out(root, wanted.get("git_ref"), wanted.get("revision"), branch)
    os.chdir(root)
    return {"directory": str(root)}


def check_out(root: Path, git_ref: str | None, revision: str | None, branch: str) -> None:
    """Fetch `git_ref` (else the tip of `branch`) from origin and check out `revision` (else what was
    fetched). The values come from flow parameters and event payloads: each is checked first and
    passed where git cannot take it for an option."""
    check_git_inputs(git_ref, revision)
    ref = git_ref or check_git_ref(f"refs/heads/{branch}", "orchestration.branch")
    git(root, "fetch", "--quiet", "--end-of-options", GIT_REMOTE, ref)
    # checkout takes no --end-of-options (git 2.39); the checked revision cannot start with '-', and
    # `--` ends the revisions
    git(root, "checkout", "--quiet", "--force", "--detach", revision or "FETCH_HEAD", "--")


@flow(name="run-stage", log_prints=True)
def run_stage_on_worker(
    stage: str, git_ref: str, revision: str, force: bool = False, params_file: str = "params.yaml"
) -> dict:
    """Run one DVC stage in this worker's clone, checked out at `revision` by the pull step: pull the
    stage's data deps, run it as local mode does, push its outputs, publish its lock entry."""
    log = get_run_logger()
    root = Path.cwd()
    if git(root, "rev-parse", "HEAD") != revision:
        raise LmlineError(f"{root} is not at {revision}: the deployment's pull step must check it out")
    targets = data_targets(root, stage)
    if targets:
        # --force: an out left in this clone by an earlier run would otherwise be used silently
        dvc(root, "pull", "--force", *targets)
    result = pipeline_stage.with_options(name=stage, task_run_name=stage)(
        stage, str(root), force, os.environ.get(runs.PARENT_ENV), params_file
    )
    dvc(root, "push", stage)
    outcome = publish_outcome(root, result)
    log.info("stage %s %s; lock entry and outputs published", stage, result.status)
    return outcome
