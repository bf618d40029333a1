"""The clean stage: its pure parts on hand-made text, datatrove's filters as configured per source, the fast
stand-ins against datatrove's own code, and run() end to end on a tiny raw corpus in tmp_path."""
from __future__ import annotations

import csv
import json
import random

import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams
from datatrove.utils.text import simplify_text

from lmline import config
from lmline.clean_config import PiiConfig
from lmline.config import ConfigError
from lmline.errors import LmlineError
from tasks import clean
from tasks.clean_fast import (
    FastGopherQualityFilter,
    FastGopherRepetitionFilter,
    FastWordTokenizer,
    duplicated_ngram_chars,
    fast_words,
    simplified_words,
    top_ngram_chars,
    word_arrays,
)

from conftest import REPO

VERSE = """ROMEO.
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun!
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she:
Be not her maid, since she is envious;
Her vestal livery is but sick and green,
And none but fools do wear it; cast it off.

JULIET.
Ay me!

ROMEO.
She speaks:
O, speak again, bright angel! for thou art
As glorious to this night, being o'er my head,
As is a winged messenger of heaven
Unto the white-upturned wondering eyes
Of mortals that fall back to gaze on him.

[Enter Nurse.]"""

ARTICLE = (  # like the news sample: a title, then the body on one line
    "Council approves new cycle lanes for the city centre\n\n"
    "The city council voted on Tuesday to build four new protected cycle lanes through the centre, after a "
    "two-year consultation with residents and local businesses. The plan, which will cost about 12 million "
    "pounds, is meant to cut traffic and make short trips safer for children walking to school. Shop owners "
    "on the high street had warned that removing parking spaces would hurt trade, and the final design keeps "
    "a loading bay on every block. Work is due to start in the spring and to finish before the end of next "
    "year. Opposition members said they would watch the costs closely and asked for a yearly report."
)

REPETITIVE = "Buy cheap pills now. Buy cheap pills now. Click here to buy cheap pills now.\n" * 12


# ---------------------------------------------------------------- normalisation, chunking, words
def test_normalise_text_nfkc_controls_and_whitespace():
    text = "ﬁne\u00a0Ｗords\x00 and\x07 bells\t\tring  \r\nnext line   \n\n\n\nnew para  "
    assert clean.normalise_text(text) == "fine Words and bells ring\nnext line\n\nnew para"


def test_normalise_text_mends_mojibake_and_entities():
    assert clean.normalise_text("cafÃ© &amp; crÃ¨me") == "café & crème"


def test_plain_ascii_shortcut_changes_nothing_ftfy_would():
    for text in [ARTICLE, VERSE, "a &amp; b", "x\x1b[31mred", "tab\there", "emoji ☺ here"]:
        assert clean.normalise_text(text) == clean.normalise_whitespace(clean._FTFY.format(text))


def test_chunk_text_packs_paragraphs_then_lines_and_keeps_every_word():
    paragraphs = [f"Speaker {i}.\n" + "\n".join(f"line {i}.{j} of verse" for j in range(3)) for i in range(12)]
    text = "\n\n".join(paragraphs)
    chunks = clean.chunk_text(text, 120)
    assert len(chunks) > 1 and all(len(c) <= 120 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    long_paragraph = "\n".join(f"a long speech line number {j}" for j in range(20))
    assert all(len(c) <= 100 for c in clean.chunk_text(long_paragraph, 100))
    assert clean.chunk_text("one single line " * 20, 50) == [("one single line " * 20).strip()]


def test_fast_words_split_like_spacy():
    words = fast_words("I didn't call'd U.S. officials on 01/06/2017, she's paid $3.50 -- wow...")
    assert words == ["I", "didn", "'t", "call", "'d", "U.S", ".", "officials", "on", "01/06/2017", ",",
                     "she", "'s", "paid", "$", "3.50", "--", "wow", "..."]


# ---------------------------------------------------------------- filters as configured
def first_drop(params: config.Params, source: str, text: str) -> str | None:
    """The rule that drops `text` for `source` (None = kept), running the configured datatrove filters."""
    words = clean.word_tokenizer(params.clean.word_tokenizer)
    doc = Document(text=clean.normalise_text(text), id="t")
    for rule, settings in clean.source_rules(params.clean, source).items():
        if clean.make_filter(rule, settings, words).filter(doc) is not True:
            return rule
    return None


@pytest.fixture(scope="module")
def defaults():
    return config.load(REPO / "params.yaml")


def test_default_rules_keep_verse_and_stage_directions(defaults):
    assert first_drop(defaults, "shakespeare", VERSE) is None
    for chunk in clean.chunk_text((VERSE + "\n\n") * 8, defaults.clean.filters["shakespeare"].chunk_chars):
        assert first_drop(defaults, "shakespeare", chunk) in (None, "gopher_repetition")  # a play repeated 8 times
    assert first_drop(defaults, "shakespeare", VERSE.replace("\n\n", "\n\n[Exit.]\n\n")) is None


def test_default_rules_keep_articles_and_drop_boilerplate(defaults):
    assert first_drop(defaults, "news", ARTICLE) is None
    assert first_drop(defaults, "news", "Subscribe to newsletter") is not None
    assert first_drop(defaults, "news", "Live: Last 16 - German Cup\n\n") is not None
    assert first_drop(defaults, "news", REPETITIVE) == "gopher_repetition"


def test_default_rules_keep_one_line_reviews(defaults):
    for review in ["A glorious mess.", "Eh.", "Decent but dull.", "Everything is off."]:
        assert first_drop(defaults, "rotten_tomatoes", review) is None
    assert first_drop(defaults, "rotten_tomatoes", "  \n ") == "min_chars"


def params_with(make_params, filters: dict, **clean_section):
    sources = [{"name": name, "type": "jsonl", "path": f"corpus/{name}.jsonl"} for name in ("plays", "news", "reviews")]
    return make_params({"ingest": {"sources": sources}, "clean": {"filters": filters, **clean_section}})[0]


def test_each_datatrove_filter_drops_what_it_is_for(make_params):
    params = params_with(make_params, {
        "plays": {"gopher_quality": {}},
        "news": {"gopher_repetition": {}, "c4_quality": {}},
        "reviews": {"fineweb_quality": {}, "min_chars": 5},
    })
    assert first_drop(params, "plays", "Too few words to count as a page of text.") == "gopher_quality"
    assert first_drop(params, "news", REPETITIVE) == "gopher_repetition"
    assert first_drop(params, "news", ARTICLE) is None
    assert first_drop(params, "news", ARTICLE + "\nLorem ipsum dolor sit amet, consectetur elit.") == "c4_quality"
    assert first_drop(params, "news", ARTICLE.replace("cost", "cost {about}")) == "c4_quality"
    menu = "\n".join(["Home", "News", "Sport", "Weather", "Contact us", "About"])
    assert first_drop(params, "reviews", menu) == "fineweb_quality"
    assert first_drop(params, "reviews", "Good") == "min_chars"
    assert first_drop(params, "unconfigured", "short") == "min_chars"  # clean.min_chars: 20


def test_c4_may_not_pass_documents_it_emptied(make_params):
    with pytest.raises(ConfigError, match=r"clean.filters.news.c4_quality.min_num_sentences must be >= 1"):
        params_with(make_params, {"news": {"c4_quality": {"min_num_sentences": -1}}})


# ---------------------------------------------------------------- fast stand-ins = datatrove
def varied_texts() -> list[str]:
    rng = random.Random(0)
    vocab = ["the", "cat", "sat", "on", "mat", "and", "dog", ".", ",", "ran", "...", "#", "-"]
    texts = [VERSE, ARTICLE, REPETITIVE, "", "!!! ??? ...", "- a\n- b\n- c", "word " * 60, "a ab abc " * 40]
    texts += [" ".join(rng.choice(vocab[: rng.randint(3, len(vocab))]) for _ in range(rng.randint(1, 400)))
              for _ in range(150)]
    return texts + [t.replace(" ", "\n", 7) for t in texts[8:40]]


def test_ngram_counts_equal_datatrove_counts():
    for text in varied_texts():
        words = fast_words(text)
        arrays = word_arrays(words)
        for n in range(2, 11):
            if len(words) >= n:
                assert top_ngram_chars(arrays, n) == find_top_duplicate(get_n_grams(words, n)), (n, text[:60])
                assert duplicated_ngram_chars(arrays, n) == find_all_duplicate(words, n), (n, text[:60])


def test_fast_gopher_filters_give_datatrove_verdicts():
    words = FastWordTokenizer()
    settings = [{}, {"min_doc_words": 5, "max_non_alpha_words_ratio": 0.5, "min_stop_words": 1}]
    pairs = [(GopherQualityFilter(language=words, **s), FastGopherQualityFilter(language=words, **s)) for s in settings]
    pairs.append((GopherRepetitionFilter(language=words), FastGopherRepetitionFilter(language=words)))
    for text in varied_texts()[4:]:  # datatrove divides by zero on texts without words
        for theirs, ours in pairs:
            assert ours.filter(Document(text=text, id="a")) == theirs.filter(Document(text=text, id="b")), text[:60]


def test_minhash_words_are_datatrove_simplified_words():
    for text in varied_texts() + ["Café  naïve\tRÉSUMÉ — 12,5 kg ١٢٣ x\u0301y"]:
        assert simplified_words(text) == simplify_text(text).split()


# ---------------------------------------------------------------- PII
def test_scrub_pii_replaces_and_counts_each_kind():
    text = ("Mail jane.doe@example.com or call (555) 123-4567 / +44 20 7946 0958. Servers 192.168.1.10 "
            "and 8.8.8.8; see https://example.com/a?b=1, or www.example.org.")
    scrubbed, found = clean.scrub_pii(text, PiiConfig())
    assert found == {"url": 2, "email": 1, "ip": 2, "phone": 2}
    for secret in ("jane.doe", "123-4567", "7946", "192.168", "8.8.8.8", "example.com", "example.org"):
        assert secret not in scrubbed
    assert scrubbed.startswith("Mail <EMAIL> or call <PHONE> / <PHONE>. Servers <IP> and <IP>; see <URL>, or <URL>.")


def test_scrub_pii_leaves_numbers_dates_and_disabled_kinds_alone():
    plain = "In 2017, 1,000 fans paid $94.14 on 01/06/2017 to see a 3-2 win; version 1.2.3 shipped."
    assert clean.scrub_pii(plain, PiiConfig()) == (plain, {"url": 0, "email": 0, "ip": 0, "phone": 0})
    kept, found = clean.scrub_pii("write to a@b.org", PiiConfig(email=False))
    assert kept == "write to a@b.org" and "email" not in found
    assert clean.scrub_pii("a@b.org", PiiConfig(enabled=False)) == ("a@b.org", {})


# ---------------------------------------------------------------- splits
def test_split_of_follows_the_fractions_and_the_seed():
    texts = [f"document number {i}" for i in range(4000)]
    splits = [clean.split_of(t, 1337, 0.1, 0.2) for t in texts]
    assert abs(splits.count("val") / 4000 - 0.1) < 0.02 and abs(splits.count("test") / 4000 - 0.2) < 0.02
    assert splits != [clean.split_of(t, 7, 0.1, 0.2) for t in texts]


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


def run_clean(params):
    inputs, outputs = config.stage_io(params, "clean")
    return clean.run(params, inputs, outputs), outputs


def read_splits(clean_dir) -> dict:
    return {(role.name, split): pq.read_table(role / f"{split}.parquet").to_pylist()
            for role in sorted(clean_dir.iterdir()) for split in clean.SPLITS}


def test_run_cleans_dedups_scrubs_splits_and_accounts_for_every_document(make_params, workspace):
    articles = [random_article(i) for i in range(8)]
    articles[2] += " Write to editor@paper.example for copies."
    near = articles[3].replace(articles[3].split()[20], "CHANGED", 1)
    write_raw(workspace, "news", "pretrain", [*articles, articles[1], near, "ok"])
    write_raw(workspace, "plays", "pretrain", ["\n\n".join(random_article(100 + i, 40) for i in range(6))])
    reviews = ["A glorious mess.", "Decent but dull.", "Painfully padded.", "A big fat pain.", "A glorious mess."]
    write_raw(workspace, "reviews", "finetune", reviews, labels=["fresh", "rotten", "rotten", "rotten", "fresh"])
    params = params_with(make_params, {"plays": {"chunk_chars": 400}, "reviews": {"min_chars": 3}},
                         split={"val": 0.3, "test": 0.3}, workers=2)

    metrics, outputs = run_clean(params)

    sources = metrics["sources"]
    assert sources["plays"]["rows"] == 1 and sources["plays"]["docs_in"] > 3  # chunked
    for name, m in sources.items():
        assert m["docs_in"] == m["docs_out"] + sum(m["drops"].values()), name
    assert sources["news"]["drops"] == {"min_chars": 1, "exact_dup": 1, "near_dup": 1}
    assert sources["reviews"]["drops"] == {"min_chars": 0, "exact_dup": 1, "near_dup": 0}
    assert metrics["duplicates_removed"] == {"exact_dup": 2, "near_dup": 1}
    assert metrics["pii_replaced"]["email"] == 1
    assert isinstance(metrics["mb_per_s"], float)  # rounded: 0.0 on a loaded machine, so not compared with 0
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
    assert not (texts_by_split[0] & texts_by_split[1] or texts_by_split[0] & texts_by_split[2]
                or texts_by_split[1] & texts_by_split[2])

    with open(outputs["drops"], newline="") as fh:
        drops = list(csv.DictReader(fh))
    assert {(d["source"], d["rule"]): int(d["dropped"]) for d in drops} == {
        (name, rule): n for name, m in sources.items() for rule, n in m["drops"].items()}
    assert not list((workspace / "data").glob(".clean.*")), "temp dirs are cleaned up"


def test_adding_documents_never_moves_old_ones(make_params, workspace):
    params = params_with(make_params, {}, min_chars=1, split={"val": 0.3, "test": 0.3}, workers=1)
    write_raw(workspace, "news", "pretrain", [random_article(i) for i in range(30)])
    first, outputs = run_clean(params)
    before = {r["id"]: split for (_, split), rows in read_splits(outputs["clean"]).items() for r in rows}
    write_raw(workspace, "news", "pretrain", [random_article(i) for i in range(30, 60)], start=30)
    second, _ = run_clean(params)
    after = {r["id"]: split for (_, split), rows in read_splits(outputs["clean"]).items() for r in rows}
    assert len(before) == 30 and len(after) == 60
    assert {i: after[i] for i in before} == before
    assert set(before.values()) == {"train", "val", "test"}


def test_a_source_that_loses_every_document_fails_naming_the_rules(make_params, workspace):
    write_raw(workspace, "news", "pretrain", ["A glorious mess."])
    params = params_with(make_params, {"news": {"min_chars": 3}}, workers=1)
    run_clean(params)
    before = {p: p.read_bytes() for p in (workspace / "data" / "clean").rglob("*") if p.is_file()}
    drops_before = (workspace / "plots" / "clean_drops.csv").read_bytes()
    (workspace / "data" / "raw" / "news.jsonl").unlink()
    write_raw(workspace, "news", "pretrain", ["x", "y", ARTICLE, ARTICLE])  # 2 too short, 1 duplicate, 1 kept
    write_raw(workspace, "reviews", "finetune", ["tiny", "Too few words to count as a page of text."],
              labels=["fresh", "rotten"])
    params = params_with(make_params, {"reviews": {"min_chars": 10, "gopher_quality": {}}}, workers=1)
    with pytest.raises(LmlineError) as err:
        run_clean(params)
    assert str(err.value) == ("clean: source 'reviews' lost all 2 documents (min_chars 1, gopher_quality 1): "
                              "loosen clean.filters (or clean.min_chars) or check the data")
    # the previous outputs stay as they were, and no temp dir is left
    assert {p: p.read_bytes() for p in (workspace / "data" / "clean").rglob("*") if p.is_file()} == before
    assert (workspace / "plots" / "clean_drops.csv").read_bytes() == drops_before
    assert not list((workspace / "data").glob(".clean.*"))


# ---------------------------------------------------------------- bad input
def test_missing_raw_dir_is_a_clear_error(make_params, workspace):
    params = params_with(make_params, {})
    with pytest.raises(LmlineError, match=r"data/raw: raw data directory not found"):
        run_clean(params)
    assert not (workspace / "data" / "clean").exists()


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", r"news.jsonl:2: not valid JSON"),
    ('{"id": "news:9", "source": "news", "role": "pretrain"}', r"news.jsonl:2: `text` must be a string"),
    ('{"id": "news:0", "source": "news", "role": "pretrain", "text": "again"}', r"news.jsonl:2: duplicate id 'news:0'"),
    ('{"id": "news:9", "source": "news", "role": "eval", "text": "t"}', r"news.jsonl:2: role must be one of"),
])
def test_a_bad_row_names_file_and_line_and_writes_nothing(make_params, workspace, bad_line, message):
    write_raw(workspace, "news", "pretrain", [ARTICLE])
    with open(workspace / "data" / "raw" / "news.jsonl", "a") as fh:
        fh.write(bad_line + "\n")
    with pytest.raises(LmlineError, match=message):
        run_clean(params_with(make_params, {}))
    assert not (workspace / "data" / "clean").exists() and not (workspace / "plots").exists()
    assert not list((workspace / "data").glob(".clean.*"))
