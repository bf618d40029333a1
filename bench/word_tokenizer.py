"""Does clean's regex word tokenizer change what the quality filters keep? Measured against spaCy.

clean.word_tokenizer picks the words datatrove's quality filters count: `fast`, lmline's regex
(tasks/clean_fast.py), or `spacy`, datatrove's own English tokenizer (spaCy's rules, no model). For
every source in params.yaml's ingest (by default the three built-in samples: shakespeare, news,
rotten_tomatoes), this takes the documents as the filters see them (chunked by the source's
chunk_chars, normalised) and has each filter judge each of them twice, once with either tokenizer.
It reports the share of documents on which the two verdicts (keep or drop) are the same:

- per filter: the settings params.yaml gives the source, or datatrove's defaults where the source does
  not run that filter (`default`, to see the tokenizer under every filter on every corpus). Each filter
  judges every document that passes min_chars, independently of the other filters;
- `stage`: a document's fate under the source's rules as the stage runs them (min_chars, then the
  configured filters in order, each on what the previous ones left): what clean keeps before
  de-duplication. The overall `stage` share is the figure config.py and clean_fast.py quote;
- tokens: the share of spaCy's tokens the regex also yields (counted as a multiset, per document) and
  the regex's token count relative to spaCy's.

    python bench/word_tokenizer.py                   # every document (minutes: spaCy runs ~0.4 MB/s)
    python bench/word_tokenizer.py --max-docs 200    # the first 200 raw documents of each source

Prints a table and writes bench/results/word_tokenizer.json. Only agreement is reported: it does not
depend on machine load, the timings would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datatrove.data import Document  # noqa: E402
from datatrove.utils.text import split_into_words  # noqa: E402

import lmline  # noqa: E402,F401  (offline switches)
from lmline import config  # noqa: E402
from lmline.clean_config import CleanConfig, SourceFilters  # noqa: E402
from lmline.io import write_json  # noqa: E402
from tasks import clean, ingest  # noqa: E402
from tasks.clean_text import normalise_text  # noqa: E402

RESULTS = REPO / "bench" / "results" / "word_tokenizer.json"
TOKENIZERS = ("fast", "spacy")
DEFAULTS = SourceFilters(**{rule: {} for rule in clean.QUALITY_FILTERS})  # datatrove's own settings
EXAMPLES = 3  # disagreements kept per source and filter, for a reader to look at


def judged_documents(source, cfg: CleanConfig, max_docs: int | None) -> list[tuple[str, str]]:
    """(id, text) of the source's documents as the clean stage's filters receive them."""
    docs, _ = ingest.read_source(source)
    judged = []
    for doc in docs[:max_docs]:
        pieces = clean.source_documents(cfg, source.name, doc.text)
        judged += [(f"{source.name}:{doc.key}#{k}", normalise_text(piece)) for k, piece in enumerate(pieces)]
    return judged


def verdict(result) -> bool:
    return result is True  # a filter returns True, False or (False, reason)


def stage_keeps(rules: list, doc_id: str, text: str) -> bool:
    """Whether the rules keep the document, run as the stage runs them: in order, one Document passed on
    (C4 hands the next filter the lines it kept), stopping at the first that drops it."""
    doc = Document(text, doc_id)
    return all(verdict(rule.filter(doc)) for _, rule in rules)


class Tally:
    """Verdict pairs of one (source, filter): how many agree, and the first few that do not."""

    def __init__(self, settings: str):
        self.settings, self.docs, self.same, self.only_fast_keeps, self.only_spacy_keeps = settings, 0, 0, 0, 0
        self.examples: list[dict] = []

    def add(self, doc_id: str, text: str, fast: bool, spacy: bool) -> None:
        self.docs += 1
        self.same += fast == spacy
        self.only_fast_keeps += fast and not spacy
        self.only_spacy_keeps += spacy and not fast
        if fast != spacy and len(self.examples) < EXAMPLES:
            self.examples.append({"id": doc_id, "fast_keeps": fast, "text": text[:300]})

    def merge(self, other: Tally) -> None:
        for key in ("docs", "same", "only_fast_keeps", "only_spacy_keeps"):
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def as_dict(self) -> dict:
        share = self.same / self.docs if self.docs else None
        return {
            "settings": self.settings,
            "docs": self.docs,
            "same": self.same,
            "same_share": None if share is None else round(share, 5),
            "only_fast_keeps": self.only_fast_keeps,
            "only_spacy_keeps": self.only_spacy_keeps,
            "examples": self.examples,
        }


def measure_source(source, cfg: CleanConfig, max_docs: int | None) -> dict:
    rules = clean.source_rules(cfg, source.name)
    words = {name: clean.word_tokenizer(name) for name in TOKENIZERS}
    filters = {
        rule: {
            name: clean.make_filter(rule, rules.get(rule) or getattr(DEFAULTS, rule), words[name])
            for name in TOKENIZERS
        }
        for rule in clean.QUALITY_FILTERS
    }
    stage = {
        name: [(rule, clean.make_filter(rule, settings, words[name])) for rule, settings in rules.items()]
        for name in TOKENIZERS
    }
    tallies = {rule: Tally("params.yaml" if rule in rules else "default") for rule in clean.QUALITY_FILTERS}
    tallies["stage"] = Tally("params.yaml")
    tokens = Counter()
    for doc_id, text in judged_documents(source, cfg, max_docs):
        fast, spacy = (stage_keeps(stage[name], doc_id, text) for name in TOKENIZERS)
        tallies["stage"].add(doc_id, text, fast, spacy)
        if not clean.has_min_chars(Document(text, doc_id), rules["min_chars"]):
            continue  # the quality filters never see it
        split = {name: split_into_words(text, words[name]) for name in TOKENIZERS}
        tokens["documents"] += 1
        tokens["spacy"] += len(split["spacy"])
        tokens["fast"] += len(split["fast"])
        tokens["shared"] += sum((Counter(split["spacy"]) & Counter(split["fast"])).values())
        for rule, pair in filters.items():  # a fresh Document each: C4 deletes lines from the one it judges
            fast, spacy = (verdict(pair[name].filter(Document(text, doc_id))) for name in TOKENIZERS)
            tallies[rule].add(doc_id, text, fast, spacy)
    return {"tallies": tallies, "tokens": tokens}


def token_summary(tokens: Counter) -> dict:
    return {
        **tokens,
        "spacy_tokens_also_fast": round(tokens["shared"] / max(tokens["spacy"], 1), 5),
        "fast_per_spacy_token": round(tokens["fast"] / max(tokens["spacy"], 1), 5),
    }


def table(result: dict) -> str:
    rows = [f"{'corpus':16} {'filter':18} {'settings':12} {'docs':>7} {'same':>8} {'fast only':>10} {'spaCy only':>11}"]
    tallies = [(source, rule, t) for source, per in result["sources"].items() for rule, t in per["filters"].items()]
    for corpus, rule, t in tallies + [("overall", rule, t) for rule, t in result["overall"].items()]:
        share = "-" if t["same_share"] is None else f"{100 * t['same_share']:.2f}%"
        rows.append(
            f"{corpus:16} {rule:18} {t['settings']:12} {t['docs']:7} {share:>8} "
            f"{t['only_fast_keeps']:10} {t['only_spacy_keeps']:11}"
        )
    rows.append("same: share of documents judged alike; fast/spaCy only: documents kept with that tokenizer alone")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="e.g. clean.min_chars=50")
    parser.add_argument("--max-docs", type=int, default=None, help="raw documents per source (default: all)")
    args = parser.parse_args()

    params = config.load(args.params, args.overrides)
    load_before = os.getloadavg()
    measured = {s.name: measure_source(s, params.clean, args.max_docs) for s in params.ingest.sources}
    # pooled over the sources; a filter's settings are params.yaml's for some sources, defaults for others
    overall = {rule: Tally("mixed") for rule in clean.QUALITY_FILTERS}
    overall |= {"every_filter": Tally("mixed"), "stage": Tally("params.yaml")}
    for per in measured.values():
        overall["stage"].merge(per["tallies"]["stage"])
        for rule in clean.QUALITY_FILTERS:
            overall[rule].merge(per["tallies"][rule])
            overall["every_filter"].merge(per["tallies"][rule])
    result = {
        "params": str(args.params),
        "overrides": args.overrides,
        "max_docs": args.max_docs,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "sources": {
            name: {
                "filters": {rule: t.as_dict() for rule, t in per["tallies"].items()},
                "tokens": token_summary(per["tokens"]),
            }
            for name, per in measured.items()
        },
        "overall": {rule: {k: v for k, v in t.as_dict().items() if k != "examples"} for rule, t in overall.items()},
        "tokens": token_summary(sum((per["tokens"] for per in measured.values()), Counter())),
    }
    write_json(RESULTS, result)
    print(table(result))
    print("tokens:", json.dumps(result["tokens"]))
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
