"""`lmline data add`: new data for a source, put under DVC and announced to Prefect (git and DVC: lmline.vcs).

`lmline data add PATH --source NAME` puts new data where the source reads it (text files are copied
into the glob's directory; JSONL/CSV rows and Parquet tables are appended to the source's file), puts
that place under DVC (`dvc add`, and `dvc push` when a default remote is set), snapshots the workspace
to a git ref, and emits a `lmline.data.updated` Prefect event naming the source, the new DVC hash and
the snapshot: the retrain deployment's trigger trains exactly that snapshot.

It is all or nothing: the new data is checked first, read the way ingest reads it, exactly as it will
be appended; if any later step fails (dvc add, dvc push, the snapshot, the event) the source's files,
the .dvc file, .gitignore, the git index and the snapshot ref are put back as they were. Re-running
is safe: data that is already there (a text file of the same name and bytes, or a source file that
already ends with exactly these rows) is not added twice, and the remaining steps run again, so a
re-run after any failure ends as one clean run would.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import yaml

from lmline.config import Params
from lmline.errors import LmlineError
from lmline.io import atomic_path
from lmline.sources import CsvSource, JsonlSource, ParquetSource, SampleSource, Source, TextFilesSource
from lmline.vcs import delete_remote_ref, dvc, dvc_default_remote, git, has_git_remote, remote_lacks_ref, snapshot
from tasks import ingest

EVENT = "lmline.data.updated"


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
        raise LmlineError(
            f"source {name!r}: its glob {source.path!r} must sit in a directory below {params.paths.corpus}/"
        )
    return source


def matches_glob(path: PurePosixPath, pattern: str) -> bool:
    """Would ingest's glob.glob(pattern, recursive=True) find `path`? (In fnmatch `*` crosses `/`.)"""
    if "**" in pattern:
        return fnmatch.fnmatch(str(path), pattern)
    return len(path.parts) == len(PurePosixPath(pattern).parts) and path.match(pattern)


class Rollback:
    """Puts back what `data add` changed when a later step fails: each file it was told about before
    changing it (restored, or removed if it was new), folders it created (if left empty), the git
    index, and a snapshot ref it pushed that was not on origin before."""

    def __init__(self, root: Path):
        self.root = root
        self.saved: dict[Path, Path | None] = {}  # file -> its copy (None: the file did not exist)
        self.created_dirs: list[Path] = []
        self.pushed_ref: str | None = None
        self.backup: Path | None = None  # where the copies are, made on first need

    def __enter__(self) -> "Rollback":
        return self

    def keep(self, *paths: str | Path) -> None:
        """Remember these files (relative to the workspace) as they are now."""
        for rel in paths:
            path = self.root / rel
            if path in self.saved:
                continue
            if path.is_file():
                self.backup = self.backup or Path(tempfile.mkdtemp(prefix="lmline-data-add."))
                copy = self.backup / str(len(self.saved))
                shutil.copy2(path, copy)
                self.saved[path] = copy
            else:
                self.saved[path] = None
                missing = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
                self.created_dirs += [d for d in reversed(missing) if d not in self.created_dirs]

    def ref_to_push(self, ref: str) -> None:
        if remote_lacks_ref(self.root, ref):
            self.pushed_ref = ref

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is not None:
                self.undo()
        finally:
            if self.backup:
                shutil.rmtree(self.backup, ignore_errors=True)

    def undo(self) -> None:
        for path, copy in reversed(list(self.saved.items())):
            if copy is not None:
                shutil.move(copy, path)
            elif path.is_file() or path.is_symlink():
                path.unlink()
        for folder in sorted(self.created_dirs, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        if self.pushed_ref:
            delete_remote_ref(self.root, self.pushed_ref)


def check_as_ingest_reads(source: Source, file: Path, shown: Path) -> None:
    """Read `file` with ingest's own reader for `source`; an error names `shown` (the user's file)."""
    pattern = glob.escape(str(file)) if isinstance(source, TextFilesSource) else str(file)
    try:
        ingest.read_source(source.model_copy(update={"path": pattern, "max_docs": None}))
    except LmlineError as exc:
        raise LmlineError(str(exc).replace(str(file), str(shown))) from None


def copy_text_files(root: Path, new: Path, source: TextFilesSource, rollback: Rollback) -> tuple[list[Path], bool]:
    """Copy a file, or a directory's files, into the source's directory; each must match the glob.
    A file already there with the same bytes is left (a re-run); with other bytes it is refused."""
    place = source_place(source)
    files = sorted(p for p in new.rglob("*") if p.is_file()) if new.is_dir() else [new]
    if not files:
        raise LmlineError(f"{new}: no files in it")
    dests = [place / (p.relative_to(new) if new.is_dir() else p.name) for p in files]
    todo = []
    for src, dest in zip(files, dests):
        if not matches_glob(PurePosixPath(dest.as_posix()), source.path):
            raise LmlineError(f"{dest} would not match source {source.name}'s glob {source.path!r}")
        check_as_ingest_reads(source, src, src)  # copied byte for byte: the new file is what ingest reads
        if (root / dest).exists():
            if (root / dest).read_bytes() != src.read_bytes():
                raise LmlineError(f"{dest} exists with other content: adding never overwrites; rename the new file")
            continue  # added before (a re-run)
        todo.append((src, dest))
    for src, dest in todo:
        rollback.keep(dest)
        with atomic_path(root / dest) as tmp:
            shutil.copy2(src, tmp)
    return dests, bool(todo)


def without_bom(data: bytes) -> bytes:
    """Ingest drops a UTF-8 BOM only at the start of a file: one left mid-file would corrupt a row."""
    return data.removeprefix(b"\xef\xbb\xbf")


def append_rows(
    root: Path, new: Path, source: JsonlSource | CsvSource | ParquetSource, rollback: Rollback
) -> tuple[list[Path], bool]:
    """Append the new file's rows to the source's file (a copy when the source has none yet), after
    reading exactly what is appended the way ingest will. Rows the file already ends with are not
    appended again (a re-run)."""
    path = root / source.path
    if not path.exists():
        check_as_ingest_reads(source, new, new)
        rollback.keep(source.path)
        with atomic_path(path) as tmp:
            shutil.copy2(new, tmp)
        return [Path(source.path)], True
    if isinstance(source, ParquetSource):
        import pyarrow as pa  # only here: every `lmline` command imports this module
        import pyarrow.parquet as pq

        check_as_ingest_reads(source, new, new)
        old, added = pq.read_table(path), pq.read_table(new)
        if old.num_rows >= added.num_rows and old.slice(old.num_rows - added.num_rows).equals(added):
            return [Path(source.path)], False
        try:
            table = pa.concat_tables([old, added])
        except pa.ArrowInvalid as exc:
            raise LmlineError(f"{new}: its columns do not match {path}'s ({exc})") from None
        rollback.keep(source.path)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return [Path(source.path)], True
    old, added = path.read_bytes(), without_bom(new.read_bytes())
    header = b""
    if isinstance(source, CsvSource):
        old_header, _, _ = without_bom(old).partition(b"\n")
        new_header, _, added = added.partition(b"\n")
        if new_header.strip() != old_header.strip():
            raise LmlineError(f"{new}: header {new_header.strip().decode(errors='replace')!r} differs from {path}'s")
        header = old_header + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        # exactly the bytes to append (under the source's header for a CSV), read as ingest reads them
        probe = Path(tmp) / new.name
        probe.write_bytes(header + added)
        check_as_ingest_reads(source, probe, new)
    if old.endswith(added):
        return [Path(source.path)], False
    rollback.keep(source.path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(old + (b"" if old.endswith(b"\n") or not old else b"\n") + added)
    return [Path(source.path)], True


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
    from prefect.events import emit_event  # only here: Prefect takes a second to import, every command pays it
    from prefect.events.worker import EventsWorker

    emit_event(
        event=EVENT,
        resource={
            "prefect.resource.id": f"lmline.source.{params.project.name}.{source}",
            "prefect.resource.name": source,
            "lmline.project": params.project.name,
        },
        payload=payload,
    )
    EventsWorker.instance().wait_until_empty()  # sent before a short-lived CLI exits
    return True


def add(params: Params, root: Path, new: Path, source_name: str) -> dict:
    """`lmline data add`: put the data in place, track it, snapshot the workspace `root`, announce it;
    all or nothing (see the module docstring)."""
    source = find_source(params, source_name)
    if not new.exists():
        raise LmlineError(f"{new}: file not found")
    place = source_place(source)
    pointer = place.with_name(place.name + ".dvc")
    with Rollback(root) as rollback:
        rollback.keep(git(root, "rev-parse", "--git-path", "index"))  # dvc_add stages its changes
        if isinstance(source, TextFilesSource):
            added, changed = copy_text_files(root, new, source, rollback)
        else:
            added, changed = append_rows(root, new, source, rollback)
        rollback.keep(pointer, place.parent / ".gitignore")
        md5 = dvc_add(root, place)
        remote = dvc_default_remote(root)
        if remote:
            dvc(root, "push", str(pointer))
        git_ref = revision = ""
        if has_git_remote(root):
            git_ref = f"refs/lmline/data/{source.name}-{md5.removesuffix('.dir')[:12]}"
            rollback.ref_to_push(git_ref)
            revision = snapshot(root, git_ref)
        payload = {
            "source": source.name,
            "md5": md5,
            "path": str(place),
            "files": [str(p) for p in added],
            "git_ref": git_ref,
            "revision": revision,
        }
        event = emit_updated(params, source.name, payload)
    return {**payload, "changed": changed, "dvc_remote": remote or "", "event": event}
