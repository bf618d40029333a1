"""The fast stand-ins of tasks/clean_fast.py against what they replace: the regex words against spaCy's
real output, the n-gram counts and the Gopher filters against datatrove's own code (as shipped: on
spaCy's words), MinHash's words against datatrove's simplify_text."""

from __future__ import annotations

import random
from difflib import SequenceMatcher

import pytest
from clean_texts import ARTICLE, MIXED, REPETITIVE, VERSE
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams
from datatrove.utils.text import simplify_text
from datatrove.utils.word_tokenizers import load_word_tokenizer

from tasks import clean
from tasks.clean_fast import (
    FastGopherQualityFilter,
    FastGopherRepetitionFilter,
    duplicated_ngram_chars,
    fast_words,
    simplified_words,
    top_ngram_chars,
    word_arrays,
)

SPACY = load_word_tokenizer("en")  # datatrove's English words: spaCy's tokenizer rules, no model download

# Every place in MIXED where the regex splits otherwise than spaCy: (spaCy's words, the regex's words).
SPLIT_OTHERWISE = [
    (["did", "n't", "call'd", "U.S."], ["didn", "'t", "call", "'d", "U.S", "."]),
    (["9:30", "a.m."], ["9", ":", "30", "a.m", "."]),
    (["5", "pm"], ["5pm"]),
    (["is", "n't"], ["isn", "'t"]),
    (["were", "n't"], ["weren", "'t"]),
    (["www.example.com/news?id=7"], ["www.example.com", "/", "news", "?", "id", "=", "7"]),
    (["jane@example.org"], ["jane", "@", "example.org"]),
]


def test_fast_words_split_like_spacy():
    """Compared with spaCy's own output: the same words on verse and on news prose; on English full of
    contractions, abbreviations, numbers and addresses, the listed differences and no others."""
    for text in (VERSE, ARTICLE, REPETITIVE):
        assert fast_words(text) == SPACY.word_tokenize(text)
    spacy, fast = SPACY.word_tokenize(MIXED), fast_words(MIXED)
    blocks = SequenceMatcher(a=spacy, b=fast, autojunk=False).get_opcodes()
    assert [(spacy[i1:i2], fast[j1:j2]) for tag, i1, i2, j1, j2 in blocks if tag != "equal"] == SPLIT_OTHERWISE
    assert sum(i2 - i1 for tag, i1, i2, _, _ in blocks if tag == "equal") > 0.8 * len(spacy)


def varied_texts() -> list[str]:
    rng = random.Random(0)
    vocab = ["the", "cat", "sat", "on", "mat", "and", "dog", ".", ",", "ran", "...", "#", "-"]
    texts = [VERSE, ARTICLE, REPETITIVE, "", "!!! ??? ...", "- a\n- b\n- c", "word " * 60, "a ab abc " * 40]
    texts += [
        " ".join(rng.choice(vocab[: rng.randint(3, len(vocab))]) for _ in range(rng.randint(1, 400)))
        for _ in range(150)
    ]
    return texts + [t.replace(" ", "\n", 7) for t in texts[8:40]]


def test_ngram_counts_equal_datatrove_counts():
    for text in varied_texts():
        words = fast_words(text)
        arrays = word_arrays(words)
        for n in range(2, 11):
            if len(words) >= n:
                assert top_ngram_chars(arrays, n) == find_top_duplicate(get_n_grams(words, n)), (n, text[:60])
                assert duplicated_ngram_chars(arrays, n) == find_all_duplicate(words, n), (n, text[:60])


@pytest.mark.parametrize("tokenizer", ["fast", "spacy"])
def test_fast_gopher_filters_give_datatrove_verdicts(tokenizer):
    """The stand-ins on the words of either clean.word_tokenizer against datatrove's filters as shipped,
    which count spaCy's words."""
    words = clean.word_tokenizer(tokenizer)
    settings = [{}, {"min_doc_words": 5, "max_non_alpha_words_ratio": 0.5, "min_stop_words": 1}]
    pairs = [(GopherQualityFilter(**s), FastGopherQualityFilter(language=words, **s)) for s in settings]
    pairs.append((GopherRepetitionFilter(), FastGopherRepetitionFilter(language=words)))
    mixed = [MIXED, MIXED * 5, VERSE + "\n\n" + MIXED, ARTICLE + "\n" + MIXED]
    for text in varied_texts()[4:] + mixed:  # datatrove divides by zero on texts without words
        for theirs, ours in pairs:
            assert ours.filter(Document(text=text, id="a")) == theirs.filter(Document(text=text, id="b")), text[:60]


def test_minhash_words_are_datatrove_simplified_words():
    for text in varied_texts() + ["Café  naïve\tRÉSUMÉ — 12,5 kg ١٢٣ x\u0301y"]:
        assert simplified_words(text) == simplify_text(text).split()
