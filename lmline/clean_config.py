"""The clean section: normalisation, per-source quality filters, de-duplication, PII scrubbing, the
train/val/test split, and where clean's datatrove passes run (this machine or a Ray cluster).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from lmline.section import Section


class PiiConfig(Section):
    enabled: bool = True
    """replace personal data with placeholders (<EMAIL>, <PHONE>, <IP>, <URL>)"""
    email: bool = True
    """e-mail addresses"""
    phone: bool = True
    """phone numbers"""
    ip: bool = True
    """IP addresses, private ranges too"""
    url: bool = True
    """URLs"""


# The four filter sections below take datatrove's own keyword names and defaults (its Gopher, C4 and
# FineWeb filters), so a section is passed to the filter as is; `{}` in params.yaml = datatrove's defaults.
class GopherQualityParams(Section):
    min_doc_words: Annotated[int, Field(ge=0)] | None = 50
    """drop documents with fewer words"""
    max_doc_words: Annotated[int, Field(ge=1)] | None = 100000
    """drop documents with more words"""
    min_avg_word_length: Annotated[float, Field(ge=0)] | None = 3
    """drop if the mean word length (characters) is below"""
    max_avg_word_length: Annotated[float, Field(ge=0)] | None = 10
    """drop if the mean word length is above"""
    max_symbol_word_ratio: Annotated[float, Field(ge=0)] | None = 0.1
    """drop if '#' and '...' per word exceed this"""
    max_bullet_lines_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.9
    """drop if more lines than this share start with a bullet"""
    max_ellipsis_lines_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.3
    """drop if more lines than this share end with an ellipsis"""
    max_non_alpha_words_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.8
    """a minimum, despite datatrove's name: drop if fewer than this share of words contain a letter"""
    min_stop_words: Annotated[int, Field(ge=0)] | None = 2
    """drop documents with fewer English stop words (the, and, of, ...)"""


class GopherRepetitionParams(Section):
    dup_line_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.3
    """drop if more lines than this share are repeats"""
    dup_para_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.3
    """drop if more paragraphs than this share are repeats"""
    dup_line_char_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.2
    """drop if repeated lines hold > this share of characters"""
    dup_para_char_frac: Annotated[float, Field(ge=0, le=1)] | None = 0.2
    """drop if repeated paragraphs hold > this share of characters"""
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    """(n, share): drop if the top n-gram covers > share of characters"""
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    """(n, share): drop if repeated n-grams cover > share"""


class C4QualityParams(Section):
    split_paragraph: bool = True
    """apply the line rules to lines (false: to sentences)"""
    remove_citations: bool = True
    """delete Wikipedia-style citation marks such as [1]"""
    filter_no_terminal_punct: bool = True
    """delete lines that do not end in terminal punctuation"""
    min_num_sentences: Annotated[int, Field(ge=1)] = 5
    """drop documents left with fewer sentences; >= 1 (datatrove allows -1 = off) because C4 deletes lines,
    and a document left empty must be dropped, not kept"""
    min_words_per_line: Annotated[int, Field(ge=-1)] = 3
    """delete lines with fewer words (-1 = off)"""
    max_word_length: Annotated[int, Field(ge=-1)] = 1000
    """delete lines with a longer word (-1 = off)"""
    filter_lorem_ipsum: bool = True
    """drop documents containing 'lorem ipsum'"""
    filter_javascript: bool = True
    """delete lines mentioning javascript"""
    filter_curly_bracket: bool = True
    """drop documents containing a curly bracket (code)"""
    filter_policy: bool = True
    """delete lines of cookie, privacy or terms-of-use boilerplate"""


class FineWebQualityParams(Section):
    line_punct_thr: Annotated[float, Field(ge=0, le=1)] = 0.12
    """drop if at most this share of lines end in punctuation"""
    line_punct_exclude_zero: bool = False
    """keep documents where no line ends in punctuation"""
    short_line_thr: Annotated[float, Field(ge=0, le=1)] = 0.67
    """drop if more lines than this share are short"""
    short_line_length: Annotated[int, Field(ge=0)] = 30
    """a line of at most this many characters is short"""
    char_duplicates_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01
    """drop if repeated lines hold > this share of characters"""
    new_line_ratio: Annotated[float, Field(ge=0, le=1)] = 0.3
    """drop if newlines per word exceed this"""


class SourceFilters(Section):
    """How one source is cleaned: chunking, then the rules in this order (a missing filter key = filter off)."""

    chunk_chars: Annotated[int, Field(ge=100)] | None = None
    """split longer documents at paragraph, then line breaks, so document-level rules judge scene-sized
    pieces rather than whole plays; null = keep documents whole"""
    min_chars: Annotated[int, Field(ge=0)] | None = None
    """None = clean.min_chars; empty documents always go"""
    gopher_quality: GopherQualityParams | None = None
    """datatrove's Gopher quality filter; null = off, {} = its defaults"""
    gopher_repetition: GopherRepetitionParams | None = None
    """datatrove's Gopher repetition filter; null = off"""
    c4_quality: C4QualityParams | None = None
    """datatrove's C4 filter (deletes lines, then judges the document); null = off"""
    fineweb_quality: FineWebQualityParams | None = None
    """datatrove's FineWeb filter (line-based: suits web pages); null = off"""


class MinhashConfig(Section):
    enabled: bool = True
    """drop near-duplicate documents (MinHash LSH), keeping one of each cluster"""
    n_grams: Annotated[int, Field(ge=1)] = 5
    """words per shingle"""
    num_buckets: Annotated[int, Field(ge=1)] = 14
    """LSH bands: more find less similar pairs"""
    hashes_per_bucket: Annotated[int, Field(ge=1)] = 8
    """hashes per band: more demand more similarity"""


class SplitConfig(Section):
    val: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """share of each role's cleaned documents held out for validation"""
    test: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """share held out for the test split (evaluate, promotion)"""

    @model_validator(mode="after")
    def _fractions(self):
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be < 1 (got {self.val + self.test:g})")
        return self


class RayConfig(Section):
    """Where clean's datatrove passes run when clean.executor is ray (datatrove's RayPipelineExecutor).
    Every node needs this project's environment (the same commit of lmline and its dependencies)."""

    address: str = "auto"
    """the cluster's head: host:port of its GCS (what `ray start --head --port` printed), or auto:
    RAY_ADDRESS, else the head last started on this machine. Ray Client (ray://) is not supported"""
    cpus_per_task: Annotated[int, Field(ge=1)] = 1
    """CPUs Ray reserves for each datatrove task"""
    mem_per_cpu_gb: Annotated[float, Field(gt=0)] = 2.0
    """memory Ray reserves per reserved CPU, GB"""
    task_timeout_s: Annotated[int, Field(ge=1)] | None = None
    """seconds before a task is killed (the stage then fails); null = no limit"""

    @model_validator(mode="after")
    def _address(self):
        if self.address != "auto" and not ray_address_ok(self.address):
            raise ValueError(f"address must be host:port (the head's GCS port) or auto (got {self.address!r})")
        return self


def ray_address_ok(address: str) -> bool:
    match = re.fullmatch(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})", address)
    return match is not None and 1 <= int(match.group(1)) <= 65535


class CleanConfig(Section):
    min_chars: Annotated[int, Field(ge=0)] = 20
    """default for sources without their own filters entry"""
    # Words for the quality filters: "fast" = lmline's regex tokenizer, "spacy" = datatrove's default
    # spaCy English tokenizer (the reference: the same verdicts on 99.94% of the sample corpora's
    # documents, bench/word_tokenizer.py; a ~4x slower stage).
    word_tokenizer: Literal["fast", "spacy"] = "fast"
    """fast (regex) | spacy: how the quality filters count words"""
    filters: dict[str, SourceFilters] = {}
    """per source name"""
    exact_dedup: bool = True
    """drop exact duplicate documents, keeping the first"""
    minhash: MinhashConfig = MinhashConfig()
    """near-duplicate removal"""
    pii: PiiConfig = PiiConfig()
    """personal data scrubbing"""
    split: SplitConfig = SplitConfig()
    """train/val/test split by a hash of each cleaned text"""
    # Not project.seed: a run with another training seed must keep the same held-out data, or its
    # test split overlaps what the champion trained on and the promotion gate compares unlike things.
    seed: int = 1337
    """places documents in splits and seeds MinHash; apart from project.seed so that a new training
    seed keeps the same val/test data"""
    workers: Annotated[int, Field(ge=0)] = 0
    """datatrove tasks (shards) per pass; 0 = one per CPU core (local) or per free task slot of the Ray
    cluster. The outputs depend on it (which of two duplicates is kept), not on the executor"""
    executor: Literal["local", "ray"] = "local"
    """local: processes on this machine | ray: tasks on the Ray cluster in clean.ray"""
    ray: RayConfig = RayConfig()
    """the Ray cluster, when executor is ray"""
