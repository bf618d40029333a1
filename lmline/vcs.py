"""git and DVC, the one place lmline calls them: subprocesses, and DVC's Python API for workspace state.

Base layer: imports nothing of lmline's but errors. lmline.data (`lmline data add`), the flows (routing
a stage to another worker's clone) and the CLI all reach git and DVC through these functions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

import yaml

from lmline.errors import LmlineError

log = logging.getLogger(__name__)

GIT_REMOTE = "origin"  # where snapshots go and workers fetch from
# Snapshots are machine commits: same author everywhere, whatever the host's git config says.
SNAPSHOT_AUTHOR = {
    "GIT_AUTHOR_NAME": "lmline",
    "GIT_AUTHOR_EMAIL": "lmline@localhost",
    "GIT_COMMITTER_NAME": "lmline",
    "GIT_COMMITTER_EMAIL": "lmline@localhost",
}
# A commit id: SHA-1, or SHA-256 in a repository that uses it.
COMMIT_ID = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


# ---------------------------------------------------------------- subprocesses
def dvc_command(*args: str) -> list[str]:
    """`dvc ARGS` as this interpreter's DVC: the one the project installed, whatever PATH holds."""
    return [sys.executable, "-m", "dvc", *args]


def git(root: Path, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise LmlineError(f"git {args[0]} in {root} failed: {last[0]}")
    return out.stdout.strip()


def dvc(root: Path, *args: str) -> str:
    out = subprocess.run(dvc_command(*args), cwd=root, capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise LmlineError(f"dvc {' '.join(args)} in {root} failed: {last[0]}")
    return out.stdout


def has_git_remote(root: Path) -> bool:
    return subprocess.run(["git", "remote", "get-url", GIT_REMOTE], cwd=root, capture_output=True).returncode == 0


def remote_lacks_ref(root: Path, ref: str) -> bool:
    """True when the git remote answers and has no `ref` (pushing it would create it)."""
    listed = subprocess.run(
        ["git", "ls-remote", "--end-of-options", GIT_REMOTE, ref], cwd=root, capture_output=True, text=True
    )
    return listed.returncode == 0 and not listed.stdout.strip()


def delete_remote_ref(root: Path, ref: str) -> None:
    """Remove `ref` from the git remote; best effort (an undo step: nothing left to do if it fails)."""
    subprocess.run(["git", "push", "--quiet", GIT_REMOTE, "--delete", ref], cwd=root, capture_output=True)


# ---------------------------------------------------------------- values from outside, checked before git sees them
def check_git_ref(ref: str, what: str = "git_ref") -> str:
    """A ref from a flow parameter, an event payload or params, checked before git sees it: a value
    like `--upload-pack=CMD` would be read as an option and run CMD."""
    if (
        not isinstance(ref, str)
        or not ref
        or ref.startswith("-")
        or subprocess.run(["git", "check-ref-format", "--allow-onelevel", ref], capture_output=True).returncode
    ):
        raise LmlineError(f"{what} {ref!r} is not a valid git ref name")
    return ref


def check_revision(revision: str, what: str = "revision") -> str:
    if not isinstance(revision, str) or not COMMIT_ID.fullmatch(revision):
        raise LmlineError(f"{what} {revision!r} must be a full commit id (40 hex digits)")
    return revision


def check_git_inputs(git_ref: str | None, revision: str | None) -> None:
    """The git_ref / revision a run was given (flow parameters, filled from event payloads); empty: none."""
    if git_ref:
        check_git_ref(git_ref, "git_ref")
    if revision:
        check_revision(revision, "revision")


# ---------------------------------------------------------------- workspace snapshots
def untracked(root: Path, env: dict, *pathspecs: str) -> list[str]:
    """Files matching `pathspecs` that git does not track and does not ignore."""
    listed = git(root, "ls-files", "-z", "--others", "--exclude-standard", "--", *pathspecs, env=env)
    return [p for p in listed.split("\0") if p]


def snapshot(root: Path, ref: str, include: tuple[str, ...] | list[str] = ()) -> str:
    """Commit the workspace as it is (uncommitted params and dvc.lock included) and push the commit to
    `ref`, leaving the branch and the index alone; returns the commit.

    The commit holds what git tracks (as it is now, edits included) plus params.yaml, dvc.lock, new
    .dvc files with the .gitignore DVC writes beside them, and `include` (a params file elsewhere);
    never other untracked files: a stray .env or raw data meant for DVC would be pushed to origin."""
    check_git_ref(ref, "snapshot ref")
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        shutil.copy(root / git(root, "rev-parse", "--git-path", "index"), index)
        env = {**os.environ, "GIT_INDEX_FILE": str(index), **SNAPSHOT_AUTHOR}
        git(root, "add", "--update", env=env)
        named = untracked(root, env, "params.yaml", "dvc.lock", "*.dvc", *include)
        gitignores = sorted({(PurePosixPath(p).parent / ".gitignore").as_posix() for p in named if p.endswith(".dvc")})
        named += untracked(root, env, *gitignores) if gitignores else []
        if named:
            git(root, "add", "--", *named, env=env)
        tree = git(root, "write-tree", env=env)
        commit = git(root, "commit-tree", tree, "-p", "HEAD", "-m", f"lmline snapshot for {ref}", env=env)
    # A bare sha cannot be fetched by another clone; a ref pointing at it can.
    git(root, "push", "--quiet", "--force", GIT_REMOTE, f"{commit}:{ref}")
    return commit


# ---------------------------------------------------------------- DVC state of a workspace (DVC's Python API)
# DVC's modules are imported inside these functions: they add about 0.3 s to every `lmline` command,
# and only distributed mode and `lmline data add` need them.
def dvc_default_remote(root: Path) -> str | None:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.config["core"].get("remote")


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


def stage_changes(root: Path) -> tuple[list[str], dict] | None:
    """dvc.yaml's stage names, in order, and what `dvc status` says changed; None outside a DVC workspace."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return [s.name for s in repo.index.stages], repo.status()
    except NotDvcRepoError:
        return None


def up_to_date_stages(root: Path) -> set[str]:
    """The stages `dvc status` finds up to date (deps, params and outs as dvc.lock records them): one
    in-process status of the whole pipeline, a fraction of a second, where a `dvc repro --single-item`
    subprocess per stage costs most of a second each."""
    changes = stage_changes(root)
    if changes is None:
        return set()
    names, changed = changes
    return {name for name in names if name not in changed}


def is_clean(root: Path, stage: str) -> bool:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return not repo.status(targets=[stage])


def lock_entry(root: Path, stage: str) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]


def record_lock_entry(root: Path, stage: str, entry: dict) -> None:
    """Write a stage's lock entry as `dvc repro` would have: no public DVC API takes one, so use the
    YAML round-trip DVC itself uses for dvc.lock."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(root / "dvc.lock") as lock:
        lock.setdefault("schema", "2.0")
        lock.setdefault("stages", {})[stage] = entry


# ---------------------------------------------------------------- facts a run is tagged with
def git_info(root: Path) -> dict[str, str]:
    """The commit a run's code comes from, and whether tracked files differ from it. Best effort (a run
    outside git is tagged `unknown`): lineage never fails a stage."""

    def best_effort(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = best_effort("rev-parse", "HEAD")
    dirty = best_effort("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(dirty)).lower()}


def _md5(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


VARIABLE = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


def stage_deps(stage: str, root: Path) -> list[str]:
    """The stage's deps as `dvc repro` resolves them. dvc.yaml interpolates only ${paths.*}, from
    params.yaml (DVC's default vars): resolved here with yaml alone, because DVC's own resolver
    (dvc.repo.Repo) opens the whole repo, the largest start-up cost of a stage process after MLflow
    (cProfile). It stays the fallback for anything else dvc.yaml may hold."""

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
