"""Small file helpers shared by the stages: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lmline.errors import LmlineError


def refuse_unsafe_target(path: Path) -> None:
    """A target must name something to replace: `.`, `..` or an empty name would make its temp folder's
    parent the folder itself, and replacing the working directory or / loses everything under it."""
    if path.name in ("", ".", ".."):
        raise LmlineError(f"refusing to replace {str(path)!r}: it names no file or folder")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == cwd or resolved in cwd.parents:
        raise LmlineError(f"refusing to replace {str(path)!r}: it is the working directory, one above it, or /")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on error remove it.

    Works for a file or a directory: whatever the body creates at the temp path replaces `path`. The
    old `path` is moved into the temp folder first and goes with it, and the temp folder this made is
    the only thing ever removed: a failing body leaves `path` as it was.
    """
    path = Path(path)
    refuse_unsafe_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = scratch / path.name
    try:
        yield tmp
        if not (tmp.exists() or tmp.is_symlink()):
            raise LmlineError(f"{path}: nothing was written in its place, so the old one is kept")
        if (path.exists() or path.is_symlink()) and (tmp.is_dir() or path.is_dir()):
            # A directory cannot be renamed over: move the old one into the scratch folder (it goes with
            # it), and back if the rename fails.
            old = scratch / f"{path.name}.old"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
        else:
            # A file over a file (or a link) is one rename: a reader never finds the path missing.
            os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, rows) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
