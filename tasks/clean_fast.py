"""Faster stand-ins for the hot spots of datatrove's cleaning, found by profiling the clean stage.

Each subclasses datatrove's step and keeps its rules; tests/test_clean_fast.py checks them against
datatrove's own code. What they replace, measured on the default corpus (19 MB) on one core:
- words: datatrove's English WordTokenizer runs spaCy (~0.4 MB/s), the bottleneck of every filter and
  of MinHash; `fast_words` is one regex (~10 MB/s) whose words give spaCy's keep/drop verdict on 99.94%
  of the sample corpora's documents under params.yaml's rules (bench/word_tokenizer.py: news 99.69%,
  shakespeare and rotten_tomatoes 100%; a document judged otherwise sits at a threshold).
- GopherRepetitionFilter: n-gram counting by joining strings in Python (12 of the filters' 27 s); here
  numpy over hashes, the same counts ~4x faster.
- GopherQualityFilter: a Python scan of every word's characters; here one per distinct word.
- MinhashDedupSignature: a per-character accent loop, and an xxhash per joined n-gram; here a regex and
  numpy hashes. The same word 5-grams, other shingle values: its signatures do not mix with stock
  datatrove's (an index built by it, say).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import unicodedata
from operator import itemgetter

import numpy as np
import regex
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import _mersenne_prime as MERSENNE_PRIME
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.utils.text import DEF_TEXT_NORM_CONFIG, PUNCTUATION_SET, simplify_text, split_into_words
from datatrove.utils.word_tokenizers import WordTokenizer

# ---------------------------------------------------------------- words
# Follows spaCy's main English rules: punctuation split off (runs of dots or dashes kept together),
# contractions split at the apostrophe ('s 'd 'll 're 've, and n't as "didn" + "'t": spaCy's "did" +
# "n't" is as many words), numbers and dates kept whole. On the sample corpora 98.8% of spaCy's tokens
# are among the regex's, which are 1.8% more (bench/word_tokenizer.py; spaCy keeps "U.S." and "/TASS/." whole).
_SUFFIX = r"(?:[sStTdDmM]|ll|re|ve|LL|RE|VE)\b"  # after an apostrophe
_WORD = re.compile(rf"['’]{_SUFFIX}|\d+(?:[.,/]\d+)+|\w+(?:\.\w+|['’](?!{_SUFFIX})\w+)*|\.{{2,}}|-{{2,}}|[^\w\s]")


def fast_words(text: str) -> list[str]:
    return _WORD.findall(text)


# A sentence ends at . ! ? or … (closing quotes and brackets included) before a space or the end.
# (datatrove's regex splitter for languages without spaCy took 11 s of C4's sentence counting here.)
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?:\s+|$)")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        spans.append((start, end.end()))
        start = end.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


class FastWordTokenizer(WordTokenizer):
    """What datatrove's filters ask for words (Gopher, FineWeb) and sentences (C4)."""

    def word_tokenize(self, text: str) -> list[str]:
        return fast_words(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return sentence_spans(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b].strip() for a, b in sentence_spans(text)]


# ---------------------------------------------------------------- Gopher repetition n-grams
# datatrove compares n-grams two ways: find_top_duplicate by " ".join(words) (equal word tuples), and
# find_all_duplicate by "".join(words), where ["the", "mat"] equals ["them", "at"]. Both become 64-bit
# hashes (uint64 arithmetic wraps mod 2**64; collisions ~ count**2 / 2**64) computed with numpy:
# - tuples: a polynomial over the words' ids, h = h * PRIME + id;
# - joined text: a polynomial over characters, from prefix sums of code * BASE**-(position + 1), so the
#   hash of text[a:b] is (prefix[b] - prefix[a]) * BASE**a, whatever a is.
_PRIME = np.uint64(0x9E3779B97F4A7C15)
_BASE = 1_000_003
_BASE_INVERSE = pow(_BASE, -1, 1 << 64)


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """One hash per n-gram start, of the n word ids in order."""
    m = len(ids) - n + 1
    h = ids[:m].copy()
    for k in range(1, n):
        h = h * _PRIME + ids[k : k + m]
    return h


def word_arrays(words: list[str]) -> dict[str, np.ndarray]:
    """ends[i] = characters in words[:i]; the joined text's prefix sums and powers of BASE, from which
    `joined_hashes` hashes any run of words; and ids, a hash of each word (the run of one)."""
    ends = np.zeros(len(words) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=len(words)), out=ends[1:])
    codes = np.frombuffer("".join(words).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    inverse_powers = np.cumprod(np.full(len(codes), _BASE_INVERSE, dtype=np.uint64))
    prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
    np.cumsum(codes * inverse_powers, out=prefix[1:])
    powers = np.ones(len(codes) + 1, dtype=np.uint64)
    np.cumprod(np.full(len(codes), _BASE, dtype=np.uint64), out=powers[1:])
    w = {"ends": ends, "prefix": prefix, "powers": powers}
    w["ids"] = joined_hashes(w, 1)
    return w


def joined_hashes(w: dict[str, np.ndarray], n: int) -> np.ndarray:
    """One hash per n-gram start, of "".join(the n words)."""
    starts, stops = w["ends"][: len(w["ends"]) - n], w["ends"][n:]
    return (w["prefix"][stops] - w["prefix"][starts]) * w["powers"][starts]


def top_ngram_chars(w: dict[str, np.ndarray], n: int) -> int:
    """datatrove's find_top_duplicate: characters of the most frequent n-gram (words joined by spaces)
    times its count; on a tie, the n-gram seen first, like Counter.most_common."""
    _, first, counts = np.unique(ngram_hashes(w["ids"], n), return_index=True, return_counts=True)
    top = counts.max()
    i = first[counts == top].min()
    return int(w["ends"][i + n] - w["ends"][i] + n - 1) * int(top)


def duplicated_ngram_chars(w: dict[str, np.ndarray], n: int) -> int:
    """datatrove's find_all_duplicate: scan left to right; an n-gram already seen counts its characters
    and the scan jumps past it (the n-grams it skips are neither counted nor remembered).

    Only positions whose n-gram occurred earlier can count, so the Python loop visits just those; an
    earlier occurrence counts as seen unless a jump skipped it."""
    h = joined_hashes(w, n)
    order = np.argsort(h, kind="stable")
    same = h[order[1:]] == h[order[:-1]]
    if not same.any():
        return 0
    previous = np.full(len(h), -1, dtype=np.int64)  # previous occurrence of the same n-gram
    previous[order[1:][same]] = order[:-1][same]
    prev, ends = previous.tolist(), w["ends"]
    skipped = bytearray(len(h) + n)
    repeated = 0
    for p in np.flatnonzero(previous >= 0).tolist():
        if skipped[p]:
            continue
        q = prev[p]
        while q >= 0 and skipped[q]:
            q = prev[q]
        if q >= 0:
            repeated += int(ends[p + n] - ends[p])
            skipped[p + 1 : p + n] = b"\x01" * (n - 1)
    return repeated


def repeated_ngrams_verdict(words: list[str], text_len: int, top_n_grams, dup_n_grams) -> bool | tuple[bool, str]:
    w = word_arrays(words)
    for n, frac in top_n_grams:
        if len(words) >= n and top_ngram_chars(w, n) / text_len > frac:
            return False, f"top_{n}_gram"
    for n, frac in dup_n_grams:
        if len(words) >= n and duplicated_ngram_chars(w, n) / text_len > frac:
            return False, f"duplicated_{n}_n_grams"
    return True


GOPHER_TOP_N_GRAMS = ((2, 0.2), (3, 0.18), (4, 0.16))  # datatrove's (and Gopher's) defaults
GOPHER_DUP_N_GRAMS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


class FastGopherRepetitionFilter(GopherRepetitionFilter):
    """datatrove's GopherRepetitionFilter: its own paragraph and line checks, then the same word n-gram
    checks computed by `repeated_ngrams_verdict`."""

    def __init__(self, top_n_grams=GOPHER_TOP_N_GRAMS, dup_n_grams=GOPHER_DUP_N_GRAMS, **kwargs):
        super().__init__(top_n_grams=(), dup_n_grams=(), **kwargs)  # the parent does paragraphs and lines
        self.ngram_thresholds = tuple(top_n_grams), tuple(dup_n_grams)

    def filter(self, doc) -> bool | tuple[bool, str]:
        verdict = super().filter(doc)
        if verdict is not True:
            return verdict
        words = split_into_words(doc.text, self.language)  # cached: the parent just asked for them
        return repeated_ngrams_verdict(words, len(doc.text), *self.ngram_thresholds)


# ---------------------------------------------------------------- Gopher quality
@functools.lru_cache(maxsize=1 << 20)
def word_kind(word: str) -> tuple[bool, bool]:
    """(is a word, not only punctuation; contains a letter), as GopherQualityFilter tests each word."""
    return any(ch not in PUNCTUATION_SET for ch in word), any(ch.isalpha() for ch in word)


class FastGopherQualityFilter(GopherQualityFilter):
    """datatrove's GopherQualityFilter.filter, the same rules in the same order, except that each distinct
    word is classified once (word_kind, cached across documents) instead of scanning every word's
    characters in Python, which was most of its time."""

    def filter(self, doc) -> bool | tuple[bool, str]:
        text = doc.text
        words = split_into_words(text, self.language)
        n_words = len(words)
        kinds = list(map(word_kind, words))
        is_word = list(map(itemgetter(0), kinds))
        n_non_symbol = sum(is_word)
        if self.min_doc_words and n_non_symbol < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_non_symbol > self.max_doc_words:
            return False, "gopher_long_doc"
        chars = sum(itertools.compress(map(len, words), is_word))
        avg_word_length = chars / n_non_symbol if n_non_symbol else float("nan")  # np.mean([]) is nan
        if self.min_avg_word_length and avg_word_length < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and avg_word_length > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        ellipses = text.count("...") + text.count("…")
        if self.max_symbol_word_ratio and ellipses / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"
        lines = text.splitlines()
        bullets = sum(s.lstrip().startswith("•") or s.lstrip().startswith("-") for s in lines)
        if self.max_bullet_lines_ratio and bullets / len(lines) > self.max_bullet_lines_ratio:
            return False, "gopher_too_many_bullets"
        ellipsis_lines = sum(s.rstrip().endswith("...") or s.rstrip().endswith("…") for s in lines)
        if self.max_ellipsis_lines_ratio and ellipsis_lines / len(lines) > self.max_ellipsis_lines_ratio:
            return False, "gopher_too_many_end_ellipsis"
        with_letters = sum(map(itemgetter(1), kinds))
        if self.max_non_alpha_words_ratio and with_letters / n_words < self.max_non_alpha_words_ratio:
            return False, "gopher_below_alpha_threshold"
        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True


# ---------------------------------------------------------------- MinHash shingles
# datatrove's own steps but two: spaces need no normalising before a split, and accents go by one
# regex instead of a Python loop over every character.
_LEAVE_SPACES_AND_ACCENTS = dataclasses.replace(
    DEF_TEXT_NORM_CONFIG, norm_whitespace=False, norm_unicode_diacritics=False
)
_COMBINING_MARKS = regex.compile(r"\p{Mn}+")


def simplified_words(text: str) -> list[str]:
    """The words of datatrove's simplify_text(text): lowercase, digits -> 0, no punctuation, no accents."""
    text = simplify_text(text, _LEAVE_SPACES_AND_ACCENTS)
    if not text.isascii():
        text = _COMBINING_MARKS.sub("", unicodedata.normalize("NFD", text))
    return text.split()


class FastMinhashDedupSignature(MinhashDedupSignature):
    """datatrove's MinHash signature step with cheaper shingles: the words of the simplified text (no
    punctuation is left, so a whitespace split), hashed with numpy like the n-grams above (polynomial,
    64-bit, the same in every process) instead of hashing each joined n-gram in Python."""

    def get_shingles(self, text: str) -> np.ndarray:
        words = simplified_words(text)
        if len(words) < self.config.n_grams:
            return np.empty((0, 1), dtype=np.uint64)
        return ngram_hashes(word_arrays(words)["ids"], self.config.n_grams).reshape(-1, 1)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        # datatrove's computation; one reshape instead of np.split, whose overhead per document was a
        # third of the step on short documents
        a, b = self.parameters
        phv = (shingles * a + b) % MERSENNE_PRIME
        if self.config.hash_config.precision == 32:
            phv = np.bitwise_and(phv, self.config.hash_config.max)
        lowest = np.min(phv, axis=0).astype(self.config.hash_config.np_dtype)
        return lowest.reshape(self.config.num_buckets, self.config.hashes_per_bucket).tolist()
