"""MLflow runs around lmline's work. Stages return metrics; this module logs them (and the params,
history, plot images, the trained model and the lineage tags) around a stage's run(). Pure stage code
never imports mlflow.

A stage run nests under the pipeline's parent run when LMLINE_PARENT_RUN_ID is set (the flow sets it);
started alone it is a top-level run. Every run names the process that holds it open, so a run whose
process died is closed KILLED by the next one (close_dead_runs) instead of staying RUNNING.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from lmline.config import Params, flatten
from lmline.stages import PIPELINE_TASK, REGISTERED, STAGES, model_name, pipeline_task
from lmline.tracking.plots import log_plot_images
from lmline.tracking.store import setup
from lmline.vcs import dvc_dep_hashes, git_info

PARENT_ENV = "LMLINE_PARENT_RUN_ID"
MLFLOW_PARAM_LIMIT = 6000  # MLflow rejects longer param values: those go in as an artifact instead
LOGGED_MODEL_TAG = "lmline.logged_model_id"  # on a stage run: the LoggedModel the flow registers if the run succeeds

log = logging.getLogger(__name__)


def log_params(params_section: Any, prefix: str) -> None:
    import mlflow

    flat = flatten(params_section, prefix)
    small = {k: v for k, v in flat.items() if len(json.dumps(v)) <= MLFLOW_PARAM_LIMIT}
    long = {k: v for k, v in flat.items() if k not in small}
    items = list(small.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_params(dict(items[i : i + 100]))
    if long:
        mlflow.log_dict(long, f"params/{prefix.rstrip('.') or 'params'}_long_values.json")


def numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics and keep the numbers (MLflow metrics are floats)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(numeric(v, key + "."))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)):
            out[key] = float(v)
    return out


def log_history_csv(path: Path, prefix: str) -> None:
    """Step-wise training history from the plots CSV a stage writes (columns: step, <metric>...)."""
    import mlflow
    from mlflow.entities import Metric

    if not path.exists():
        return
    rows = list(csv.DictReader(path.open()))
    batch: list[Metric] = []
    import time

    ts = int(time.time() * 1000)
    for row in rows:
        step = int(float(row["step"]))
        for key, value in row.items():
            if key == "step" or value in ("", None):
                continue
            batch.append(Metric(f"{prefix}{key}", float(value), ts, step))
    client = mlflow.tracking.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])


def _pip_requirements() -> list[str]:
    # Explicit: MLflow's inference of requirements looks for torchvision and fails without it.
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "tokenizers", "safetensors")]


def log_model(model_dir: Path, title: str, task: str) -> str:
    """Log a saved transformers model (safetensors) with the transformers flavour on the active run,
    without registering it (the flow registers once the whole run succeeded: register_produced_models).
    Returns the LoggedModel's id."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.models import classifier_class

    generates_text = task == PIPELINE_TASK["causal-lm"]
    model = (AutoModelForCausalLM if generates_text else classifier_class(model_dir)).from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if generates_text:
        # Signature inference generates text: keep it short so it cannot run past the context length.
        model.generation_config.max_new_tokens = 8
    from huggingface_hub import ModelCard

    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name="model",
        # Our own card: without one MLflow asks the Hugging Face hub for one, which is offline here.
        model_card=ModelCard(
            f"---\nlibrary_name: transformers\n---\n# {title}\n\nlmline's model card is the version's description.\n"
        ),
        task=task,
        pip_requirements=_pip_requirements(),
    )
    return info.model_id


class StageRun:
    """Handle the shell uses inside `stage_run` to log what the stage produced. The run is opened on a
    thread of its own while the stage works (stage_run); the first call that needs it waits for it."""

    def __init__(self, opening: Future):
        self._opening, self._resumed = opening, False

    @property
    def run_id(self) -> str:
        return self._opening.result()

    def _activate(self) -> None:
        """Make the run the active one on this thread (MLflow keeps one active run per thread), so the
        fluent calls below, mlflow.transformers.log_model included, log to it."""
        import mlflow

        if not self._resumed:
            mlflow.start_run(run_id=self.run_id)
            self._resumed = True

    def close(self, status: str) -> None:
        """End the run FINISHED or FAILED. If opening the run failed, a FINISHED stage raises that error;
        a FAILED one keeps its own (the run then never existed, or open_stage_run ended it FAILED)."""
        import mlflow

        try:
            run_id = self.run_id
        except Exception:
            if status == "FINISHED":
                raise
            return
        if self._resumed:
            mlflow.end_run(status)
        else:
            mlflow.tracking.MlflowClient().set_terminated(run_id, status)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self._activate()
        import mlflow

        nums = numeric(metrics)
        if nums:
            mlflow.log_metrics(nums)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._activate()
        import mlflow

        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path or path.name)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path)

    def log_stage_outputs(self, stage: str, params: Params, inputs: dict, outputs: dict, metrics: dict) -> None:
        """Stage-specific extras: step-wise training history, plot images, and the trained model, logged
        on this run but not registered: the retrain flow registers it (register_produced_models) once
        the whole pipeline run succeeded, so a failed run leaves nothing new in the registry."""
        self._activate()
        if "loss" in outputs:
            log_history_csv(Path(outputs["loss"]), "")
        log_plot_images(stage, outputs)
        if stage in REGISTERED:
            kind = STAGES[stage].model
            name = model_name(params.project.name, kind, params.finetune.task)
            task = pipeline_task(kind, params.finetune.task)
            self.set_tags({LOGGED_MODEL_TAG: log_model(Path(outputs["model"]), name, task)})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._activate()
        import mlflow

        mlflow.set_tags(tags)


# ---------------------------------------------------------------- runs left RUNNING by a dead process
OWNER_TAG = "lmline.owner"  # host:pid:start time of the process that holds the run open


def process_owner(pid: int | None = None) -> str:
    """This process as a run's owner. The start time tells a reused pid from the process that died."""
    import socket

    import psutil

    process = psutil.Process(pid or os.getpid())
    return f"{socket.gethostname()}:{process.pid}:{process.create_time():.3f}"


def owner_gone(owner: str) -> bool:
    """True only when `owner` (process_owner's format) names a process of this host that no longer
    runs; a process of another host cannot be checked from here, so it never counts as gone."""
    import socket

    import psutil

    host, _, rest = owner.rpartition(":")[0].rpartition(":")
    try:
        pid, started = int(owner.rsplit(":", 2)[1]), float(owner.rsplit(":", 2)[2])
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        process = psutil.Process(pid)
        # a zombie has died (its parent has not reaped it yet); another start time is another process
        return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - started) > 0.01
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def close_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the experiment's RUNNING runs whose owner process on this host is gone (kill -9,
    a crash, a lost machine's restart): a run never stays RUNNING after its process died. Returns
    the run ids it closed."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(OWNER_TAG)
        if owner and owner_gone(owner):
            client.set_tag(run.info.run_id, "lmline.closed_by", f"{process_owner()}: its process {owner} was gone")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
            log.warning(
                "MLflow run %s (%s) was left RUNNING by a process that died: marked KILLED",
                run.info.run_id,
                run.data.tags.get("mlflow.runName", ""),
            )
    return closed


def open_stage_run(stage: str, params: Params, root: Path, tags: dict[str, str] | None = None) -> str:
    """Everything a stage's run needs before the stage's results: the store (and MLflow) loaded, runs
    of dead processes closed, the run started RUNNING with its tags, params and DVC dep hashes.
    Returns its id. Runs on stage_run's thread, beside the stage's work."""
    import mlflow

    close_dead_runs(setup(params, root))
    parent = os.environ.get(PARENT_ENV) or None
    base_tags = {"lmline.stage": stage, OWNER_TAG: process_owner(), **git_info(root), **(tags or {})}
    run = mlflow.start_run(run_name=stage, parent_run_id=parent, tags=base_tags)
    try:
        section = params.section(stage) if stage in type(params).model_fields else None
        if section is not None:
            log_params(section, f"{stage}.")
        log_params(params.project, "project.")
        try:
            mlflow.set_tags(dvc_dep_hashes(stage, root))
        except Exception as exc:  # lineage tags are best effort
            log.debug("dvc hashes unavailable: %s", exc)
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    return run.info.run_id


@contextlib.contextmanager
def stage_run(
    stage: str, params: Params, root: Path | None = None, tags: dict[str, str] | None = None
) -> Iterator[StageRun]:
    """An MLflow run for one stage: nested under $LMLINE_PARENT_RUN_ID when a pipeline started it.
    It is opened (open_stage_run) on a thread of its own while the body runs the stage, instead of
    before it: importing MLflow and opening its store are seconds of Python that the stage's work
    (torch, tokenizers' Rust, datatrove's worker processes) leaves room for.
    The run ends FAILED if the stage raises; if the process dies instead (kill -9), the next stage or
    pipeline run in this experiment marks it KILLED, so no run is left RUNNING."""
    root = (root or Path.cwd()).resolve()
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-stage-run") as pool:
        tracked = StageRun(pool.submit(open_stage_run, stage, params, root, tags))
        status = "FAILED"
        try:
            yield tracked
            status = "FINISHED"
        finally:
            tracked.close(status)


# ---------------------------------------------------------------- pipeline runs
@contextlib.contextmanager
def parent_run(params: Params, tags: dict[str, str], root: Path | None = None):
    """The pipeline's parent run; stage processes nest under it through $LMLINE_PARENT_RUN_ID."""
    import mlflow

    root = (root or Path.cwd()).resolve()
    close_dead_runs(setup(params, root))
    pipeline_tags = {"lmline.pipeline": "retrain", OWNER_TAG: process_owner(), **git_info(root), **tags}
    with mlflow.start_run(run_name="retrain", tags=pipeline_tags) as run:
        yield run.info.run_id


def log_cached_stage(stage: str, params: Params, metrics: dict, parent_id: str, root: Path | None = None) -> str:
    """A stage DVC skipped still gets a nested run, tagged cached=true, carrying the metrics of the run
    that produced its outputs (named by a tag), so every pipeline run shows the complete picture."""
    import mlflow

    root = (root or Path.cwd()).resolve()
    setup(params, root)
    tags = {
        "lmline.stage": stage,
        "cached": "true",
        "lmline.produced_by_run": str(metrics.get("mlflow_run_id", "unknown")),
        **git_info(root),
    }
    with mlflow.start_run(run_name=stage, parent_run_id=parent_id, tags=tags, nested=True) as run:
        nums = numeric(metrics)
        if nums:
            mlflow.log_metrics(nums)
        return run.info.run_id


def run_tags(run_id: str) -> dict[str, str]:
    import mlflow

    return dict(mlflow.tracking.MlflowClient().get_run(run_id).data.tags)
