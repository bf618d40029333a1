"""Distributed mode: run a DVC stage on another work pool's worker, in that worker's own clone.

The hand-over, for a stage mapped to `gpu` in `orchestration.pools`:

  parent (retrain flow, its workspace)          worker (run-stage flow, its clone)
  dvc push the stage's data deps
  snapshot commit -> push refs/lmline/<run>/<stage>
  run_deployment("run-stage/run-stage") ──────► pull step `enter_workspace`: fetch + check out the snapshot
                                                dvc pull --force the stage's data deps
                                                dvc repro --single-item <stage>  (retrain.run_stage, as local)
                                                dvc push <stage>; artifact: its lock entry, ran/cached
  write the lock entry into dvc.lock ◄────────
  dvc pull <stage>; assert `dvc status <stage>` clean

The snapshot carries the workspace exactly as it is (uncommitted params and dvc.lock included): handing
over HEAD alone would run the stage on other params. Results travel as a Prefect artifact, not as the
flow's return value, because a return value is stored on the worker's host.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.retrain import StageFailed, StageResult, run_stage
from lmline import config
from lmline.tracking import runs, store
from lmline.data import (GIT_REMOTE, check_git_inputs, check_git_ref, dvc, dvc_default_remote, git, has_git_remote,
                         snapshot)
from lmline.errors import LmlineError
from lmline.io import read_json

RUN_STAGE_DEPLOYMENT = "run-stage/run-stage"
RESULT_ARTIFACT = "lmline-stage-result"
WORKSPACE_ENV = "LMLINE_WORKSPACE"  # each worker's own clone of the repo


# ---------------------------------------------------------------- DVC state of the workspace
def data_targets(root: Path, stage: str) -> list[str]:
    """The stage's deps that DVC stores (other stages' outs, `dvc add`ed data), as push/pull targets."""
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import OutputNotFoundError
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        [st] = [s for s in repo.index.stages if getattr(s, "name", None) == stage]
        targets = set()
        for dep in st.deps:
            if isinstance(dep, ParamsDependency):
                continue
            try:
                outs = repo.find_outs_by_path(dep.fs_path, strict=False, recursive=True)
            except OutputNotFoundError:  # code, or plain git-tracked files
                continue
            targets.update(os.path.relpath(o.fs_path, root) for o in outs)
    return sorted(targets)


def is_clean(root: Path, stage: str) -> bool:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return not repo.status(targets=[stage])


def lock_entry(root: Path, stage: str) -> dict:
    import yaml

    return yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]


def record_lock_entry(root: Path, stage: str, entry: dict) -> None:
    """Write a stage's lock entry as `dvc repro` would have: no public DVC API takes one, so use the
    YAML round-trip DVC itself uses for dvc.lock."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(root / "dvc.lock") as lock:
        lock.setdefault("schema", "2.0")
        lock.setdefault("stages", {})[stage] = entry


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
        raise LmlineError("orchestration.mode is distributed but PREFECT_API_URL is not set: workers need a Prefect server")
    if any(params.orchestration.pool_of(s) == "gpu" for s in config.STAGES):
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

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


def should_route(params: config.Params, root: Path, stage: str, force: bool) -> bool:
    """A gpu stage is routed unless DVC says it is up to date here (then the local task reports it cached)."""
    return params.orchestration.pool_of(stage) == "gpu" and (force or not is_clean(root, stage))


# ---------------------------------------------------------------- worker side
def flow_run_parameters() -> dict:
    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")  # set by the worker for the run it started
    if not run_id:
        return {}
    from prefect.client.orchestration import get_client

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
def run_stage_on_worker(stage: str, git_ref: str, revision: str, force: bool = False,
                        params_file: str = "params.yaml") -> dict:
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
    result = run_stage.with_options(name=stage, task_run_name=stage)(
        stage, str(root), force, os.environ.get(runs.PARENT_ENV), params_file
    )
    dvc(root, "push", stage)
    outcome = {"stage": stage, "status": result.status, "seconds": result.seconds, "lock": lock_entry(root, stage)}
    log.info("stage %s %s; lock entry and outputs published", stage, result.status)
    create_markdown_artifact(
        key=RESULT_ARTIFACT,
        markdown=f"# {stage}: {result.status} in {result.seconds} s\n\n```json\n{json.dumps(outcome, indent=2)}\n```\n",
        description=f"lmline stage {stage}: lock entry for the parent flow",
    )
    return outcome


# ---------------------------------------------------------------- parent side
def read_outcome(child_run_id: UUID) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[RESULT_ARTIFACT])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child_run_id])),
        )
    return json.loads(artifact.data.split("```json\n", 1)[1].rsplit("\n```", 1)[0])


def job_env(pool: str, parent_run_id: str | None, root: Path) -> dict[str, str]:
    """The child run's env: the pool's own defaults (CUDA_VISIBLE_DEVICES) plus MLflow nesting. A run's
    `env` job variable replaces the pool's default wholesale, so the defaults are merged in here."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        template = client.read_work_pool(pool).base_job_template
    defaults = template.get("variables", {}).get("properties", {}).get("env", {}).get("default") or {}
    env = {**defaults, "MLFLOW_TRACKING_URI": store.tracking_uri(root)}
    if parent_run_id:
        env[runs.PARENT_ENV] = parent_run_id
    return env


@task(name="routed-stage")
def route_stage(stage: str, root: str, force: bool, parent_run_id: str | None, params_file: str) -> StageResult:
    """Run `stage` as a run-stage deployment run on the gpu pool and take its result into this workspace."""
    from prefect.deployments import run_deployment

    log = get_run_logger()
    root_path = Path(root)
    params = config.load(root_path / params_file)
    started = time.perf_counter()
    targets = data_targets(root_path, stage)
    if targets:
        dvc(root_path, "push", *targets)
    ref = f"refs/lmline/{flow_run.id or 'adhoc'}/{stage}"
    revision = snapshot(root_path, ref, include=[params_file])
    pool = params.orchestration.work_pools.gpu
    log.info("stage %s -> %s pool at %s (%s)", stage, pool, revision[:12], ref)
    child = run_deployment(
        RUN_STAGE_DEPLOYMENT,
        parameters={"stage": stage, "git_ref": ref, "revision": revision, "force": force, "params_file": params_file},
        job_variables={"env": job_env(pool, parent_run_id, root_path)},
        flow_run_name=f"{stage}-{revision[:8]}",
        poll_interval=1,  # the default 5 s adds up to seconds per stage
    )
    if not child.state.is_completed():
        raise StageFailed(f"stage {stage} failed on the {pool} pool ({child.state.name}): {child.state.message}")
    outcome = read_outcome(child.id)
    record_lock_entry(root_path, stage, outcome["lock"])
    dvc(root_path, "pull", stage)
    if not is_clean(root_path, stage):
        raise StageFailed(f"stage {stage}: the outputs pulled from the {pool} worker do not match its lock entry")
    metrics_file = root_path / config.metrics_path(params, stage)
    metrics = read_json(metrics_file) if metrics_file.exists() else {}
    seconds = round(time.perf_counter() - started, 2)
    log.info("stage %s %s on the %s pool; %.1fs with the hand-over", stage, outcome["status"], pool, seconds)
    return StageResult(stage, outcome["status"], seconds, metrics)
