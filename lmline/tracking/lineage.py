"""Where a run and a registered version come from: the git commit and DVC dep hashes a stage run is
tagged with, the Prefect flow run behind a pipeline run, and `lineage()`, which reads them all back
for a registered version (and, recursively, the base model it was fine-tuned from).

The git and DVC facts are best effort: a stage never fails because they cannot be read.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
from pathlib import Path

from lmline.errors import LmlineError
from lmline.tracking.store import client, tracking_uri

log = logging.getLogger(__name__)


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


VARIABLE = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


def stage_deps(stage: str, root: Path) -> list[str]:
    """The stage's deps as `dvc repro` resolves them. dvc.yaml interpolates only ${paths.*}, from
    params.yaml (DVC's default vars): resolved here with yaml alone. DVC's own resolver (dvc.repo.Repo)
    took ~1.5 s of every stage process; it stays the fallback for anything else dvc.yaml may hold."""
    import yaml

    entry = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}).get(stage)
    if entry is None or "foreach" in entry or "matrix" in entry or "vars" in entry:
        return dvc_resolved_deps(stage, root)
    params_file = root / "params.yaml"
    values = (yaml.safe_load(params_file.read_text()) or {}) if params_file.exists() else {}

    def lookup(match: re.Match) -> str:
        value = values
        for key in match.group(1).split("."):
            value = value[key]  # a KeyError (an unknown variable) falls back to DVC below
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"${{{match.group(1)}}} is not a scalar")
        return str(value)

    # a `params:` entry is a dep on its file: params.yaml for a plain key, else the file it names
    params_files = {"params.yaml" if isinstance(item, str) else next(iter(item)) for item in entry.get("params", [])}
    try:
        deps = [str(Path(VARIABLE.sub(lookup, str(dep)))) for dep in entry.get("deps", [])]
    except (KeyError, TypeError):
        return dvc_resolved_deps(stage, root)
    return deps + sorted(params_files - set(deps))


def dvc_resolved_deps(stage: str, root: Path) -> list[str]:
    from dvc.repo import Repo  # resolves interpolation the way `dvc repro` does

    with Repo(str(root)) as repo:
        st = next((s for s in repo.index.stages if getattr(s, "name", None) == stage), None)
        return [str(Path(d.def_path)) for d in st.deps] if st else []


def dvc_dep_hashes(stage: str, root: Path) -> dict[str, str]:
    """DVC hashes of the stage's deps: a dir's hash from dvc.lock (where an upstream stage recorded
    it as an out), a file's plain md5 (what DVC 3 records for files)."""
    import yaml

    dvc_yaml, lock = root / "dvc.yaml", root / "dvc.lock"
    if not dvc_yaml.exists():
        return {}
    try:
        deps = stage_deps(stage, root)
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
