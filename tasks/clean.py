"""clean: raw JSONL documents -> normalised, filtered, PII-scrubbed, de-duplicated train/val/test parquet.

Built on datatrove (the library behind FineWeb): the work is a chain of datatrove pipelines, each run by
its LocalPipelineExecutor with one task per core, each task on one shard of the data:

  shard      this process  check raw rows, chunk long documents, deal them out to N shard files
  run 1      N tasks       FTFY (NFKC) + whitespace -> per-source rules (min_chars, Gopher repetition,
                           Gopher quality, C4, FineWeb) -> PII scrub -> filtered/ -> ExactDedupSignature
  run 2      1 task        ExactFindDedups
  run 3      N tasks       ExactDedupFilter -> unique/ -> MinhashDedupSignature
  runs 4, 5  B, 1 tasks    MinhashDedupBuckets, MinhashDedupCluster
  run 6      N tasks       MinhashDedupFilter -> final/
  assemble   this process  split each document by a hash of its text; write <role>/{train,val,test}.parquet

A source that loses every document fails the stage, naming the rules that dropped them.

Every step that drops documents has a datatrove exclusion writer (removed/<rule>/<source>/<rank>.jsonl):
that is how drops are counted per source and rule, independently of the documents kept. Where profiling
found datatrove slow, tasks/clean_fast.py swaps in equivalent code (checked against datatrove's in tests).
The text steps (normalise, chunk, PII scrub) are tasks/clean_text.py; where the passes run is
tasks/clean_executor.py.

Scale-out: each pipeline is a plain list of datatrove steps plus a task count, so the same lists run
on LocalPipelineExecutor (processes here) or, with `clean.executor: ray`, on RayPipelineExecutor (tasks
on a Ray cluster; `clean_executor.pipeline_executor` is the one place that chooses). Two steps stay in
this process: the shard pre-pass (at cluster scale the raw data already comes as many files, and
`chunk_text` would become a per-document step) and the assembly, which holds the kept documents in
memory (there, a ParquetWriter step per role and split). SlurmPipelineExecutor is not wired: it returns
once its jobs are queued, and a DVC stage must end with its outputs written (docs/production.md).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
from collections import Counter
from functools import partial
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
)
from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, LambdaFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from lmline import progress
from lmline.clean_config import CleanConfig
from lmline.config import slug_ok
from lmline.errors import LmlineError
from lmline.io import atomic_path
from tasks.clean_executor import check_every_task_completed, executor_session, pipeline_executor, quiet_datatrove
from tasks.clean_fast import (
    FastGopherQualityFilter,
    FastGopherRepetitionFilter,
    FastMinhashDedupSignature,
    FastWordTokenizer,
)
from tasks.clean_text import PLACEHOLDERS, Normalise, ScrubPii, chunk_text

QUALITY_FILTERS = {  # the order they run in, FineWeb's: repetition, quality, C4, FineWeb
    "gopher_repetition": FastGopherRepetitionFilter,  # datatrove's, with faster n-gram counting
    "gopher_quality": FastGopherQualityFilter,  # datatrove's, each distinct word classified once
    "c4_quality": C4QualityFilter,
    "fineweb_quality": FineWebQualityFilter,
}
RULES = ("min_chars", *QUALITY_FILTERS)
DEDUP_RULES = ("exact_dup", "near_dup")
SPLITS = ("train", "val", "test")
ROLES = ("pretrain", "finetune")
SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string()), ("label", pa.string())])


# ---------------------------------------------------------------- words
def word_tokenizer(name: str):
    # One instance for every filter: datatrove caches a text's words per (text, tokenizer), so the
    # filters of a document share a single tokenisation.
    return FastWordTokenizer() if name == "fast" else "en"


# ---------------------------------------------------------------- splits (pure)
def split_of(text: str, seed: int, val: float, test: float) -> str:
    """train/val/test from a hash of the cleaned text: a document's split depends on nothing else, so
    adding documents never moves old ones, and equal texts always land together."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


# ---------------------------------------------------------------- per-source rules
class PerSource(BaseFilter):
    """One rule whose datatrove filter is set up per source; documents of other sources pass. (A datatrove
    filter applies to every document; lmline chooses filters and thresholds per source.)"""

    def __init__(self, rule: str, filters: dict[str, BaseFilter], exclusion_writer: JsonlWriter):
        self.name = rule
        super().__init__(exclusion_writer)
        self.filters = filters

    def filter(self, doc):
        inner = self.filters.get(doc.metadata["source"])
        return inner is None or inner.filter(doc)


def has_min_chars(doc, min_chars: int) -> bool:
    return len(doc.text) >= max(min_chars, 1)  # an empty document is never kept


def source_rules(cfg: CleanConfig, source: str) -> dict:
    """{rule: its settings} for one source's filters, in the order they run."""
    rules = cfg.filters.get(source)
    chosen = {"min_chars": cfg.min_chars if rules is None or rules.min_chars is None else rules.min_chars}
    for rule in QUALITY_FILTERS:
        if getattr(rules, rule, None) is not None:
            chosen[rule] = getattr(rules, rule)
    return chosen


def make_filter(rule: str, settings, words) -> BaseFilter:
    if rule == "min_chars":
        return LambdaFilter(partial(has_min_chars, min_chars=settings))
    return QUALITY_FILTERS[rule](**settings.model_dump(), language=words)


# ---------------------------------------------------------------- shard pre-pass (I/O)
def raw_files(raw: Path) -> list[Path]:
    if not raw.is_dir():
        raise LmlineError(f"{raw}: raw data directory not found (run the ingest stage first)")
    files = sorted(raw.glob("*.jsonl"))
    if not files:
        raise LmlineError(f"{raw}: no <source>.jsonl files in the raw data directory")
    return files


def check_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise LmlineError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("id", "source", "role", "text"):
        if not isinstance(row.get(key), str):
            raise LmlineError(f"{where}: `{key}` must be a string (got {row.get(key)!r:.40})")
    if not slug_ok(row["source"]):
        raise LmlineError(f"{where}: source {row['source']!r} must be lowercase letters, digits, '-' or '_'")
    if row["role"] not in ROLES:
        raise LmlineError(f"{where}: role must be one of {ROLES} (got {row['role']!r})")
    if row.get("label") is not None and not isinstance(row["label"], str):
        raise LmlineError(f"{where}: `label` must be a string or absent (got {row['label']!r:.40})")
    return row


def read_raw(files: list[Path]):
    """Yield each raw row, checked; errors name the file and line."""
    seen: set[str] = set()
    for path in files:
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = check_row(orjson.loads(line), where)
                except orjson.JSONDecodeError as exc:
                    raise LmlineError(f"{where}: not valid JSON ({exc})") from None
                if row["id"] in seen:
                    raise LmlineError(f"{where}: duplicate id {row['id']!r}")
                seen.add(row["id"])
                yield row


def source_documents(cfg: CleanConfig, source: str, text: str) -> list[str]:
    """The documents the rules judge for one raw text: the text whole, or its pieces where the source
    sets chunk_chars."""
    max_chars = getattr(cfg.filters.get(source), "chunk_chars", None)
    return chunk_text(text, max_chars) if max_chars else [text]


def write_shards(files: list[Path], cfg: CleanConfig, shard_dir: Path, shards: int) -> dict[str, dict]:
    """Chunk and deal the raw documents round-robin into `shards` JSONL files (datatrove's reader format).
    Returns per source: role, rows, docs_in (after chunking: the unit every rule counts) and bytes_in."""
    shard_dir.mkdir(parents=True)
    tally: dict[str, dict] = {}
    n = 0
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(open(shard_dir / f"{i:05d}.jsonl", "wb")) for i in range(shards)]
        for row in read_raw(files):
            src = row["source"]
            t = tally.setdefault(src, {"role": row["role"], "rows": 0, "docs_in": 0, "bytes_in": 0})
            t["rows"] += 1
            t["bytes_in"] += len(row["text"].encode())
            pieces = source_documents(cfg, src, row["text"])
            for k, text in enumerate(pieces):
                doc_id = f"{row['id']}#{k}" if len(pieces) > 1 else row["id"]
                # `order` keeps the input order through the shuffled shards, for a stable output order
                meta = {"source": src, "role": row["role"], "label": row.get("label"), "order": n}
                outs[n % shards].write(orjson.dumps({"id": doc_id, "text": text, "metadata": meta}) + b"\n")
                t["docs_in"] += 1
                n += 1
    return tally


# ---------------------------------------------------------------- datatrove pipelines
def reader(folder: Path) -> JsonlReader:
    return JsonlReader(str(folder), add_file_path=False)


def as_row(writer, doc) -> dict:
    # datatrove's default adapter deep-copies every document (dataclasses.asdict): 10% of the filter run
    return {"id": doc.id, "text": doc.text, "metadata": doc.metadata}


def jsonl_out(folder: Path, filename: str | None = None) -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename=filename, compression=None, adapter=as_row)


def removed(work: Path, rule: str) -> JsonlWriter:
    return jsonl_out(work / "removed" / rule, "${source}/${rank}.jsonl")


def document_text(doc) -> str:  # ExactDedupConfig reads the return annotation to pick its hash
    return doc.text


def rule_steps(cfg: CleanConfig, sources: list[str], work: Path) -> list[PipelineStep]:
    """Normalise, then each rule as one datatrove filter step (set up per source), then the PII scrub."""
    words = word_tokenizer(cfg.word_tokenizer)
    per_rule: dict[str, dict[str, BaseFilter]] = {}
    for source in sources:
        for rule, settings in source_rules(cfg, source).items():
            per_rule.setdefault(rule, {})[source] = make_filter(rule, settings, words)
    rules = [PerSource(rule, per_rule[rule], removed(work, rule)) for rule in RULES if rule in per_rule]
    return [Normalise(), *rules, *([ScrubPii(cfg.pii)] if cfg.pii.enabled else [])]


def dedup_stages(cfg: CleanConfig, seed: int, work: Path):
    """Per de-duplication: (output folder name, signature step, the runs between as (pipeline, tasks),
    filter step), exact before near."""
    if cfg.exact_dedup:
        config = ExactDedupConfig(content_getter=document_text)
        sigs, dups = str(work / "exact" / "sigs"), str(work / "exact" / "dups")
        between = [([ExactFindDedups(sigs, dups, config=config)], 1)]
        filter_ = ExactDedupFilter(dups, config=config, exclusion_writer=removed(work, "exact_dup"))
        yield "unique", ExactDedupSignature(sigs, config=config), between, filter_
    if cfg.minhash.enabled:
        m = cfg.minhash
        config = MinhashConfig(
            n_grams=m.n_grams, num_buckets=m.num_buckets, hashes_per_bucket=m.hashes_per_bucket, seed=seed
        )
        sigs, buckets, clusters = (str(work / "minhash" / d) for d in ("sigs", "buckets", "clusters"))
        between = [
            ([MinhashDedupBuckets(sigs, buckets, config=config)], m.num_buckets),
            ([MinhashDedupCluster(buckets, clusters, config=config)], 1),
        ]
        filter_ = MinhashDedupFilter(clusters, exclusion_writer=removed(work, "near_dup"))
        yield "final", FastMinhashDedupSignature(sigs, config=config), between, filter_


def every_rank_has_a_file(folder: Path, tasks: int) -> None:
    # A task that kept nothing writes no file, yet task r of the next run must read file r: the one
    # whose documents the signatures of task r numbered.
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(tasks):
        (folder / f"{rank:05d}.jsonl").touch()


def clean_documents(cfg: CleanConfig, seed: int, sources: list[str], work: Path, workers: int) -> Path:
    """Run the datatrove pipelines one after the other; return the folder of the documents kept.

    A de-duplication's signature step rides at the end of the run that writes its input, and its filter
    step starts the next, so each document is read once per de-duplication."""
    kept = work / "filtered"
    pipeline = [reader(work / "shards"), *rule_steps(cfg, sources, work), jsonl_out(kept)]
    runs = []  # (pipeline, tasks, folder it writes)
    for output, signature, between, filter_ in dedup_stages(cfg, seed, work):
        runs += [(pipeline + [signature], workers, kept), *((steps, tasks, None) for steps, tasks in between)]
        pipeline, kept = [reader(kept), filter_, jsonl_out(work / output)], work / output
    runs.append((pipeline, workers, kept))
    for i, (steps, tasks, writes) in enumerate(progress.bar(runs, desc="clean passes", unit="pass")):
        logs = str(work / "logs" / f"{i:02d}")
        executor = pipeline_executor(cfg, steps, tasks, min(workers, tasks), logs)
        executor.run()
        check_every_task_completed(executor, f"clean pass {i + 1} of {len(runs)}")
        if writes:
            every_rank_has_a_file(writes, tasks)
    return kept


# ---------------------------------------------------------------- assemble (I/O)
def read_jsonl_folder(folder: Path) -> list[dict]:
    docs = []
    for path in sorted(folder.glob("*.jsonl")):
        with path.open("rb") as fh:
            docs += map(orjson.loads, fh)
    return docs


def count_removed(work: Path) -> Counter:
    """{(source, rule): documents} from the exclusion writers' files, removed/<rule>/<source>/<rank>.jsonl."""
    drops = Counter()
    for path in (work / "removed").glob("*/*/*.jsonl"):
        with path.open("rb") as fh:
            drops[path.parent.name, path.parent.parent.name] += sum(1 for _ in fh)
    return drops


def write_splits(docs: list[dict], out: Path, roles: set[str], seed: int, cfg: CleanConfig) -> dict:
    """<role>/{train,val,test}.parquet for every role in the input (empty files included), rows in input order."""
    tables = {(role, split): {column: [] for column in SCHEMA.names} for role in roles for split in SPLITS}
    for doc in sorted(docs, key=lambda d: d["metadata"]["order"]):
        meta = doc["metadata"]
        table = tables[meta["role"], split_of(doc["text"], seed, cfg.split.val, cfg.split.test)]
        for column, value in zip(SCHEMA.names, (doc["id"], meta["source"], doc["text"], meta["label"])):
            table[column].append(value)
    for (role, split), columns in tables.items():
        (out / role).mkdir(exist_ok=True)
        pq.write_table(pa.table(columns, schema=SCHEMA), out / role / f"{split}.parquet")
    return {role: {split: len(tables[role, split]["id"]) for split in SPLITS} for role in sorted(roles)}


def rules_run(cfg: CleanConfig, source: str) -> list[str]:
    dedup = [rule for rule, on in zip(DEDUP_RULES, (cfg.exact_dedup, cfg.minhash.enabled)) if on]
    return [*source_rules(cfg, source), *dedup]


def source_metrics(cfg: CleanConfig, tally: dict, docs: list[dict], drops: Counter) -> dict:
    per = {}
    for source, t in sorted(tally.items()):
        kept = [d["text"] for d in docs if d["metadata"]["source"] == source]
        per[source] = {
            **t,
            "docs_out": len(kept),
            "bytes_out": sum(len(text.encode()) for text in kept),
            "drops": {rule: drops[source, rule] for rule in rules_run(cfg, source)},
        }
    return per


def check_every_source_kept_some(per_source: dict) -> None:
    """A source the rules emptied fails here, naming the rules and their counts: else the stage
    succeeds and the pipeline breaks later, in tokenize or pretrain, far from the cause."""
    emptied = []
    for source, m in per_source.items():
        if m["docs_out"] == 0:
            rules = ", ".join(f"{rule} {n}" for rule, n in m["drops"].items() if n) or "no rule counted a drop"
            emptied.append(f"source {source!r} lost all {m['docs_in']} documents ({rules})")
    if emptied:
        raise LmlineError(f"clean: {'; '.join(emptied)}: loosen clean.filters (or clean.min_chars) or check the data")


def write_drops_csv(path: Path, per_source: dict) -> None:
    """One row per source and rule; `bar` ("news/gopher_quality") names the bar in dvc.yaml's plot."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["bar", "source", "rule", "dropped"])
        for source, m in per_source.items():
            out.writerows([f"{source}/{rule}", source, rule, n] for rule, n in m["drops"].items())


def run(cfg: CleanConfig, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    """raw/*.jsonl -> clean/<role>/{train,val,test}.parquet and the drops CSV; returns the metrics.
    `cfg.seed` (clean.seed, not project.seed) places documents in splits and seeds MinHash."""
    seed = cfg.seed
    files = raw_files(inputs["raw"])
    with atomic_path(outputs["clean"]) as clean_dir, quiet_datatrove(), executor_session(cfg) as slots:
        workers = cfg.workers or slots
        clean_dir.mkdir()
        # removed with the temp dir, success or not; absolute: Ray's workers do not share our cwd
        work = (clean_dir.parent / "datatrove").absolute()
        tally = write_shards(files, cfg, work / "shards", workers)
        docs = read_jsonl_folder(clean_documents(cfg, seed, sorted(tally), work, workers))
        per_source = source_metrics(cfg, tally, docs, count_removed(work))
        check_every_source_kept_some(per_source)
        splits = write_splits(docs, clean_dir, {t["role"] for t in tally.values()}, seed, cfg)
    write_drops_csv(outputs["drops"], per_source)
    mb_in = sum(t["bytes_in"] for t in tally.values()) / 1e6
    pii = {kind: sum(d["metadata"].get("pii", {}).get(kind, 0) for d in docs) for kind in PLACEHOLDERS}
    return {
        "sources": per_source,
        "docs_in": sum(m["docs_in"] for m in per_source.values()),
        "docs_out": len(docs),
        "duplicates_removed": {rule: sum(m["drops"].get(rule, 0) for m in per_source.values()) for rule in DEDUP_RULES},
        "pii_replaced": pii if cfg.pii.enabled else {},
        "splits": splits,
        "workers": workers,
        "mb_in": round(mb_in, 3),  # mb_per_s is the shell's, over the whole stage process (lmline/stage_process.py)
    }
