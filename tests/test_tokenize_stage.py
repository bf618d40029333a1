"""tokenize stage: tokenizer training, exact round trips, packing, determinism across threads, bad input."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SEED, stage_io

from lmline import config
from lmline.errors import LmlineError
from lmline.io import read_json
from tasks import tokenize

WORDS = "the king spoke to his people in the morning and they answered him with bread and wine".split()

# Strings that break careless tokenizers: leading/trailing/mixed whitespace, unicode, emoji, combining
# marks, control characters, the special tokens' own text, contractions.
TRICKY = [
    "",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "\n\nblank lines\r\nwindows line\ttab\n",
    "héllo wörld — “quoted” 日本語 テキスト",
    "emoji 🙂🙂 and a family 👨‍👩‍👧",
    "combining e\u0301 and zero\u200bwidth",
    "nbsp\u00a0 before a space, ideographic\u3000 too, a \u2028line separator",
    "control \x00 \x1c\x1f chars. \x1c next",
    "noncharacters \uffff \ufffe",  # with \x00 above: the encoder must find another cut marker
    "a literal <|endoftext|> and <pad> inside text",
    "don't we'll they've 'quoted' ''",
    "numbers 3.14 ½ ² 1,000,000 and ...!!! ???",
    "    ",
    "ends in a space ",  # then a document opening with newlines: distinct segments must not merge
    "\n\nopens with newlines",
]


def corpus(n_docs: int, seed: int, extra: str = "") -> list[str]:
    """Documents of four short lines of WORDS each."""
    rng = random.Random(seed)

    def line() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."

    return ["\n".join(line() for _ in range(4)) + extra for _ in range(n_docs)]


def write_clean(root, splits: dict[str, list[str]], role: str = "pretrain") -> None:
    """What the clean stage writes: <clean>/<role>/<split>.parquet with id, source, text, label."""
    out = root / "data" / "clean" / role
    out.mkdir(parents=True, exist_ok=True)
    for split, texts in splits.items():
        table = pa.table(
            {
                "id": [f"{split}-{i}" for i in range(len(texts))],
                "source": ["test"] * len(texts),
                "text": pa.array(texts, pa.string()),
                "label": pa.array([None] * len(texts), pa.string()),
            }
        )
        pq.write_table(table, out / f"{split}.parquet")


def section(**tokenize_section) -> config.TokenizeConfig:
    return config.TokenizeConfig(**{"vocab_size": 300, "num_proc": 1, **tokenize_section})


def run_stage(cfg: config.TokenizeConfig):
    inputs, outputs = stage_io("tokenize")
    return tokenize.run(cfg, SEED, inputs, outputs), outputs


# Runs of spaces and newlines, so that whitespace merges ("  ", "\n\n", "    ") enter the vocabulary and
# splitting text at a wrong place changes the ids.
INDENTED = "def spoke(king):\n    return  the   king\n\n\n        and  his    people  \n\n" + "space \n\n" * 5


def trained(texts=None, **section):
    cfg = config.TokenizeConfig(vocab_size=300, **section)
    return tokenize.train_tokenizer(texts or corpus(40, seed=1) + [INDENTED] * 40, cfg), cfg


def unpack(path, meta) -> list[list[int]]:
    """The documents in a packed file, split on eos (each document is followed by one)."""
    ids = np.fromfile(path, dtype=meta["dtype"]).tolist()
    assert not ids or ids[-1] == meta["eos_id"]
    docs, current = [], []
    for i in ids:
        if i == meta["eos_id"]:
            docs.append(current)
            current = []
        else:
            current.append(i)
    return docs


# ---------------------------------------------------------------- tokenizer
def test_saved_tokenizer_loads_offline_and_round_trips_tricky_text(workspace):
    from transformers import AutoTokenizer

    tokenizer, cfg = trained()
    tokenize.save_for_transformers(tokenizer, cfg, workspace / "tok")
    loaded = AutoTokenizer.from_pretrained(workspace / "tok")
    assert loaded.eos_token == loaded.bos_token == "<|endoftext|>"
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id != loaded.eos_token_id
    for text in TRICKY + corpus(3, seed=9):
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
        assert ids == tokenizer.encode(text, add_special_tokens=False).ids


def test_tokenizer_learns_from_the_train_split_only(workspace):
    train = [" ".join(["zanzibar"] * 30) + ". " + doc for doc in corpus(30, seed=2)]
    held_out = [" ".join(["quuxplorf"] * 200) for _ in range(10)]  # more frequent, but not in train
    write_clean(workspace, {"train": train, "val": held_out, "test": held_out})
    _, outputs = run_stage(section())
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(outputs["tokenizer"])
    assert len(loaded(" zanzibar")["input_ids"]) == 1
    assert len(loaded(" quuxplorf")["input_ids"]) > 3


def test_training_sample_is_seeded_and_bounded():
    texts = pa.array([f"document {i} " * 50 for i in range(200)], pa.large_string())  # ~700 bytes each
    sample = tokenize.training_sample(texts, max_mb=0.01, seed=3)
    assert sample == tokenize.training_sample(texts, max_mb=0.01, seed=3)
    assert sample != tokenize.training_sample(texts, max_mb=0.01, seed=4)
    assert 10_000 <= sum(len(t) for t in sample) < 10_000 + 700
    assert set(sample) < set(texts.to_pylist())
    assert tokenize.training_sample(texts, max_mb=None, seed=3) == texts.to_pylist()
    assert len(tokenize.training_sample(texts, max_mb=100, seed=3)) == 200


def test_training_pieces_pass_normal_text_whole_and_cut_only_long_runs():
    normal = TRICKY + corpus(5, seed=4) + [INDENTED, "https://example.org/" + "a/b?c=d&" * 20]
    assert list(tokenize.training_pieces(normal)) == normal  # so the same tokenizer as before
    run = tokenize.MAX_TRAIN_RUN
    long = "start " + "x" * (2 * run + 5) + " middle\n" + "é" * (run + 1) + " end"
    pieces = list(tokenize.training_pieces([long, "next"]))
    assert "".join(pieces[:-1]) == long and pieces[-1] == "next"
    assert max(len(w) for p in pieces for w in p.split()) <= run
    assert len(pieces) == 5  # two cuts in the x run, one in the é run


@pytest.mark.timeout(60)  # the old trainer took minutes on 1 MB (quadratic in a pre-token's length)
def test_multi_megabyte_single_lines_tokenize_in_linear_time_and_round_trip(workspace):
    rng = random.Random(3)
    letters = "".join(rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", k=2_000_000))
    spaced = " ".join(rng.choices(WORDS, k=400_000))  # ~2 MB, one line
    train = corpus(30, seed=1) + [letters, spaced]
    write_clean(workspace, {"train": train, "val": corpus(3, seed=2), "test": [letters[:1000]]})
    _, outputs = run_stage(section())
    meta = read_json(outputs["tokens"] / "meta.json")
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(outputs["tokenizer"] / "tokenizer.json"))
    docs = unpack(outputs["tokens"] / "train.bin", meta)
    assert [saved.decode(d) for d in docs[-2:]] == [letters, spaced]
    assert saved.decode(docs[0]) == train[0]


# ---------------------------------------------------------------- packing
def test_packed_ids_equal_encoding_each_document_whole():
    tokenizer, _ = trained()
    plain = tokenize.plain_copy(tokenizer)
    # "at" then "he ...": documents' first segments must not be glued to anything ("athe" has "the").
    docs = TRICKY + corpus(20, seed=5, extra="  \n") + ["x" + t for t in TRICKY] + [t + "!" for t in TRICKY]
    docs += ["at", "he spoke"]
    eos = tokenizer.token_to_id("<|endoftext|>")
    expected = [i for d in docs for i in plain.encode(d, add_special_tokens=False).ids + [eos]]
    assert tokenize.encode_documents(docs, plain, eos).tolist() == expected
    assert tokenize.encode_documents(docs, plain, eos, threads=3).tolist() == expected


def test_literal_special_tokens_in_a_document_are_text_not_boundaries():
    tokenizer, _ = trained()
    eos, pad = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<pad>")
    docs = ["before <|endoftext|> after", "<pad><|endoftext|>"]
    ids = tokenize.encode_documents(docs, tokenize.plain_copy(tokenizer), eos).tolist()
    assert ids.count(eos) == 2 and ids[-1] == eos and pad not in ids
    first = ids[: ids.index(eos)]
    assert tokenizer.decode(first, skip_special_tokens=False) == docs[0]


def test_run_packs_every_split_with_eos_after_each_document(workspace):
    splits = {"train": corpus(60, seed=1), "val": corpus(7, seed=2) + TRICKY, "test": corpus(5, seed=3)}
    write_clean(workspace, splits)
    write_clean(workspace, {"train": ["not packed"], "val": [], "test": []}, role="finetune")
    metrics, outputs = run_stage(section())

    meta = read_json(outputs["tokens"] / "meta.json")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(outputs["tokenizer"])
    assert (meta["eos_id"], meta["pad_id"]) == (loaded.eos_token_id, loaded.pad_token_id)
    assert len(loaded) == meta["vocab_size"]
    for split, texts in splits.items():
        path = outputs["tokens"] / f"{split}.bin"
        stats = meta["splits"][split]
        assert path.stat().st_size == 2 * stats["tokens"]
        assert [loaded.decode(doc) for doc in unpack(path, meta)] == texts  # order kept, text exact
        assert stats["documents"] == len(texts)
        assert stats["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert meta["bytes_per_token"][split] == pytest.approx(stats["bytes"] / stats["tokens"], rel=1e-5)
        assert metrics["splits"][split]["tokens"] == stats["tokens"]
    assert sorted(p.name for p in outputs["tokens"].iterdir()) == ["meta.json", "test.bin", "train.bin", "val.bin"]
    # speeds are rounded to 2 decimals: a loaded machine makes them 0.0, so no comparison with zero
    assert isinstance(metrics["encode_mb_per_s"], float)
    assert metrics["mb_in"] == round(sum(s["bytes"] for s in metrics["splits"].values()) / 1e6, 3)
    assert metrics["tokenizer_train_seconds"] >= 0


def test_one_or_two_threads_write_identical_outputs(workspace):
    write_clean(workspace, {"train": corpus(80, seed=1) + TRICKY, "val": corpus(9, seed=2), "test": TRICKY})
    files = {}
    for num_proc in (1, 2):
        _, outputs = run_stage(section(num_proc=num_proc))
        files[num_proc] = {
            p.name: p.read_bytes() for d in (outputs["tokens"], outputs["tokenizer"]) for p in sorted(d.iterdir())
        }
    assert files[1] == files[2]


def test_token_dtype_widens_past_uint16():
    assert tokenize.token_dtype(1024) == np.uint16
    assert tokenize.token_dtype(65535) == np.uint16
    assert tokenize.token_dtype(65536) == np.uint32


def test_segments_are_never_cut_after_any_kind_of_whitespace():
    # SEGMENT_CUT's "non-space" class must exclude every character Python calls whitespace (see there).
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    after_space = tokenize.segment(pa.array([f"{c} x" for c in spaces], pa.large_string()), "|")
    assert all(len(parts) == 1 for parts in after_space.to_pylist())
    after_text = tokenize.segment(pa.array(["a b", ".\tc", "é\nd", "\x00\re"], pa.large_string()), "|")
    assert after_text.to_pylist() == [["a", " b"], [".", "\tc"], ["é", "\nd"], ["\x00", "\re"]]


# ---------------------------------------------------------------- bad input
def test_missing_clean_dir_is_a_clear_error_and_writes_nothing(workspace):
    with pytest.raises(LmlineError, match=r"data/clean: no clean data; run the clean stage"):
        run_stage(section())
    assert not (workspace / "data" / "tokenizer").exists() and not (workspace / "data" / "tokens").exists()


def test_missing_train_split_is_a_clear_error_and_writes_nothing(workspace):
    write_clean(workspace, {"val": corpus(3, seed=1), "test": corpus(3, seed=2)})
    with pytest.raises(LmlineError, match=r"pretrain/train\.parquet: missing"):
        run_stage(section())
    assert sorted(p.name for p in (workspace / "data").iterdir()) == ["clean"]


@pytest.mark.parametrize(
    "train, message",
    [
        ([], r"train\.parquet: no documents to train the tokenizer on"),
        (["ok", None], r"train\.parquet: row 1 has no text"),
    ],
)
def test_unusable_train_split_is_a_clear_error(workspace, train, message):
    write_clean(workspace, {"train": train, "val": ["v"], "test": ["t"]})
    with pytest.raises(LmlineError, match=message):
        run_stage(section())
    assert sorted(p.name for p in (workspace / "data").iterdir()) == ["clean"]


def test_unreadable_split_files_are_clear_errors(workspace):
    write_clean(workspace, {"train": corpus(3, seed=1), "val": ["v"], "test": ["t"]})
    pq.write_table(pa.table({"body": ["no text column"]}), workspace / "data/clean/pretrain/val.parquet")
    with pytest.raises(LmlineError, match=r"pretrain/val\.parquet: no `text` column"):
        run_stage(section())
    (workspace / "data/clean/pretrain/test.parquet").write_text("not parquet")
    write_clean(workspace, {"val": ["v"]})
    with pytest.raises(LmlineError, match=r"pretrain/test\.parquet: not a readable parquet file"):
        run_stage(section())


def test_an_empty_split_packs_to_an_empty_file(workspace):
    write_clean(workspace, {"train": corpus(20, seed=1), "val": corpus(2, seed=2), "test": []})
    metrics, outputs = run_stage(section())
    meta = read_json(outputs["tokens"] / "meta.json")
    assert meta["splits"]["test"] == {"documents": 0, "tokens": 0, "bytes": 0}
    assert meta["bytes_per_token"]["test"] is None
    assert (outputs["tokens"] / "test.bin").stat().st_size == 0


def test_train_sample_mb_must_be_positive(make_params):
    with pytest.raises(config.ConfigError, match=r"tokenize\.train_sample_mb must be > 0"):
        make_params(
            {
                "ingest": {"sources": [{"name": "d", "type": "text_files", "path": "x"}]},
                "tokenize": {"train_sample_mb": 0},
            }
        )


# ---------------------------------------------------------------- tokenize.mix (domain-adaptive pretraining)
def write_labelled(root, splits: dict[str, list[str]], source: str = "reviews") -> None:
    """A finetune-role source as clean writes it: text and a label per row."""
    out = root / "data" / "clean" / "finetune"
    out.mkdir(parents=True, exist_ok=True)
    for split, texts in splits.items():
        labels = ["pos", "neg"] * (len(texts) // 2) + ["pos"] * (len(texts) % 2)
        table = pa.table({"id": [f"{split}-{i}" for i in range(len(texts))], "source": [source] * len(texts)})
        pq.write_table(
            table.append_column("text", pa.array(texts)).append_column("label", pa.array(labels)),
            out / f"{split}.parquet",
        )


def test_mix_packs_the_finetune_train_split_weighted_and_never_its_val_or_test(workspace):
    pretrain_splits = {"train": corpus(20, seed=1), "val": corpus(3, seed=2), "test": corpus(3, seed=3)}
    write_clean(workspace, pretrain_splits)
    reviews = {"train": [f"a glorious mess number {i}" for i in range(10)], "val": ["VALTEXT zz"], "test": ["TESTTEXT"]}
    write_labelled(workspace, reviews)
    metrics, outputs = run_stage(section(mix={"reviews": 2.5}))
    meta = read_json(outputs["tokens"] / "meta.json")
    assert meta["splits"]["train"]["documents"] == 20 + 2 * 10 + 5  # floor(2.5) copies + a seeded half
    assert meta["splits"]["val"]["documents"] == 3 and meta["splits"]["test"]["documents"] == 3
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(outputs["tokenizer"])
    train_text = "".join(loaded.decode(d) for d in unpack(outputs["tokens"] / "train.bin", meta))
    assert "a glorious mess number 7" in train_text and "pos" not in train_text  # text, not labels
    for split in ("val", "test"):
        text = "".join(loaded.decode(d) for d in unpack(outputs["tokens"] / f"{split}.bin", meta))
        assert "VALTEXT" not in text and "TESTTEXT" not in text and "glorious" not in text
    again = tokenize.mixed_train(
        workspace / "data" / "clean", workspace / "data/clean/pretrain/train.parquet", {"reviews": 2.5}, SEED
    )
    assert (
        again.to_pylist()
        == tokenize.mixed_train(
            workspace / "data" / "clean", workspace / "data/clean/pretrain/train.parquet", {"reviews": 2.5}, SEED
        ).to_pylist()
    )


def test_without_a_mix_weight_the_finetune_role_is_not_packed(workspace):
    write_clean(workspace, {"train": corpus(20, seed=1), "val": corpus(3, seed=2), "test": corpus(3, seed=3)})
    write_labelled(workspace, {"train": ["a glorious mess"] * 10, "val": ["v"], "test": ["t"]})
    _, outputs = run_stage(section())
    assert read_json(outputs["tokens"] / "meta.json")["splits"]["train"]["documents"] == 20
    _, outputs = run_stage(section(mix={"test": 0.5}))  # a pretrain-role source can be down-weighted
    assert read_json(outputs["tokens"] / "meta.json")["splits"]["train"]["documents"] == 10


@pytest.mark.parametrize(
    ("mix", "message"),
    [({"nope": 1.0}, r"tokenize\.mix\.nope names no source"), ({"d": -1}, r"tokenize\.mix\.d must be >= 0")],
)
def test_mix_weights_are_validated(make_params, mix, message):
    with pytest.raises(config.ConfigError, match=message):
        make_params(
            {"ingest": {"sources": [{"name": "d", "type": "text_files", "path": "corpus/x"}]}, "tokenize": {"mix": mix}}
        )
