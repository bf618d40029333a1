"""Typed, validated params: the one way every stage, the CLI, the flows and the tests read params.yaml.

`load(path, overrides)` returns a `Params`; any unknown key or bad value raises `ConfigError` with a
one-line message naming the file and the dotted key, before any stage does work, e.g.
`params.yaml: clean.min_chars must be >= 0 (got -5)`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmline.errors import LmlineError

STAGES = ("ingest", "clean", "tokenize", "pretrain", "finetune", "evaluate")
SLUG = r"^[a-z0-9][a-z0-9_-]*$"


class ConfigError(LmlineError):
    """A params file that cannot be used; the message names the file and key."""


class Section(BaseModel):
    # extra="forbid": a typo in params.yaml must fail loudly, not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- project / paths
class ProjectConfig(Section):
    name: Annotated[str, Field(pattern=SLUG)] = "lmline"  # registered models: <name>-base, <name>-<task>
    experiment: str = "lmline"  # MLflow experiment
    seed: int = 1337


class PathsConfig(Section):
    """Workspace layout. dvc.yaml interpolates these (${paths.raw}), so code and DVC agree by construction."""
    raw: str = "data/raw"
    clean: str = "data/clean"
    tokenizer: str = "data/tokenizer"
    tokens: str = "data/tokens"
    pretrain_model: str = "models/pretrain"
    finetune_model: str = "models/finetune"
    corpus: str = "corpus"  # local source files live here: ingest's DVC dep, so DVC sees them change
    checkpoints: str = "checkpoints"  # not a DVC out: survives a failed run so training can resume
    metrics: str = "metrics"
    plots: str = "plots"
    reports: str = "reports"  # samples, model cards


# ---------------------------------------------------------------- ingest
class _SourceBase(Section):
    name: Annotated[str, Field(pattern=SLUG)]
    role: Literal["pretrain", "finetune"] = "pretrain"
    max_docs: Annotated[int, Field(ge=1)] | None = None  # keep the first N documents (tiny test configs)


class TextFilesSource(_SourceBase):
    type: Literal["text_files"]
    path: str  # a glob, relative to the workspace (`**` recurses)
    # split each file into documents on this string (e.g. "\n\n\n"); None = one document per file
    separator: Annotated[str, Field(min_length=1)] | None = None


class _TableSource(_SourceBase):
    path: str  # one file, relative to the workspace
    text_field: str = "text"
    label_field: str | None = None  # kept as a string label (numbers too); None = unlabelled


class JsonlSource(_TableSource):
    type: Literal["jsonl"]


class CsvSource(_TableSource):
    type: Literal["csv"]


class ParquetSource(_TableSource):
    type: Literal["parquet"]


class SampleSource(_SourceBase):
    type: Literal["sample"]
    corpus: Literal["shakespeare", "news", "rotten_tomatoes"] | None = None  # default: the source name

    @model_validator(mode="after")
    def _corpus_from_name(self):
        if self.corpus is None and self.name not in ("shakespeare", "news", "rotten_tomatoes"):
            raise ValueError(f"sample source {self.name!r} needs corpus: shakespeare | news | rotten_tomatoes")
        return self

    @property
    def corpus_name(self) -> str:
        return self.corpus or self.name


Source = Annotated[
    Union[TextFilesSource, JsonlSource, CsvSource, ParquetSource, SampleSource], Field(discriminator="type")
]
SOURCE_TYPES = ("text_files", "jsonl", "csv", "parquet", "sample")


class IngestConfig(Section):
    sources: list[Source]

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique (repeated: {', '.join(sorted(dup))})")
        if not self.sources:
            raise ValueError("at least one source is needed")
        return self


# ---------------------------------------------------------------- clean
class PiiConfig(Section):
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ip: bool = True
    url: bool = True


# The four filter sections below take datatrove's own keyword names and defaults (its Gopher, C4 and
# FineWeb filters), so a section is passed to the filter as is; `{}` in params.yaml = datatrove's defaults.
class GopherQualityParams(Section):
    min_doc_words: Annotated[int, Field(ge=0)] | None = 50
    max_doc_words: Annotated[int, Field(ge=1)] | None = 100000
    min_avg_word_length: Annotated[float, Field(ge=0)] | None = 3
    max_avg_word_length: Annotated[float, Field(ge=0)] | None = 10
    max_symbol_word_ratio: Annotated[float, Field(ge=0)] | None = 0.1
    max_bullet_lines_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.9
    max_ellipsis_lines_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.3
    # datatrove's name; it is a minimum: drop if fewer than this share of words contain a letter
    max_non_alpha_words_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.8
    min_stop_words: Annotated[int, Field(ge=0)] | None = 2


class GopherRepetitionParams(Section):
    dup_line_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.3
    dup_para_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.3
    dup_line_char_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.2
    dup_para_char_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]


class C4QualityParams(Section):
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    # >= 1 (datatrove allows -1 = off): C4 deletes lines, and a document left empty must be dropped, not kept
    min_num_sentences: Annotated[int, Field(ge=1)] = 5
    min_words_per_line: Annotated[int, Field(ge=-1)] = 3
    max_word_length: Annotated[int, Field(ge=-1)] = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQualityParams(Section):
    line_punct_thr: Annotated[float, Field(ge=0, le=1)] = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: Annotated[float, Field(ge=0, le=1)] = 0.67
    short_line_length: Annotated[int, Field(ge=0)] = 30
    char_duplicates_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01
    new_line_ratio: Annotated[float, Field(ge=0, le=1)] = 0.3


class SourceFilters(Section):
    """How one source is cleaned: chunking, then the rules in this order (a missing filter key = filter off)."""
    # Split documents longer than this at paragraph (then line) breaks, so document-level rules judge
    # scene-sized pieces rather than whole plays; None = keep documents whole.
    chunk_chars: Annotated[int, Field(ge=100)] | None = None
    min_chars: Annotated[int, Field(ge=0)] | None = None  # None = clean.min_chars; empty documents always go
    gopher_quality: GopherQualityParams | None = None
    gopher_repetition: GopherRepetitionParams | None = None
    c4_quality: C4QualityParams | None = None
    fineweb_quality: FineWebQualityParams | None = None


class MinhashConfig(Section):
    enabled: bool = True
    n_grams: Annotated[int, Field(ge=1)] = 5
    num_buckets: Annotated[int, Field(ge=1)] = 14
    hashes_per_bucket: Annotated[int, Field(ge=1)] = 8


class SplitConfig(Section):
    val: Annotated[float, Field(ge=0, lt=1)] = 0.05
    test: Annotated[float, Field(ge=0, lt=1)] = 0.05

    @model_validator(mode="after")
    def _fractions(self):
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be < 1 (got {self.val + self.test:g})")
        return self


class CleanConfig(Section):
    min_chars: Annotated[int, Field(ge=0)] = 20  # default for sources without their own filters entry
    # Words for the quality filters: "fast" = lmline's regex tokenizer, "spacy" = datatrove's default
    # spaCy English tokenizer (the reference; ~20x slower, the stage's bottleneck when used).
    word_tokenizer: Literal["fast", "spacy"] = "fast"
    filters: dict[str, SourceFilters] = {}  # per source name
    exact_dedup: bool = True
    minhash: MinhashConfig = MinhashConfig()
    pii: PiiConfig = PiiConfig()
    split: SplitConfig = SplitConfig()
    workers: Annotated[int, Field(ge=0)] = 0  # datatrove tasks; 0 = one per CPU core


# ---------------------------------------------------------------- tokenize
class TokenizeConfig(Section):
    vocab_size: Annotated[int, Field(ge=260, le=1 << 20)] = 1024  # >= 256 bytes + special tokens
    min_frequency: Annotated[int, Field(ge=1)] = 2
    eos_token: Annotated[str, Field(min_length=1)] = "<|endoftext|>"  # also bos: documents are packed after one
    pad_token: Annotated[str, Field(min_length=1)] = "<pad>"
    num_proc: Annotated[int, Field(ge=0)] = 0  # threads (Arrow, Rust); 0 = one per CPU core
    # The BPE trains on a seeded sample of about this many MB of the train split (None = all of it).
    train_sample_mb: Annotated[float, Field(gt=0)] | None = 4.0


# ---------------------------------------------------------------- pretrain
class PretrainConfig(Section):
    arch: Literal["llama", "gpt2"] = "llama"
    n_layer: Annotated[int, Field(ge=1)] = 4
    n_head: Annotated[int, Field(ge=1)] = 4
    n_kv_head: Annotated[int, Field(ge=1)] | None = None  # None = n_head (no grouped-query attention)
    d_model: Annotated[int, Field(ge=8)] = 128
    d_ff: Annotated[int, Field(ge=8)] | None = None  # None = architecture default
    context: Annotated[int, Field(ge=8)] = 128
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    tie_embeddings: bool = True
    batch_size: Annotated[int, Field(ge=1)] = 16
    grad_accum: Annotated[int, Field(ge=1)] = 1
    lr: Annotated[float, Field(gt=0)] = 3e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    max_steps: Annotated[int, Field(ge=1)] = 3000
    max_minutes: Annotated[float, Field(gt=0)] = 2.5  # wall-clock budget; training stops at whichever comes first
    eval_every: Annotated[int, Field(ge=1)] = 200
    eval_batches: Annotated[int, Field(ge=1)] = 20
    log_every: Annotated[int, Field(ge=1)] = 20  # train-loss rows in the loss CSV / MLflow history
    checkpoint_every: Annotated[int, Field(ge=1)] = 200
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    compile: bool = False
    peak_flops: Annotated[float, Field(gt=0)] = 2.0e11  # for the MFU estimate; set to your hardware's peak

    @model_validator(mode="after")
    def _shapes(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv})")
        if self.arch == "gpt2" and kv != self.n_head:
            raise ValueError("n_kv_head (grouped-query attention) needs arch: llama")
        return self


# ---------------------------------------------------------------- finetune
class FinetuneConfig(Section):
    task: Literal["classification", "causal-lm"] = "classification"
    source: str | None = None  # a finetune-role source name; None = the only one
    mask_prompt: bool = False  # causal-lm: no loss on text before `prompt_separator`
    prompt_separator: str = "\n### Response:\n"
    max_length: Annotated[int, Field(ge=8)] = 128
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    max_steps: Annotated[int, Field(ge=1)] = 600
    max_minutes: Annotated[float, Field(gt=0)] = 3.0
    eval_every: Annotated[int, Field(ge=1)] = 100  # also the checkpoint interval (the best one is kept)
    early_stopping_patience: Annotated[int, Field(ge=1)] = 3  # evals without a better val metric

    @model_validator(mode="after")
    def _evals_happen(self):
        if self.eval_every > self.max_steps:
            raise ValueError(f"eval_every ({self.eval_every}) must be <= max_steps ({self.max_steps})")
        return self


# ---------------------------------------------------------------- evaluate
class EvaluateConfig(Section):
    prompts: list[str] = ["ROMEO:", "The president said", "This movie"]
    max_new_tokens: Annotated[int, Field(ge=1)] = 60
    temperature: Annotated[float, Field(gt=0)] = 0.8
    top_k: Annotated[int, Field(ge=0)] = 40
    max_eval_tokens: Annotated[int, Field(ge=1)] | None = None  # cap the LM test tokens (None = all)
    batch_size: Annotated[int, Field(ge=1)] = 32
    tfidf_max_ngram: Annotated[int, Field(ge=1, le=3)] = 2  # baseline: word 1..n-grams
    logreg_c: Annotated[float, Field(gt=0)] = 1.0  # baseline: inverse regularisation strength


# ---------------------------------------------------------------- promote
class PromoteConfig(Section):
    metric: Literal["accuracy", "macro_f1"] = "macro_f1"
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    max_bpb_regression: Annotated[float, Field(ge=0)] = 0.05  # guard on the base model's bits per byte


# ---------------------------------------------------------------- orchestration (Prefect)
class OrchestrationConfig(Section):
    retries: dict[str, Annotated[int, Field(ge=0)]] = {"pretrain": 1, "finetune": 1}  # per stage, transient failures
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 2.0

    @model_validator(mode="after")
    def _known_stages(self):
        unknown = sorted(set(self.retries) - set(STAGES))
        if unknown:
            raise ValueError(f"retries names unknown stages {unknown} (stages: {', '.join(STAGES)})")
        return self


class Params(Section):
    project: ProjectConfig = ProjectConfig()
    paths: PathsConfig = PathsConfig()
    ingest: IngestConfig
    clean: CleanConfig = CleanConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _cross_refs(self):
        corpus = Path(self.paths.corpus).parts
        for i, source in enumerate(self.ingest.sources):
            if isinstance(source, SampleSource):
                continue
            parts = Path(os.path.normpath(source.path)).parts
            if Path(source.path).is_absolute() or ".." in parts or parts[: len(corpus)] != corpus:
                raise ValueError(
                    f"ingest.sources[{i}].path must lie inside paths.corpus ({self.paths.corpus}/), which dvc.yaml "
                    f"declares as ingest's dependency so DVC sees the files change (got {source.path!r})"
                )
        names = {s.name for s in self.ingest.sources}
        for src in self.clean.filters:
            if src not in names:
                raise ValueError(f"clean.filters.{src} names no source in ingest.sources")
        ft = [s.name for s in self.ingest.sources if s.role == "finetune"]
        if self.finetune.source is not None and self.finetune.source not in ft:
            raise ValueError(f"finetune.source {self.finetune.source!r} is not a finetune-role source ({ft})")
        return self

    def section(self, name: str) -> BaseModel:
        return getattr(self, name)


# ---------------------------------------------------------------- loading
def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["pretrain.lr=1e-3", ...]` (like `dvc exp run -S`) -> {"pretrain.lr": 0.001}; values parsed as YAML."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {p} is not a section")
        node[leaf] = value
    return raw


def _dotted(loc: tuple) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts[-1] += f"[{item}]" if parts else f"[{item}]"
        elif item in SOURCE_TYPES and i > 0 and isinstance(loc[i - 1], int):
            continue  # the discriminator tag pydantic adds for tagged unions
        elif "[" in str(item) or "," in str(item):
            continue  # pydantic's union-member labels such as 'function-after[...]'
        else:
            parts.append(str(item))
    return ".".join(parts)


def _describe(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {bound}"
    if kind == "extra_forbidden":
        return "is not a known key"
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "union_tag_invalid":
        return f"has an unknown type (expected one of {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        return f"needs a `{ctx.get('discriminator', 'type').strip(chr(39))}` key"
    if kind == "string_pattern_mismatch":
        return "must be lowercase letters, digits, '-' or '_'"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")[:1].lower() + msg.removeprefix("Value error, ")[1:]


def format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    key = _dotted(err["loc"])
    desc = _describe(err)
    got = "" if err["type"] in ("missing", "extra_forbidden") or "input" not in err else err["input"]
    shown = f" (got {got!r})" if got != "" and not isinstance(got, dict) else ""
    more = f" [+{exc.error_count() - 1} more]" if exc.error_count() > 1 else ""
    sep = ": " if err["type"] == "value_error" else " "  # a rule about the section, not one key
    return f"{source}: {key + sep if key else ''}{desc}{shown}{more}"


def load(params_path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None) -> Params:
    path = Path(params_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    raw = apply_overrides(raw, parse_overrides(overrides))
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_error(path.name, exc)) from None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params -> {"pretrain.lr": 0.003, ...} for MLflow params and DVC-style display."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


def slug_ok(name: str) -> bool:
    return re.match(SLUG, name) is not None


def stage_io(params: Params, stage: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """What each stage reads and writes, from params.paths. dvc.yaml declares the same paths through
    ${paths.*} interpolation, and tests/test_dvc_yaml.py checks the two agree."""
    p = params.paths
    raw, clean, tok, tokens = Path(p.raw), Path(p.clean), Path(p.tokenizer), Path(p.tokens)
    base, tuned, plots, reports = Path(p.pretrain_model), Path(p.finetune_model), Path(p.plots), Path(p.reports)
    io = {
        "ingest": ({"corpus": Path(p.corpus)}, {"raw": raw}),
        "clean": ({"raw": raw}, {"clean": clean, "drops": plots / "clean_drops.csv"}),
        "tokenize": ({"clean": clean}, {"tokenizer": tok, "tokens": tokens}),
        "pretrain": (
            {"tokenizer": tok, "tokens": tokens},
            {"model": base, "loss": plots / "pretrain_loss.csv", "checkpoints": Path(p.checkpoints) / "pretrain"},
        ),
        "finetune": (
            {"model": base, "clean": clean},
            {"model": tuned, "loss": plots / "finetune_loss.csv", "checkpoints": Path(p.checkpoints) / "finetune"},
        ),
        "evaluate": (
            {"base": base, "tuned": tuned, "clean": clean, "tokens": tokens},
            {"confusion": plots / "confusion.csv", "samples": reports / "samples.txt"},
        ),
    }
    if stage not in io:
        raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    return io[stage]


def metrics_path(params: Params, stage: str) -> Path:
    return Path(params.paths.metrics) / f"{stage}.json"
