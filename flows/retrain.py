"""The retrain flow: validate params, run each DVC stage as a Prefect task, promote, report.

Each task runs exactly one DVC stage (flows/stage_task.py: `dvc repro --single-item <stage>` here, or
on the gpu pool's worker in distributed mode), so DVC decides whether the stage runs or is restored
from cache; the task reports `ran` or `cached`. MLflow: the flow opens the parent run; stage processes
nest under it through $LMLINE_PARENT_RUN_ID; a cached stage gets a nested run tagged cached=true.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update
from filelock import FileLock, Timeout
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from flows import promotion, routing
from flows.scoring import candidate_scores, gate_config, rescore_version
from flows.stage_task import StageResult, pipeline_stage, warm_host
from lmline import config, stage_host
from lmline.errors import LmlineError
from lmline.io import atomic_path
from lmline.stages import GATE_STAGE, MODEL_STAGE, NAMES, STAGES
from lmline.tracking import lineage, registry, runs
from lmline.vcs import check_git_inputs, up_to_date_stages


def workspace_lock(root: Path):
    """The lock that serialises pipeline runs in one workspace: DVC takes a repo lock of its own, and
    two flows would collide on it; params.yaml is rewritten only under this lock too."""
    return FileLock(str(root / ".dvc" / "tmp" / "lmline-retrain.lock"))


def held_by_another_run(root: Path) -> bool:
    """Whether another process holds the workspace lock now (FileLock's is_locked tells only of its own)."""
    lock = workspace_lock(root)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


@contextlib.contextmanager
def early_host(root: Path, stages: list[str] | None, force: bool) -> Iterator[None]:
    """`lmline run`'s head start for the stage host, taken while Prefect's temporary server boots (the
    command only waits then): when a quick `dvc status` says a selected stage will run, the host starts
    now and imports DVC, MLflow and the data stages' modules before the flow's first stage asks for
    them; the flow's warm_host takes it ($LMLINE_STAGE_HOST). The flow still decides what runs, under
    the workspace lock; a host it then does not need is stopped unused. With another run holding this
    workspace, or any error here, no head start: the flow starts its own host as it would."""
    selected = set(stages or NAMES)
    try:
        will_run = not held_by_another_run(root) and (force or not selected <= up_to_date_stages(root))
    except Exception:  # the flow meets whatever this was again, and says so
        will_run = False
    if not will_run:
        yield
        return
    with warm_host(root) as address:
        os.environ[stage_host.ADDRESS_ENV] = address
        try:
            yield
        finally:
            os.environ.pop(stage_host.ADDRESS_ENV, None)


def write_overrides(params_path: Path, overrides: dict) -> config.Params:
    """Persist --set overrides into params.yaml (as `dvc exp run -S` does) so DVC sees them; call it
    under workspace_lock. The overrides are merged into the file as it is now (another run may have
    changed it since this one validated), the result validated, and written whole (temp + rename),
    comments kept: a reader never sees a half-written file, and params.yaml is never left invalid.
    Returns the params as written; raises ConfigError, naming the key, and writes nothing if invalid."""
    data = parse_yaml_for_update(params_path.read_text(encoding="utf-8"), str(params_path))
    config.apply_overrides(data, overrides)
    with atomic_path(params_path) as tmp:
        tmp.write_text(dumps_yaml(data), encoding="utf-8")
        return config.load(tmp)  # the very bytes that replace params.yaml; named params.yaml in errors


def key_metrics(result: StageResult) -> str:
    """A few numbers per stage for the summary table (lmline.stages: each stage's key_metrics)."""
    picks = STAGES[result.stage].key_metrics  # names as in metrics/<stage>.json
    flat = runs.numeric(result.metrics)
    shown = []
    for key in picks:
        value = flat.get(key, flat.get(f"totals.{key}"))
        if value is not None:
            shown.append(f"{key}={value:,.0f}" if value.is_integer() else f"{key}={value:.4g}")
    return ", ".join(shown)


@flow(name="retrain", log_prints=True)
def retrain(
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    promote: bool = True,
    force: bool = False,
    workspace: str = ".",
    params_file: str = "params.yaml",
    git_ref: str | None = None,
    revision: str | None = None,
) -> dict:
    """Run the pipeline. `overrides` are dotted params (`pretrain.lr=1e-3`); `stages` a subset in pipeline
    order (default all); `force` re-runs stages even if DVC has them cached. `git_ref`/`revision`: what
    the deployment's pull step checked out (flows/routing.enter_workspace; the data trigger sets them)."""
    check_git_inputs(git_ref, revision)  # from the data trigger's event payload: checked before any use
    log = get_run_logger()
    root = Path(workspace).resolve()
    params_path = root / params_file
    parsed = config.parse_overrides(overrides)
    params = config.load(params_path, parsed)  # fails here, naming the key, before any stage runs
    selected = list(NAMES) if not stages else [s for s in NAMES if s in stages]
    unknown = sorted(set(stages or []) - set(NAMES))
    if unknown:
        raise LmlineError(f"unknown stages {unknown} (stages: {', '.join(NAMES)})")

    # DVC takes a repo lock; two flows in one workspace would collide on it, so they queue here.
    lock = workspace_lock(root)
    log.info("waiting for the workspace lock" if held_by_another_run(root) else "workspace lock free")
    with lock:
        if parsed:  # validated again as merged into params.yaml as it is now, under the lock
            params = write_overrides(params_path, parsed)
        # distributed mode: stages mapped to gpu run on the gpu pool's worker (flows/routing.py)
        distributed = params.orchestration.mode == "distributed"
        if distributed:
            routing.check_ready(root, params)
            routing.pull_added_data(root, params)
        tags = {
            "prefect.flow_run_id": str(flow_run.id or ""),
            "prefect.flow_run_name": str(flow_run.name or ""),
            "prefect.flow_run_url": lineage.flow_run_link(str(flow_run.id or ""), PREFECT_UI_URL.value()),
            **({"lmline.revision": revision} if revision else {}),
        }
        # One `dvc status` of the whole pipeline instead of a `dvc repro` subprocess per up-to-date stage.
        # It holds only until something runs: a stage DVC runs or restores changes what the next depend on.
        up_to_date = set() if force else up_to_date_stages(root)
        nothing_ran_yet = True
        results: list[StageResult] = []
        promotion_result = None
        # A warm stage host when any stage will run here: the stages fork from it with torch, transformers
        # and MLflow imported (during the data stages), instead of each importing them in a new interpreter.
        # Started before the parent run opens: its imports get that second's head start.
        will_run = force or not set(selected) <= up_to_date
        with warm_host(root, will_run) as host, runs.parent_run(params, tags, root) as parent_id:
            for stage in selected:
                pool = routing.placement(params, root, stage, force) if distributed else None
                skip = nothing_ran_yet = nothing_ran_yet and stage in up_to_date and pool is None
                placed_task = pipeline_stage.with_options(
                    name=stage,
                    task_run_name=stage,
                    retries=params.orchestration.retries.get(stage, 0),
                    retry_delay_seconds=params.orchestration.retry_delay_seconds,
                )
                results.append(placed_task(stage, str(root), force, parent_id, params_file, pool, skip, host))
            # Only now, every selected stage done, do their models enter the registry (the stages only
            # log them): a run that fails at any stage leaves the registry exactly as it was.
            registry.register_produced_models(params, root, selected, evaluated=GATE_STAGE in selected)
            if promote and GATE_STAGE in selected:
                promotion_result = promote_candidate(
                    params, root, {r.stage: r for r in results}, str(flow_run.id or "")
                )
            summary = {
                "flow_run_id": str(flow_run.id or ""),
                "mlflow_parent_run_id": parent_id,
                "stages": [asdict(r) for r in results],
                "promotion": promotion_result,
            }
            publish_artifacts(summary, params)
    return summary


def promote_candidate(params: config.Params, root: Path, results: dict[str, StageResult], flow_run_id: str) -> dict:
    """Promote the fine-tuned version this pipeline produced (or restored), serialised everywhere."""
    finetune = results.get(MODEL_STAGE["task"])
    if finetune is None or not finetune.metrics.get("mlflow_run_id"):
        return {"promoted": False, "reason": "no fine-tuned model in this run"}
    producing = runs.run_tags(finetune.metrics["mlflow_run_id"])
    name, version = producing.get("lmline.registered_model"), producing.get("lmline.model_version")
    if not name or not version:
        return {"promoted": False, "reason": "the fine-tune run registered no model version"}
    scores = candidate_scores(params, root, results[GATE_STAGE].metrics)
    with promotion.promotion_slot():
        result = promotion.promote(
            name,
            int(version),
            scores,
            gate_config(params),
            lambda v: rescore_version(params, root, name, v),
            flow_run_id,
        )
    # The comparison with the previous champion is known only now: rewrite the card with it.
    card = registry.publish_model_card(params, root, name, version, upto=GATE_STAGE)
    if card:
        create_markdown_artifact(key="lmline-model-card", markdown=card, description=f"Model card of {name} v{version}")
    return result


def publish_artifacts(summary: dict, params: config.Params) -> None:
    """Prefect artifacts with stable keys, so the Artifacts page keeps their history across runs."""
    rows = [
        {"stage": s["stage"], "status": s["status"], "seconds": s["seconds"], "metrics": key_metrics(StageResult(**s))}
        for s in summary["stages"]
    ]
    create_table_artifact(key="lmline-stages", table=rows, description="Stages of this retrain run")
    p = summary["promotion"]
    lines = [
        f"# lmline retrain {summary['flow_run_id']}",
        "",
        f"MLflow parent run: `{summary['mlflow_parent_run_id']}`",
        "",
    ]
    lines += [f"- **{r['stage']}**: {r['status']} in {r['seconds']} s — {r['metrics']}" for r in rows]
    if p and "model" in p:
        lines += [
            "",
            "## Promotion",
            f"- model: `{p['model']}`, candidate v{p['candidate']}",
            f"- champion before: {p['champion_before']}, after: {p['champion_after']}",
            f"- decision: {'promoted' if p['promoted'] else 'not promoted'} — {p['reason']}",
        ]
    elif p:
        lines += ["", f"Promotion: {p['reason']}"]
    create_markdown_artifact(key="lmline-summary", markdown="\n".join(lines), description="Retrain summary")
