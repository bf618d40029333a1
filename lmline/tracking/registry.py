"""The MLflow model registry: reading and moving aliases (all or none), version tags, the registered
models, registering the models a pipeline run produced, fetching a `models:/` URI's model for a while, and
publishing a version's model card (rendered by lmline.modelcard).

Registry errors never pass silently: `alias_version` tells "no such alias" from "cannot tell", and
every other failure is a one-line RegistryError naming the tracking URI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable

from lmline import modelcard
from lmline.config import Params, metrics_path
from lmline.errors import LmlineError
from lmline.stages import REGISTERED, STAGES, model_name
from lmline.tracking.lineage import lineage
from lmline.tracking.runs import LOGGED_MODEL_TAG, numeric, run_tags
from lmline.tracking.store import client, tracking_uri

log = logging.getLogger(__name__)


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
def one_line_errors(what: str):
    """Turn MLflow's errors inside the block into a one-line RegistryError naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise registry_error(what, exc) from None


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
    with one_line_errors(f"reading {name} v{version}"):
        return dict(client().get_model_version(name, str(version)).tags)


def set_version_tags(name: str, version: int | str, tags: dict[str, Any]) -> None:
    with one_line_errors(f"tagging {name} v{version}"):
        c = client()
        for key, value in tags.items():
            c.set_model_version_tag(name, str(version), key, str(value))


def delete_version_tags(name: str, version: int | str, keys: list[str]) -> None:
    """Remove tags (MLflow 3.17 accepts removing one that is not there)."""
    with one_line_errors(f"untagging {name} v{version}"):
        c = client()
        for key in keys:
            c.delete_model_version_tag(name, str(version), key)


def set_alias(name: str, alias: str, version: int | str) -> None:
    with one_line_errors(f"pointing {name}@{alias} at v{version}"):
        client().set_registered_model_alias(name, alias, str(version))


def delete_alias(name: str, alias: str) -> None:
    """Remove an alias; removing one that is not set is not an error (MLflow 3.17 accepts it)."""
    with one_line_errors(f"removing {name}@{alias}"):
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


@contextlib.contextmanager
def local_model(uri: str):
    """A `models:/name/version` or `models:/name@alias` URI -> a local dir with model and tokenizer,
    loadable by transformers' Auto classes, for the `with` block: a registry model is downloaded to a
    temporary dir removed on the way out (a scheduled scoring run, a `lmline classify`, would otherwise
    leave a copy of the model in /tmp each time). Local paths pass through unchanged, never removed."""
    if not uri.startswith("models:/"):
        path = Path(uri)
        if not (path / "config.json").exists():
            raise LmlineError(f"{uri}: no model here (expected a saved transformers model dir with config.json)")
        yield path
        return
    import shutil

    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory(prefix="lmline-model-") as dst:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
        except Exception as exc:
            raise LmlineError(f"{uri}: cannot load from the MLflow registry at {tracking_uri()} ({exc})") from None
        model_dir = local / "model"
        tokenizer_dir = local / "components" / "tokenizer"
        for f in tokenizer_dir.glob("*") if tokenizer_dir.exists() else []:
            shutil.copy2(f, model_dir / f.name)  # one dir, as from_pretrained expects
        yield model_dir


def producing_version(params: Params, stage: str) -> str:
    """`name/version` of the model registered by the run that produced `stage`'s current outputs."""
    metrics_file = metrics_path(params, stage)
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

    from lmline.io import read_json

    base_stage = next(s for s in REGISTERED if STAGES[s].model == "base")
    wanted = [s for s in REGISTERED if s in stages]  # pipeline order: the base model is registered first
    if wanted and base_stage not in wanted:
        wanted = list(REGISTERED)  # a fine-tuned version names its base version: lineage needs both
    c = client()
    # Resolve everything before the first write: a model that cannot be found must not leave the other half registered.
    found = []
    for stage in wanted:
        metrics_file = Path(root) / metrics_path(params, stage)
        metrics = read_json(metrics_file) if metrics_file.exists() else {}
        run_id = metrics.get("mlflow_run_id")
        if not run_id:
            raise LmlineError(
                f"{metrics_file}: no mlflow_run_id, so no logged model to register (has the {stage} stage run?)"
            )
        name = model_name(params.project.name, STAGES[stage].model, params.finetune.task)
        try:
            logged = c.get_run(run_id).data.tags.get(LOGGED_MODEL_TAG)
        except MlflowException:
            raise LmlineError(
                f"{metrics_file}: its run {run_id} is not in the tracking store at {tracking_uri()}"
            ) from None
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
            if STAGES[stage].model == "task" and base_stage in registered:
                tags["lmline.base_model"] = registered[base_stage]
            try:
                c.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            mv = c.create_model_version(
                name, source=f"models:/{logged}", run_id=run_id, tags=tags, await_creation_for=0, model_id=logged
            )
            version, new = int(mv.version), True
            log.info("registered %s v%s from run %s", name, version, run_id)
        c.set_tag(run_id, "lmline.registered_model", name)
        c.set_tag(run_id, "lmline.model_version", str(version))
        registered[stage] = f"{name}/{version}"
        if new or evaluated:
            publish_model_card(params, Path(root), name, version, upto="evaluate" if evaluated else stage)
    return registered


DESCRIPTION_LIMIT = 5000  # MLflow's model_versions.description column; the artifact holds the whole card


def publish_model_card(params: Params, root: Path, name: str, version: int | str, upto: str) -> str:
    """Render the version's card from the metrics files of the stages up to `upto` and its lineage;
    log it as `model_card.md` on the version's run and set it as the version's description. Best
    effort: a card that cannot be written is logged as a warning, never a failed stage."""
    try:
        metrics, samples = modelcard.read_inputs(params, root, upto)
        card = modelcard.render(params, f"{name}/{version}", metrics, samples, lineage(f"models:/{name}/{version}"))
        c = client()
        c.log_text(c.get_model_version(name, str(version)).run_id, card, "model_card.md")
        description = card
        if len(card) > DESCRIPTION_LIMIT:
            description = card[: DESCRIPTION_LIMIT - 80].rsplit("\n", 1)[0]
            description += "\n\n(cut here: the whole card is the run's model_card.md)\n"
        c.update_model_version(name, str(version), description=description)
        return card
    except Exception as exc:
        log.warning("model card for %s v%s not written: %s", name, version, exc)
        return ""
