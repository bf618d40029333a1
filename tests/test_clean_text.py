"""The clean stage's text steps (tasks/clean_text.py) on hand-made text: normalisation, chunking, PII scrub."""

from __future__ import annotations

from clean_texts import ARTICLE, VERSE

from lmline.clean_config import PiiConfig
from tasks import clean_text


# ---------------------------------------------------------------- normalisation, chunking
def test_normalise_text_nfkc_controls_and_whitespace():
    text = "ﬁne\u00a0Ｗords\x00 and\x07 bells\t\tring  \r\nnext line   \n\n\n\nnew para  "
    assert clean_text.normalise_text(text) == "fine Words and bells ring\nnext line\n\nnew para"


def test_normalise_text_mends_mojibake_and_entities():
    assert clean_text.normalise_text("cafÃ© &amp; crÃ¨me") == "café & crème"


def test_plain_ascii_shortcut_changes_nothing_ftfy_would():
    for text in [ARTICLE, VERSE, "a &amp; b", "x\x1b[31mred", "tab\there", "emoji ☺ here"]:
        assert clean_text.normalise_text(text) == clean_text.normalise_whitespace(clean_text._FTFY.format(text))


def test_chunk_text_packs_paragraphs_then_lines_and_keeps_every_word():
    paragraphs = [f"Speaker {i}.\n" + "\n".join(f"line {i}.{j} of verse" for j in range(3)) for i in range(12)]
    text = "\n\n".join(paragraphs)
    chunks = clean_text.chunk_text(text, 120)
    assert len(chunks) > 1 and all(len(c) <= 120 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    long_paragraph = "\n".join(f"a long speech line number {j}" for j in range(20))
    assert all(len(c) <= 100 for c in clean_text.chunk_text(long_paragraph, 100))
    assert clean_text.chunk_text("one single line " * 20, 50) == [("one single line " * 20).strip()]


# ---------------------------------------------------------------- PII
def test_scrub_pii_replaces_and_counts_each_kind():
    text = (
        "Mail jane.doe@example.com or call (555) 123-4567 / +44 20 7946 0958. Servers 192.168.1.10 "
        "and 8.8.8.8; see https://example.com/a?b=1, or www.example.org."
    )
    scrubbed, found = clean_text.scrub_pii(text, PiiConfig())
    assert found == {"url": 2, "email": 1, "ip": 2, "phone": 2}
    for secret in ("jane.doe", "123-4567", "7946", "192.168", "8.8.8.8", "example.com", "example.org"):
        assert secret not in scrubbed
    assert scrubbed.startswith("Mail <EMAIL> or call <PHONE> / <PHONE>. Servers <IP> and <IP>; see <URL>, or <URL>.")


def test_scrub_pii_leaves_numbers_dates_and_disabled_kinds_alone():
    plain = "In 2017, 1,000 fans paid $94.14 on 01/06/2017 to see a 3-2 win; version 1.2.3 shipped."
    assert clean_text.scrub_pii(plain, PiiConfig()) == (plain, {"url": 0, "email": 0, "ip": 0, "phone": 0})
    kept, found = clean_text.scrub_pii("write to a@b.org", PiiConfig(email=False))
    assert kept == "write to a@b.org" and "email" not in found
    assert clean_text.scrub_pii("a@b.org", PiiConfig(enabled=False)) == ("a@b.org", {})
