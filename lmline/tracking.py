"""The one place that talks to MLflow. Stages return metrics; this module logs them (and the params,
artifacts, models and lineage tags) around a stage's run(). Pure stage code never imports mlflow.

Tracking URI: MLFLOW_TRACKING_URI if set, else the embedded default `sqlite:///<root>/mlflow.db`
with artifacts in `<root>/mlartifacts` (git-ignored). A stage run nests under the pipeline's parent
run when LMLINE_PARENT_RUN_ID is set (the flow sets it); started alone it is a top-level run.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from lmline.config import Params, flatten, metrics_path
from lmline.errors import LmlineError

PARENT_ENV = "LMLINE_PARENT_RUN_ID"
MLFLOW_PARAM_LIMIT = 6000  # MLflow rejects longer param values: those go in as an artifact instead

log = logging.getLogger("lmline.tracking")


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


PROBE_TIMEOUT_S = 5.0  # how long a tracking server gets to answer /health before a run gives up on it


def check_server(uri: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail in one line, within `timeout_s`, when the tracking server does not answer. MLflow's own
    client retries a dead server for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7, with
    back-off; MLFLOW_HTTP_REQUEST_TIMEOUT, default 120 s per request): those still apply should it
    go away after this check. A file or sqlite store needs no check."""
    from lmline.errors import LmlineError

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    reason = health_error(uri, timeout_s)
    if reason:
        raise LmlineError(f"the MLflow tracking server at {uri} does not answer ({reason}); "
                          "start it or point MLFLOW_TRACKING_URI elsewhere")


def health_error(base_url: str, timeout_s: float) -> str:
    """Why the server at `base_url` does not answer its /health within `timeout_s`, or '' if it does
    (MLflow's and Prefect's servers both have one)."""
    import urllib.request

    try:
        urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=timeout_s).close()
    except OSError as exc:  # refused, unresolvable, timed out, or an HTTP error status
        return str(getattr(exc, "reason", None) or exc)
    return ""


def setup(params: Params, root: Path | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the experiment id."""
    import mlflow

    root = (root or Path.cwd()).resolve()
    check_server(tracking_uri(root))
    mlflow.set_tracking_uri(tracking_uri(root))
    name = params.project.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        # Only the embedded (sqlite) default needs an explicit artifact root; a server knows its own.
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else (root / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent stage
            pass
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise LookupError(f"MLflow experiment {name!r} could not be created at {tracking_uri(root)}")
    # also on the creating call: else the first run of a fresh store lands in the Default experiment
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


def git_info(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(dirty)).lower()}


def _md5(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def dvc_dep_hashes(stage: str, root: Path) -> dict[str, str]:
    """DVC hashes of the stage's deps: a dir's hash from dvc.lock (where an upstream stage recorded
    it as an out), a file's plain md5 (what DVC 3 records for files)."""
    import yaml

    dvc_yaml, lock = root / "dvc.yaml", root / "dvc.lock"
    if not dvc_yaml.exists():
        return {}
    from dvc.repo import Repo  # resolves ${paths.*} interpolation the way `dvc repro` does

    try:
        with Repo(str(root)) as repo:
            st = next((s for s in repo.index.stages if getattr(s, "name", None) == stage), None)
            deps = [str(Path(d.def_path)) for d in st.deps] if st else []
    except Exception as exc:  # lineage is best effort; never fail a stage over it
        log.debug("could not read dvc.yaml deps: %s", exc)
        return {}
    recorded: dict[str, str] = {}
    if lock.exists():
        for entry in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            for out in entry.get("outs", []):
                recorded[str(Path(out["path"]))] = out.get("md5", "")
    hashes = {}
    for dep in deps:
        p = root / dep
        if p.is_file():
            hashes[f"dvc.dep.{dep}"] = _md5(p)
        elif dep in recorded:
            hashes[f"dvc.dep.{dep}"] = recorded[dep]
    return hashes


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


REGISTERED_STAGES = ("pretrain", "finetune")
PIPELINE_TASK = {"causal-lm": "text-generation", "classification": "text-classification"}


def registered_model(params: Params, stage: str) -> tuple[str, str]:
    """Registry name and transformers pipeline task of the model a stage produces."""
    if stage == "pretrain":
        return f"{params.project.name}-base", PIPELINE_TASK["causal-lm"]
    return f"{params.project.name}-{params.finetune.task}", PIPELINE_TASK[params.finetune.task]


def _pip_requirements() -> list[str]:
    # Explicit: MLflow's inference of requirements looks for torchvision and fails without it.
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "tokenizers", "safetensors")]


LOGGED_MODEL_TAG = "lmline.logged_model_id"  # on a stage run: the LoggedModel the flow registers if the run succeeds


def log_model(model_dir: Path, title: str, task: str) -> str:
    """Log a saved transformers model (safetensors) with the transformers flavour on the active run,
    without registering it (the flow registers once the whole run succeeded: register_produced_models).
    Returns the LoggedModel's id."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForCausalLM if task == PIPELINE_TASK["causal-lm"] else AutoModelForSequenceClassification
    model = auto.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if task == PIPELINE_TASK["causal-lm"]:
        # Signature inference generates text: keep it short so it cannot run past the context length.
        model.generation_config.max_new_tokens = 8
    from huggingface_hub import ModelCard

    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name="model",
        # Our own card: without one MLflow asks the Hugging Face hub for one, which is offline here.
        model_card=ModelCard(f"---\nlibrary_name: transformers\n---\n# {title}\n\nlmline's model card is the version's description.\n"),
        task=task,
        pip_requirements=_pip_requirements(),
    )
    return info.model_id


def producing_version(params: Params, stage: str) -> str:
    """`name/version` of the model registered by the run that produced `stage`'s current outputs."""
    metrics_file = Path(params.paths.metrics) / f"{stage}.json"
    if not metrics_file.exists():
        return ""
    run_id = json.loads(metrics_file.read_text()).get("mlflow_run_id")
    if not run_id:
        return ""
    try:
        tags = run_tags(run_id)
    except Exception:  # a run from another tracking store
        return ""
    name, version = tags.get("lmline.registered_model"), tags.get("lmline.model_version")
    return f"{name}/{version}" if name and version else ""


def register_produced_models(params: Params, root: Path, stages: Iterable[str], evaluated: bool) -> dict[str, str]:
    """Register the models behind the current outputs of `stages` (pretrain, finetune; a fine-tune's
    base model with it), each once: the flow calls this after every selected stage succeeded, so a run
    that fails anywhere leaves the registry as it was. The producing run is the one metrics/<stage>.json
    names, so a model logged by a cached stage whose own flow run failed later is registered now.
    A version that already exists for that run is reused, never duplicated. Sets the run tags
    lmline.registered_model / lmline.model_version, a new version's metric.* tags and (fine-tune)
    lmline.base_model, and publishes the cards: every one up to evaluate when `evaluated` (this run
    evaluated these very models), else a new version's up to its stage. Returns {stage: name/version}."""
    from mlflow.exceptions import MlflowException

    from lmline.errors import LmlineError
    from lmline.io import read_json

    wanted = [s for s in REGISTERED_STAGES if s in stages]
    if wanted == ["finetune"]:
        wanted = list(REGISTERED_STAGES)  # a fine-tuned version names its base version: lineage needs both
    c = client()
    # Resolve everything before the first write: a model that cannot be found must not leave the other half registered.
    found = []
    for stage in wanted:
        metrics_file = Path(root) / metrics_path(params, stage)
        metrics = read_json(metrics_file) if metrics_file.exists() else {}
        run_id = metrics.get("mlflow_run_id")
        if not run_id:
            raise LmlineError(f"{metrics_file}: no mlflow_run_id, so no logged model to register (has the {stage} stage run?)")
        name, _ = registered_model(params, stage)
        try:
            logged = c.get_run(run_id).data.tags.get(LOGGED_MODEL_TAG)
        except MlflowException:
            raise LmlineError(f"{metrics_file}: its run {run_id} is not in the tracking store at {tracking_uri()}") from None
        existing = c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if not existing and not logged:
            raise LmlineError(f"{metrics_file}: run {run_id} logged no model (no {LOGGED_MODEL_TAG} tag)")
        found.append((stage, name, run_id, metrics, logged, existing))

    registered: dict[str, str] = {}
    for stage, name, run_id, metrics, logged, existing in found:
        if existing:
            version, new = min(int(v.version) for v in existing), False
        else:
            tags = {f"metric.{key}": f"{value:.6g}" for key, value in numeric(metrics).items()}
            if stage == "finetune" and "pretrain" in registered:
                tags["lmline.base_model"] = registered["pretrain"]
            try:
                c.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            mv = c.create_model_version(name, source=f"models:/{logged}", run_id=run_id, tags=tags,
                                        await_creation_for=0, model_id=logged)
            version, new = int(mv.version), True
            log.info("registered %s v%s from run %s", name, version, run_id)
        c.set_tag(run_id, "lmline.registered_model", name)
        c.set_tag(run_id, "lmline.model_version", str(version))
        registered[stage] = f"{name}/{version}"
        if new or evaluated:
            publish_model_card(params, Path(root), name, version, upto="evaluate" if evaluated else stage)
    return registered


def resolve_model_uri(uri: str, dst: Path | None = None) -> Path:
    """A `models:/name/version` or `models:/name@alias` URI -> a local dir with model and tokenizer,
    loadable by transformers' Auto classes. Local paths pass through unchanged."""
    from lmline.errors import LmlineError

    if not uri.startswith("models:/"):
        path = Path(uri)
        if not (path / "config.json").exists():
            raise LmlineError(f"{uri}: no model here (expected a saved transformers model dir with config.json)")
        return path
    import mlflow
    import shutil

    mlflow.set_tracking_uri(tracking_uri())
    dst = dst or Path(tempfile.mkdtemp(prefix="lmline-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:
        raise LmlineError(f"{uri}: cannot load from the MLflow registry at {tracking_uri()} ({exc})") from None
    model_dir = local / "model"
    tokenizer_dir = local / "components" / "tokenizer"
    for f in tokenizer_dir.glob("*") if tokenizer_dir.exists() else []:
        shutil.copy2(f, model_dir / f.name)  # one dir, as from_pretrained expects
    return model_dir


# ---------------------------------------------------------------- model cards and plot images
DESCRIPTION_LIMIT = 5000  # MLflow's model_versions.description column; the artifact holds the whole card


def publish_model_card(params: Params, root: Path, name: str, version: int | str, upto: str) -> str:
    """Render the version's card from the metrics files of the stages up to `upto` and its lineage;
    log it as `model_card.md` on the version's run and set it as the version's description. Best
    effort: a card that cannot be written is logged as a warning, never a failed stage."""
    from lmline import modelcard

    try:
        metrics, samples = modelcard.read_inputs(params, root, upto)
        card = modelcard.render(params, f"{name}/{version}", metrics, samples, lineage(f"models:/{name}/{version}"))
        c = client()
        c.log_text(c.get_model_version(name, str(version)).run_id, card, "model_card.md")
        description = card if len(card) <= DESCRIPTION_LIMIT else (
            card[: DESCRIPTION_LIMIT - 80].rsplit("\n", 1)[0] + "\n\n(cut here: the whole card is the run's model_card.md)\n")
        c.update_model_version(name, str(version), description=description)
        return card
    except Exception as exc:
        log.warning("model card for %s v%s not written: %s", name, version, exc)
        return ""


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _curves(ax, rows: list[dict], columns: list[str]) -> None:
    for column in columns:
        points = [(float(r["step"]), float(r[column])) for r in rows if r.get(column) not in ("", None)]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=column)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)


def plot_figures(stage: str, outputs: dict) -> dict:
    """The plots dvc.yaml defines, as matplotlib figures named like their CSV: loss curves, the per-rule
    cleaning drops, the confusion matrix. Only from files the stage wrote."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    figures = {}
    loss = outputs.get("loss")
    if loss and Path(loss).exists():
        rows = _read_csv(Path(loss))
        columns = [c for c in rows[0] if c != "step"] if rows else []
        losses, others = [c for c in columns if c.endswith("loss")], [c for c in columns if not c.endswith("loss")]
        fig, axes = plt.subplots(1, 1 + bool(others), figsize=(6 + 5 * bool(others), 4), squeeze=False)
        _curves(axes[0][0], rows, losses)
        axes[0][0].set_title(f"{stage} loss")
        if others:
            _curves(axes[0][1], rows, others)
            axes[0][1].set_title(f"{stage} validation metrics")
        figures[Path(loss).stem] = fig
    drops = outputs.get("drops")
    if drops and Path(drops).exists():
        rows = _read_csv(Path(drops))
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
        ax.barh([r["bar"] for r in rows], [int(r["dropped"]) for r in rows])
        ax.invert_yaxis()  # first rule on top, as in the CSV
        ax.set_xlabel("documents dropped")
        ax.set_title("cleaning: documents dropped per source and rule")
        figures[Path(drops).stem] = fig
    confusion = outputs.get("confusion")
    rows = _read_csv(Path(confusion)) if confusion and Path(confusion).exists() else []
    if rows:  # causal-lm's evaluate writes the header only: no classes, no matrix
        labels = sorted({r["actual"] for r in rows} | {r["predicted"] for r in rows})
        counts = [[sum(1 for r in rows if r["actual"] == a and r["predicted"] == p) for p in labels] for a in labels]
        fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
        ax.imshow(counts, cmap="Blues")
        darkest = max(max(row) for row in counts)
        for i, row in enumerate(counts):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", color="white" if n > darkest / 2 else "black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title("test confusion matrix")
        figures[Path(confusion).stem] = fig
    return figures


def log_plot_images(stage: str, outputs: dict) -> None:
    import mlflow

    figures = plot_figures(stage, outputs)
    import matplotlib.pyplot as plt  # after plot_figures chose the Agg backend

    for name, fig in figures.items():
        fig.tight_layout()
        mlflow.log_figure(fig, f"plots/{name}.png")
        plt.close(fig)


class StageRun:
    """Handle the shell uses inside `stage_run` to log what the stage produced."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        import mlflow

        nums = numeric(metrics)
        if nums:
            mlflow.log_metrics(nums)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path or path.name)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path)

    def log_stage_outputs(self, stage: str, params: Params, inputs: dict, outputs: dict, metrics: dict) -> None:
        """Stage-specific extras: step-wise training history, plot images, and the trained model, logged
        on this run but not registered: the retrain flow registers it (register_produced_models) once
        the whole pipeline run succeeded, so a failed run leaves nothing new in the registry."""
        if "loss" in outputs:
            log_history_csv(Path(outputs["loss"]), "")
        log_plot_images(stage, outputs)
        if stage in REGISTERED_STAGES:
            name, task = registered_model(params, stage)
            self.set_tags({LOGGED_MODEL_TAG: log_model(Path(outputs["model"]), name, task)})

    def set_tags(self, tags: dict[str, str]) -> None:
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
            log.warning("MLflow run %s (%s) was left RUNNING by a process that died: marked KILLED",
                        run.info.run_id, run.data.tags.get("mlflow.runName", ""))
    return closed


@contextlib.contextmanager
def stage_run(stage: str, params: Params, root: Path | None = None, tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """An MLflow run for one stage: nested under $LMLINE_PARENT_RUN_ID when a pipeline started it.
    The run ends FAILED if the stage raises; if the process dies instead (kill -9), the next stage or
    pipeline run in this experiment marks it KILLED, so no run is left RUNNING."""
    import mlflow

    root = (root or Path.cwd()).resolve()
    close_dead_runs(setup(params, root))
    parent = os.environ.get(PARENT_ENV) or None
    base_tags = {"lmline.stage": stage, OWNER_TAG: process_owner(), **git_info(root), **(tags or {})}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=base_tags) as run:
        section = params.section(stage) if stage in type(params).model_fields else None
        if section is not None:
            log_params(section, f"{stage}.")
        log_params(params.project, "project.")
        try:
            mlflow.set_tags(dvc_dep_hashes(stage, root))
        except Exception as exc:  # lineage tags are best effort
            log.debug("dvc hashes unavailable: %s", exc)
        yield StageRun(run.info.run_id)


# ---------------------------------------------------------------- pipeline runs
@contextlib.contextmanager
def parent_run(params: Params, tags: dict[str, str], root: Path | None = None):
    """The pipeline's parent run; stage processes nest under it through $LMLINE_PARENT_RUN_ID."""
    import mlflow

    root = (root or Path.cwd()).resolve()
    close_dead_runs(setup(params, root))
    run_tags = {"lmline.pipeline": "retrain", OWNER_TAG: process_owner(), **git_info(root), **tags}
    with mlflow.start_run(run_name="retrain", tags=run_tags) as run:
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


# ---------------------------------------------------------------- registry
# The promotion gate fails closed: the only registry errors that mean "nothing there" are the two an
# MLflow 3.17 store raises for a missing alias or model (checked on a real SQLite store):
#   get_model_version_by_alias on a model without that alias -> INVALID_PARAMETER_VALUE,
#       "Registered model alias <alias> not found." (the same code as a malformed alias name, hence the message check)
#   any call naming a registered model that does not exist -> RESOURCE_DOES_NOT_EXIST
# (through `mlflow server` the same codes arrive, the message prefixed "INVALID_PARAMETER_VALUE: ").
# Anything else (a locked database is TEMPORARILY_UNAVAILABLE, a server failing after its retries,
# a bad request) is a RegistryError: one line naming the tracking URI, and the caller moves nothing.
class RegistryError(LmlineError):
    """The MLflow registry could not answer or refused a change; the message names the tracking URI."""


def registry_error(what: str, exc: Exception) -> RegistryError:
    message = getattr(exc, "message", None) or str(exc)
    first = (str(message).strip().splitlines() or [type(exc).__name__])[0]
    return RegistryError(f"MLflow registry at {tracking_uri()}: {what} failed ({first})")


@contextlib.contextmanager
def registry(what: str):
    """Turn MLflow's errors inside the block into a one-line RegistryError naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise registry_error(what, exc) from None


def client():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.tracking.MlflowClient()


def _is_missing_alias(exc, alias: str) -> bool:
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

    code = exc.error_code
    if code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
        return True  # the registered model does not exist (yet): no version can hold the alias
    # a store says it as is; through `mlflow server` the RestException prefixes the code
    message = exc.message.strip().removeprefix(f"{code}: ")
    return code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and message == f"Registered model alias {alias} not found."


def alias_version(name: str, alias: str):
    """The ModelVersion an alias points at; None only when the alias (or the model) does not exist.
    Any other registry error raises RegistryError: "cannot tell" must never read as "no champion"."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _is_missing_alias(exc, alias):
            return None
        raise registry_error(f"reading {name}@{alias}", exc) from None


def version_tags(name: str, version: int | str) -> dict[str, str]:
    with registry(f"reading {name} v{version}"):
        return dict(client().get_model_version(name, str(version)).tags)


def set_version_tags(name: str, version: int | str, tags: dict[str, Any]) -> None:
    with registry(f"tagging {name} v{version}"):
        c = client()
        for key, value in tags.items():
            c.set_model_version_tag(name, str(version), key, str(value))


def delete_version_tags(name: str, version: int | str, keys: list[str]) -> None:
    """Remove tags (MLflow 3.17 accepts removing one that is not there)."""
    with registry(f"untagging {name} v{version}"):
        c = client()
        for key in keys:
            c.delete_model_version_tag(name, str(version), key)


def set_alias(name: str, alias: str, version: int | str) -> None:
    with registry(f"pointing {name}@{alias} at v{version}"):
        client().set_registered_model_alias(name, alias, str(version))


def delete_alias(name: str, alias: str) -> None:
    """Remove an alias; removing one that is not set is not an error (MLflow 3.17 accepts it)."""
    with registry(f"removing {name}@{alias}"):
        client().delete_registered_model_alias(name, alias)


def move_aliases(moves: list[tuple[str, str, int | str | None]]) -> None:
    """Apply (model, alias, version or None to remove) moves all or none: if one fails, the ones already
    made are put back as they were, and the RegistryError is raised."""
    before = []
    for name, alias, _ in moves:
        current = alias_version(name, alias)
        before.append(None if current is None else current.version)
    done: list[int] = []
    try:
        for i, (name, alias, version) in enumerate(moves):
            if version is None:
                delete_alias(name, alias)
            else:
                set_alias(name, alias, version)
            done.append(i)
    except RegistryError:
        for i in reversed(done):
            name, alias, _ = moves[i]
            if before[i] is None:
                delete_alias(name, alias)
            else:
                set_alias(name, alias, before[i])
        raise


def list_models(prefix: str = "") -> list[dict]:
    """Registered models and their versions with aliases, tags and creation time (newest first)."""
    c = client()
    out = []
    for rm in c.search_registered_models():
        if prefix and not rm.name.startswith(prefix):
            continue
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        versions = c.search_model_versions(f"name='{rm.name}'")
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            out.append(
                {
                    "name": rm.name,
                    "version": int(mv.version),
                    "aliases": sorted(aliases_by_version.get(str(mv.version), [])),
                    "created": mv.creation_timestamp,
                    "run_id": mv.run_id,
                    "tags": dict(mv.tags),
                }
            )
    return out


def model_version(uri: str):
    """`models:/name/version` or `models:/name@alias` -> ModelVersion."""
    from mlflow.exceptions import MlflowException

    from lmline.errors import LmlineError

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
