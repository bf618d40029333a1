"""Where a run and a registered version come from: the Prefect flow run behind a pipeline run, and
`lineage()`, which reads back the git and DVC facts a stage run was tagged with (lmline.vcs gathers
them) for a registered version and, recursively, the base model it was fine-tuned from.
"""

from __future__ import annotations

import logging

from lmline.errors import LmlineError
from lmline.tracking.store import client, tracking_uri

log = logging.getLogger(__name__)


def model_version(uri: str):
    """`models:/name/version` or `models:/name@alias` -> ModelVersion."""
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client().get_model_version_by_alias(name, alias)
        name, _, version = ref.partition("/")
        return client().get_model_version(name, version)
    except MlflowException as exc:
        raise LmlineError(f"{uri}: not in the registry at {tracking_uri()} ({exc.message.splitlines()[0]})") from None


LOCAL_PREFECT_UI = "http://127.0.0.1:4200"  # where `prefect server start` serves by default


def flow_run_link(flow_run_id: str, ui_url: str | None, prefect: str = "prefect") -> str:
    """Where a person sees Prefect flow run `flow_run_id`: its page under `ui_url` (Prefect's
    PREFECT_UI_URL, set when runs report to a server). Without one the run was made in ephemeral
    mode and lives only in the local Prefect database (PREFECT_HOME), so the way to see it is the
    command that serves that database, then the page. Prefect's own `flow_run.ui_url` is
    "None/flow-runs/..." then; the summary, the MLflow tag, lineage and the model card use this."""
    page = f"/runs/flow-run/{flow_run_id}"
    if ui_url:
        return ui_url.rstrip("/") + page
    return f"{prefect} server start, then {LOCAL_PREFECT_UI}{page}"


def lineage(uri: str) -> dict:
    """Everything behind a registered version: its run (git, DVC dep hashes, params), the pipeline's
    parent run and Prefect flow run, and the base model it was fine-tuned from (recursively)."""
    mv = model_version(uri)
    c = client()
    run = c.get_run(mv.run_id)
    tags = dict(run.data.tags)
    info = {
        "model": f"{mv.name}/{mv.version}",
        "aliases": list(getattr(mv, "aliases", []) or []),
        "mlflow_run_id": mv.run_id,
        "stage": tags.get("lmline.stage"),
        "git_commit": tags.get("git.commit"),
        "git_dirty": tags.get("git.dirty"),
        "dvc_deps": {k.removeprefix("dvc.dep."): v for k, v in tags.items() if k.startswith("dvc.dep.")},
        "params": dict(run.data.params),
        "decision": {k: v for k, v in mv.tags.items() if k.startswith("lmline.decision")},
    }
    parent_id = tags.get("mlflow.parentRunId")
    if parent_id:
        ptags = dict(c.get_run(parent_id).data.tags)
        info["pipeline_run_id"] = parent_id
        prefect = {k.removeprefix("prefect."): v for k, v in ptags.items() if k.startswith("prefect.")}
        if prefect.get("flow_run_id") and prefect.get("flow_run_url", "").startswith("None/"):
            # recorded in ephemeral mode before flow_run_link existed: Prefect had no UI address to give
            prefect["flow_run_url"] = flow_run_link(prefect["flow_run_id"], None)
        info["prefect"] = prefect
    base = dict(mv.tags).get("lmline.base_model")
    if base:
        info["base_model"] = lineage(f"models:/{base}")
    return info
