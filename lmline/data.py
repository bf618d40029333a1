"""Data under version control: git and DVC helpers, workspace snapshots, and `lmline data add`.

`lmline data add PATH --source NAME` puts new data where the source reads it (text files are copied
into the glob's directory; JSONL/CSV rows and Parquet tables are appended to the source's file), puts
that place under DVC (`dvc add`, and `dvc push` when a default remote is set), snapshots the workspace
to a git ref, and emits a `lmline.data.updated` Prefect event naming the source, the new DVC hash and
the snapshot: the retrain deployment's trigger trains exactly that snapshot.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

import yaml

from lmline.config import CsvSource, JsonlSource, ParquetSource, Params, SampleSource, Source, TextFilesSource
from lmline.errors import LmlineError
from lmline.io import atomic_path

EVENT = "lmline.data.updated"
GIT_REMOTE = "origin"  # where snapshots go and workers fetch from
# Snapshots are machine commits: same author everywhere, whatever the host's git config says.
SNAPSHOT_AUTHOR = {"GIT_AUTHOR_NAME": "lmline", "GIT_AUTHOR_EMAIL": "lmline@localhost",
                   "GIT_COMMITTER_NAME": "lmline", "GIT_COMMITTER_EMAIL": "lmline@localhost"}


# ---------------------------------------------------------------- git and dvc, as subprocesses
def git(root: Path, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise LmlineError(f"git {args[0]} in {root} failed: {last[0]}")
    return out.stdout.strip()


def dvc(root: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise LmlineError(f"dvc {' '.join(args)} in {root} failed: {last[0]}")
    return out.stdout


def has_git_remote(root: Path) -> bool:
    return subprocess.run(["git", "remote", "get-url", GIT_REMOTE], cwd=root, capture_output=True).returncode == 0


def dvc_default_remote(root: Path) -> str | None:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.config["core"].get("remote")


# A commit id: SHA-1, or SHA-256 in a repository that uses it.
COMMIT_ID = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


def check_git_ref(ref: str, what: str = "git_ref") -> str:
    """A ref from a flow parameter, an event payload or params, checked before git sees it: a value
    like `--upload-pack=CMD` would be read as an option and run CMD."""
    if not isinstance(ref, str) or not ref or ref.startswith("-") or subprocess.run(
            ["git", "check-ref-format", "--allow-onelevel", ref], capture_output=True).returncode:
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


# ---------------------------------------------------------------- adding data to a source
def source_place(source: Source) -> Path:
    """What DVC tracks for a source: a text_files source's directory (the glob's fixed part), else its file."""
    if isinstance(source, TextFilesSource):
        dirs = Path(source.path).parts[:-1]
        fixed = []
        for part in dirs:
            if any(c in part for c in "*?["):
                break
            fixed.append(part)
        return Path(*fixed)
    return Path(source.path)


def find_source(params: Params, name: str) -> Source:
    by_name = {s.name: s for s in params.ingest.sources}
    if name not in by_name:
        raise LmlineError(f"--source {name!r} names no source in ingest.sources ({', '.join(by_name)})")
    source = by_name[name]
    if isinstance(source, SampleSource):
        raise LmlineError(f"source {name!r} is a sample (fetched, not stored): add data to a file source")
    if isinstance(source, TextFilesSource) and source_place(source) == Path(params.paths.corpus):
        raise LmlineError(f"source {name!r}: its glob {source.path!r} must sit in a directory below {params.paths.corpus}/")
    return source


def matches_glob(path: PurePosixPath, pattern: str) -> bool:
    """Would ingest's glob.glob(pattern, recursive=True) find `path`? (In fnmatch `*` crosses `/`.)"""
    if "**" in pattern:
        return fnmatch.fnmatch(str(path), pattern)
    return len(path.parts) == len(PurePosixPath(pattern).parts) and path.match(pattern)


def copy_text_files(root: Path, new: Path, source: TextFilesSource) -> list[Path]:
    """Copy a file, or a directory's files, into the source's directory; each must match the glob."""
    place = source_place(source)
    files = sorted(p for p in new.rglob("*") if p.is_file()) if new.is_dir() else [new]
    dests = [place / (p.relative_to(new) if new.is_dir() else p.name) for p in files]
    for dest in dests:
        if not matches_glob(PurePosixPath(dest.as_posix()), source.path):
            raise LmlineError(f"{dest} would not match source {source.name}'s glob {source.path!r}")
        if (root / dest).exists():
            raise LmlineError(f"{dest} exists: adding never overwrites; rename the new file")
    for src, dest in zip(files, dests):
        with atomic_path(root / dest) as tmp:
            shutil.copy2(src, tmp)
    return dests


def append_rows(root: Path, new: Path, source: JsonlSource | CsvSource | ParquetSource) -> list[Path]:
    """Append the new file's rows to the source's file (a copy when the source has none yet)."""
    path = root / source.path
    if not path.exists():
        with atomic_path(path) as tmp:
            shutil.copy2(new, tmp)
        return [Path(source.path)]
    with atomic_path(path) as tmp:
        if isinstance(source, ParquetSource):
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pa.concat_tables([pq.read_table(path), pq.read_table(new)])
            except pa.ArrowInvalid as exc:
                raise LmlineError(f"{new}: its columns do not match {path}'s ({exc})") from None
            pq.write_table(table, tmp)
        else:
            old, added = path.read_bytes(), new.read_bytes()
            if isinstance(source, CsvSource):
                old_header, _, _ = old.partition(b"\n")
                new_header, _, added = added.partition(b"\n")
                if new_header.strip() != old_header.strip():
                    raise LmlineError(f"{new}: header {new_header.strip().decode()!r} differs from {path}'s")
            tmp.write_bytes(old + (b"" if old.endswith(b"\n") or not old else b"\n") + added)
    return [Path(source.path)]


def dvc_add(root: Path, place: Path) -> str:
    """Put `place` under DVC (moving it out of git first if git tracked it); returns its DVC hash."""
    if git(root, "ls-files", "--", str(place)):
        # DVC refuses paths git tracks; the removal is staged next to the new .dvc file, for one commit
        git(root, "rm", "-r", "-q", "--cached", "--", str(place))
    dvc(root, "add", str(place))
    pointer = place.with_name(place.name + ".dvc")
    git(root, "add", "--", str(pointer), str(place.parent / ".gitignore"))
    [out] = yaml.safe_load((root / pointer).read_text())["outs"]
    return out["md5"]


def emit_updated(params: Params, source: str, payload: dict) -> bool:
    """Send the lmline.data.updated event; False when there is no Prefect server to send it to."""
    if not os.environ.get("PREFECT_API_URL"):
        return False  # an ephemeral Prefect would swallow it: nothing could be listening
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"lmline.source.{params.project.name}.{source}",
                  "prefect.resource.name": source, "lmline.project": params.project.name},
        payload=payload,
    )
    EventsWorker.instance().wait_until_empty()  # sent before a short-lived CLI exits
    return True


def add(params: Params, root: Path, new: Path, source_name: str) -> dict:
    """`lmline data add`: put the data in place, track it, snapshot the workspace `root`, announce it."""
    source = find_source(params, source_name)
    if not new.exists():
        raise LmlineError(f"{new}: file not found")
    if isinstance(source, TextFilesSource):
        added = copy_text_files(root, new, source)
    else:
        added = append_rows(root, new, source)
    place = source_place(source)
    md5 = dvc_add(root, place)
    remote = dvc_default_remote(root)
    if remote:
        dvc(root, "push", str(place.with_name(place.name + ".dvc")))
    git_ref = revision = ""
    if has_git_remote(root):
        git_ref = f"refs/lmline/data/{source.name}-{md5.removesuffix('.dir')[:12]}"
        revision = snapshot(root, git_ref)
    payload = {"source": source.name, "md5": md5, "path": str(place), "files": [str(p) for p in added],
               "git_ref": git_ref, "revision": revision}
    return {**payload, "dvc_remote": remote or "", "event": emit_updated(params, source.name, payload)}
