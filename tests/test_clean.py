"""The clean stage: datatrove's filters as configured per source (with either word tokenizer: spaCy's runs
for real), the split hash, and run() end to end on a tiny raw corpus in tmp_path, from a clean section
alone. (Its text steps: test_clean_text.py; the fast stand-ins: test_clean_fast.py.)"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from clean_texts import ARTICLE, MIXED, REPETITIVE, VERSE
from conftest import REPO
from datatrove.data import Document

from lmline import config
from lmline.clean_config import CleanConfig
from lmline.config import ConfigError
from lmline.errors import LmlineError
from tasks import clean
from tasks.clean_text import chunk_text, normalise_text

TOKENIZERS = ("fast", "spacy")


# ---------------------------------------------------------------- filters as configured
def first_drop(cfg: CleanConfig, source: str, text: str) -> str | None:
    """The rule that drops `text` for `source` (None = kept), running the configured datatrove filters."""
    words = clean.word_tokenizer(cfg.word_tokenizer)
    doc = Document(text=normalise_text(text), id="t")
    for rule, settings in clean.source_rules(cfg, source).items():
        if clean.make_filter(rule, settings, words).filter(doc) is not True:
            return rule
    return None


def clean_config(filters: dict, **section) -> CleanConfig:
    return CleanConfig.model_validate({"filters": filters, **section})


@pytest.fixture(scope="module", params=TOKENIZERS)
def defaults(request) -> CleanConfig:
    """params.yaml's clean section, with the regex words (its default) and with spaCy's."""
    return config.load(REPO / "params.yaml", [f"clean.word_tokenizer={request.param}"]).clean


def test_default_rules_keep_verse_and_stage_directions(defaults):
    assert first_drop(defaults, "shakespeare", VERSE) is None
    for chunk in chunk_text((VERSE + "\n\n") * 8, defaults.filters["shakespeare"].chunk_chars):
        assert first_drop(defaults, "shakespeare", chunk) in (None, "gopher_repetition")  # a play repeated 8 times
    assert first_drop(defaults, "shakespeare", VERSE.replace("\n\n", "\n\n[Exit.]\n\n")) is None


def test_default_rules_keep_articles_and_drop_boilerplate(defaults):
    assert first_drop(defaults, "news", ARTICLE) is None
    assert first_drop(defaults, "news", ARTICLE + "\n\n" + MIXED) is None
    assert first_drop(defaults, "news", "Subscribe to newsletter") is not None
    assert first_drop(defaults, "news", "Live: Last 16 - German Cup\n\n") is not None
    assert first_drop(defaults, "news", REPETITIVE) == "gopher_repetition"


def test_default_rules_keep_one_line_reviews(defaults):
    for review in ["A glorious mess.", "Eh.", "Decent but dull.", "Everything is off."]:
        assert first_drop(defaults, "rotten_tomatoes", review) is None
    assert first_drop(defaults, "rotten_tomatoes", "  \n ") == "min_chars"


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_each_datatrove_filter_drops_what_it_is_for(tokenizer):
    cfg = clean_config(
        {
            "plays": {"gopher_quality": {}},
            "news": {"gopher_repetition": {}, "c4_quality": {}},
            "reviews": {"fineweb_quality": {}, "min_chars": 5},
        },
        word_tokenizer=tokenizer,
    )
    assert first_drop(cfg, "plays", "Too few words to count as a page of text.") == "gopher_quality"
    assert first_drop(cfg, "news", REPETITIVE) == "gopher_repetition"
    assert first_drop(cfg, "news", ARTICLE) is None
    assert first_drop(cfg, "news", ARTICLE + "\nLorem ipsum dolor sit amet, consectetur elit.") == "c4_quality"
    assert first_drop(cfg, "news", ARTICLE.replace("cost", "cost {about}")) == "c4_quality"
    menu = "\n".join(["Home", "News", "Sport", "Weather", "Contact us", "About"])
    assert first_drop(cfg, "reviews", menu) == "fineweb_quality"
    assert first_drop(cfg, "reviews", "Good") == "min_chars"
    assert first_drop(cfg, "unconfigured", "short") == "min_chars"  # clean.min_chars: 20


def test_c4_may_not_pass_documents_it_emptied(make_params):
    sources = [{"name": "news", "type": "jsonl", "path": "corpus/news.jsonl"}]
    with pytest.raises(ConfigError, match=r"clean.filters.news.c4_quality.min_num_sentences must be >= 1"):
        make_params(
            {"ingest": {"sources": sources}, "clean": {"filters": {"news": {"c4_quality": {"min_num_sentences": -1}}}}}
        )


# ---------------------------------------------------------------- splits
def test_split_of_follows_the_fractions_and_the_seed():
    texts = [f"document number {i}" for i in range(4000)]
    splits = [clean.split_of(t, 1337, 0.1, 0.2) for t in texts]
    assert abs(splits.count("val") / 4000 - 0.1) < 0.02 and abs(splits.count("test") / 4000 - 0.2) < 0.02
    assert splits != [clean.split_of(t, 7, 0.1, 0.2) for t in texts]


def test_a_new_training_seed_keeps_the_splits():
    """clean reads clean.seed, never project.seed: runs with other training seeds are scored on the same
    held-out data (else the champion is rescored on a test split it partly trained on)."""
    seeds = [config.load(REPO / "params.yaml", [f"project.seed={s}"]) for s in (1, 2)]
    assert config.stage_args(seeds[0], "clean") == config.stage_args(seeds[1], "clean")
    moved = config.load(REPO / "params.yaml", ["clean.seed=2"])
    assert config.stage_args(moved, "clean") != config.stage_args(seeds[0], "clean")


# ---------------------------------------------------------------- run() end to end
def write_raw(workspace, source: str, role: str, texts: list[str], labels: list[str] | None = None, start: int = 0):
    raw = workspace / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with open(raw / f"{source}.jsonl", "a", encoding="utf-8") as fh:
        for i, text in enumerate(texts, start):
            row = {"id": f"{source}:{i}", "source": source, "role": role, "text": text, "meta": {"n": i}}
            if labels:
                row["label"] = labels[i - start]
            fh.write(json.dumps(row) + "\n")


def random_article(seed: int, words: int = 90) -> str:
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("ba", "ko", "mi", "te", "ru", "sa", "lo", "ni") for b in ("n", "ra", "to", "ve", "ls")]
    body = " ".join(rng.choice(vocab) for _ in range(words))
    return f"Story {seed}\n\n{body}."


# params.yaml's default paths, relative to the workspace (the tests' cwd)
INPUTS = {"raw": Path("data/raw")}
OUTPUTS = {"clean": Path("data/clean"), "drops": Path("plots/clean_drops.csv")}


def run_clean(cfg: CleanConfig):
    return clean.run(cfg, INPUTS, OUTPUTS), OUTPUTS


def read_splits(clean_dir) -> dict:
    return {
        (role.name, split): pq.read_table(role / f"{split}.parquet").to_pylist()
        for role in sorted(clean_dir.iterdir())
        for split in clean.SPLITS
    }


def test_run_cleans_dedups_scrubs_splits_and_accounts_for_every_document(workspace):
    articles = [random_article(i) for i in range(8)]
    articles[2] += " Write to editor@paper.example for copies."
    near = articles[3].replace(articles[3].split()[20], "CHANGED", 1)
    write_raw(workspace, "news", "pretrain", [*articles, articles[1], near, "ok"])
    write_raw(workspace, "plays", "pretrain", ["\n\n".join(random_article(100 + i, 40) for i in range(6))])
    reviews = ["A glorious mess.", "Decent but dull.", "Painfully padded.", "A big fat pain.", "A glorious mess."]
    write_raw(workspace, "reviews", "finetune", reviews, labels=["fresh", "rotten", "rotten", "rotten", "fresh"])
    cfg = clean_config(
        {"plays": {"chunk_chars": 400}, "reviews": {"min_chars": 3}}, split={"val": 0.3, "test": 0.3}, workers=2
    )

    metrics, outputs = run_clean(cfg)

    sources = metrics["sources"]
    assert sources["plays"]["rows"] == 1 and sources["plays"]["docs_in"] > 3  # chunked
    for name, m in sources.items():
        assert m["docs_in"] == m["docs_out"] + sum(m["drops"].values()), name
    assert sources["news"]["drops"] == {"min_chars": 1, "exact_dup": 1, "near_dup": 1}
    assert sources["reviews"]["drops"] == {"min_chars": 0, "exact_dup": 1, "near_dup": 0}
    assert metrics["duplicates_removed"] == {"exact_dup": 2, "near_dup": 1}
    assert metrics["pii_replaced"]["email"] == 1
    assert metrics["mb_in"] == round(sum(m["bytes_in"] for m in sources.values()) / 1e6, 3)
    assert metrics["docs_out"] == sum(m["docs_out"] for m in sources.values())
    json.dumps(metrics)

    tables = read_splits(outputs["clean"])
    assert set(tables) == {(role, split) for role in ("finetune", "pretrain") for split in clean.SPLITS}
    rows = [row for split_rows in tables.values() for row in split_rows]
    assert len(rows) == metrics["docs_out"]
    assert {split: len(tables["finetune", split]) for split in clean.SPLITS} == metrics["splits"]["finetune"]
    assert pq.read_schema(outputs["clean"] / "pretrain" / "train.parquet").names == ["id", "source", "text", "label"]
    assert {r["label"] for split in clean.SPLITS for r in tables["finetune", split]} == {"fresh", "rotten"}
    assert all(r["label"] is None for split in clean.SPLITS for r in tables["pretrain", split])
    assert any("<EMAIL>" in r["text"] for r in rows) and not any("editor@" in r["text"] for r in rows)
    texts_by_split = [{r["text"] for role in ("finetune", "pretrain") for r in tables[role, s]} for s in clean.SPLITS]
    assert not (
        texts_by_split[0] & texts_by_split[1]
        or texts_by_split[0] & texts_by_split[2]
        or texts_by_split[1] & texts_by_split[2]
    )

    with open(outputs["drops"], newline="") as fh:
        drops = list(csv.DictReader(fh))
    assert {(d["source"], d["rule"]): int(d["dropped"]) for d in drops} == {
        (name, rule): n for name, m in sources.items() for rule, n in m["drops"].items()
    }
    assert not list((workspace / "data").glob(".clean.*")), "temp dirs are cleaned up"


def test_adding_documents_never_moves_old_ones(workspace):
    cfg = clean_config({}, min_chars=1, split={"val": 0.3, "test": 0.3}, workers=1)
    write_raw(workspace, "news", "pretrain", [random_article(i) for i in range(30)])
    first, outputs = run_clean(cfg)
    before = {r["id"]: split for (_, split), rows in read_splits(outputs["clean"]).items() for r in rows}
    write_raw(workspace, "news", "pretrain", [random_article(i) for i in range(30, 60)], start=30)
    second, _ = run_clean(cfg)
    after = {r["id"]: split for (_, split), rows in read_splits(outputs["clean"]).items() for r in rows}
    assert len(before) == 30 and len(after) == 60
    assert {i: after[i] for i in before} == before
    assert set(before.values()) == {"train", "val", "test"}


def test_spacy_words_run_through_the_stage_and_clean_as_the_regex_does(workspace):
    """clean.word_tokenizer: spacy end to end (datatrove's spaCy tokenizer in each worker process): on
    these texts it drops what the regex drops, and the outputs are the same byte for byte."""
    write_raw(
        workspace,
        "news",
        "pretrain",
        [
            ARTICLE,
            ARTICLE.replace("council", "assembly"),
            VERSE + "\n\n" + MIXED,  # kept, a near copy, kept
            MIXED,
            "Results: " + ", ".join(f"{i}-{i + 3}" for i in range(60)) + ".",  # under 50 words; figures
            REPETITIVE,
            "Subscribe!",
        ],
    )
    filters = {
        "news": {
            "gopher_repetition": {},
            "gopher_quality": {"max_non_alpha_words_ratio": 0.7},
            "c4_quality": {"filter_no_terminal_punct": False},
        }
    }  # params.yaml's news rules, near enough
    outputs = {}
    for tokenizer in TOKENIZERS:
        metrics, written = run_clean(clean_config(filters, word_tokenizer=tokenizer, workers=2))
        outputs[tokenizer] = metrics["sources"], file_bytes(written)
    assert outputs["spacy"] == outputs["fast"]
    drops = outputs["spacy"][0]["news"]["drops"]
    assert drops == {
        "min_chars": 1,
        "gopher_repetition": 1,
        "gopher_quality": 2,
        "c4_quality": 0,
        "exact_dup": 0,
        "near_dup": 1,
    }


def file_bytes(outputs: dict[str, Path]) -> dict[str, bytes]:
    files = [p for path in outputs.values() for p in ([path] if path.is_file() else sorted(path.rglob("*.parquet")))]
    return {str(p): p.read_bytes() for p in files}


def test_a_source_that_loses_every_document_fails_naming_the_rules(workspace):
    write_raw(workspace, "news", "pretrain", ["A glorious mess."])
    cfg = clean_config({"news": {"min_chars": 3}}, workers=1)
    run_clean(cfg)
    before = {p: p.read_bytes() for p in (workspace / "data" / "clean").rglob("*") if p.is_file()}
    drops_before = (workspace / "plots" / "clean_drops.csv").read_bytes()
    (workspace / "data" / "raw" / "news.jsonl").unlink()
    write_raw(workspace, "news", "pretrain", ["x", "y", ARTICLE, ARTICLE])  # 2 too short, 1 duplicate, 1 kept
    write_raw(
        workspace,
        "reviews",
        "finetune",
        ["tiny", "Too few words to count as a page of text."],
        labels=["fresh", "rotten"],
    )
    cfg = clean_config({"reviews": {"min_chars": 10, "gopher_quality": {}}}, workers=1)
    with pytest.raises(LmlineError) as err:
        run_clean(cfg)
    assert str(err.value) == (
        "clean: source 'reviews' lost all 2 documents (min_chars 1, gopher_quality 1): "
        "loosen clean.filters (or clean.min_chars) or check the data"
    )
    # the previous outputs stay as they were, and no temp dir is left
    assert {p: p.read_bytes() for p in (workspace / "data" / "clean").rglob("*") if p.is_file()} == before
    assert (workspace / "plots" / "clean_drops.csv").read_bytes() == drops_before
    assert not list((workspace / "data").glob(".clean.*"))


# ---------------------------------------------------------------- bad input
def test_missing_raw_dir_is_a_clear_error(workspace):
    cfg = clean_config({})
    with pytest.raises(LmlineError, match=r"data/raw: raw data directory not found"):
        run_clean(cfg)
    assert not (workspace / "data" / "clean").exists()


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"news.jsonl:2: not valid JSON"),
        ('{"id": "news:9", "source": "news", "role": "pretrain"}', r"news.jsonl:2: `text` must be a string"),
        (
            '{"id": "news:0", "source": "news", "role": "pretrain", "text": "again"}',
            r"news.jsonl:2: duplicate id 'news:0'",
        ),
        ('{"id": "news:9", "source": "news", "role": "eval", "text": "t"}', r"news.jsonl:2: role must be one of"),
    ],
)
def test_a_bad_row_names_file_and_line_and_writes_nothing(workspace, bad_line, message):
    write_raw(workspace, "news", "pretrain", [ARTICLE])
    with open(workspace / "data" / "raw" / "news.jsonl", "a") as fh:
        fh.write(bad_line + "\n")
    with pytest.raises(LmlineError, match=message):
        run_clean(clean_config({}))
    assert not (workspace / "data" / "clean").exists() and not (workspace / "plots").exists()
    assert not list((workspace / "data").glob(".clean.*"))
