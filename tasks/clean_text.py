"""The clean stage's text steps, pure functions and the datatrove steps around them: normalisation
(FTFY NFKC + whitespace), chunking long documents into paragraph-sized pieces, and the PII scrub that
replaces URLs, e-mail addresses, IPs and phone numbers by placeholders and counts them."""

from __future__ import annotations

import re
from functools import partial

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
from datatrove.pipeline.formatters.base import BaseFormatter

from lmline.clean_config import PiiConfig

PLACEHOLDERS = {"url": "<URL>", "email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>"}


# ---------------------------------------------------------------- normalisation (pure)
# datatrove's FTFY formatter: mends mojibake, removes control characters, unifies line breaks, NFKC.
_FTFY = FTFYFormatter(normalization="NFKC", fix_line_breaks=True)
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S\n ]")  # runs, or whitespace other than a space or newline
_LINE_EDGES = re.compile(r" \n ?|\n ")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise_whitespace(text: str) -> str:
    """One space between words, no spaces at line ends, at most one blank line between paragraphs."""
    text = _LINE_EDGES.sub("\n", _SPACES.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


_PRINTABLE_ASCII = re.compile(r"[\t\n\x20-\x7e]*")
_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")  # ftfy's own pattern


def normalise_text(text: str) -> str:
    # FTFY changes nothing in printable ASCII without HTML entities (most documents), yet it walks every
    # line in Python (~4 MB/s): skip it there.
    plain = _PRINTABLE_ASCII.fullmatch(text) and not _HTML_ENTITY.search(text)
    return normalise_whitespace(text if plain else _FTFY.format(text))


class Normalise(BaseFormatter):
    name = "normalise (FTFY NFKC + whitespace)"

    def format(self, text: str) -> str:
        return normalise_text(text)


# ---------------------------------------------------------------- chunking (pure)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Pack whole paragraphs into chunks of at most max_chars; a longer paragraph is packed line by line,
    and a single line longer than max_chars becomes a chunk of its own (words are never cut)."""
    chunks, current = [], ""
    for paragraph in _PARAGRAPH_BREAK.split(text.strip()):
        pieces = [paragraph] if len(paragraph) <= max_chars else paragraph.split("\n")
        for i, piece in enumerate(pieces):
            sep = "\n" if i else "\n\n"
            if current and len(current) + len(sep) + len(piece) > max_chars:
                chunks.append(current)
                current = ""
            current = current + sep + piece if current else piece
    if current:
        chunks.append(current)
    return chunks


# ---------------------------------------------------------------- PII (pure)
# datatrove's PIIFormatter covers e-mails and IPs (all IPs here: by default it keeps private ranges);
# it has no phone numbers or URLs, so those are lmline's regexes.
_DATATROVE_PII = PIIFormatter(
    only_remove_public_ips=False, email_replacement=PLACEHOLDERS["email"], ip_replacement=PLACEHOLDERS["ip"]
)
_URL = re.compile(r"\b(?:[a-zA-Z][a-zA-Z0-9+.-]*://|www\.)[^\s<>\"]*[^\s<>\".,;:!?)\]}'’”]")
# +country code, then (area) or area, then two or three groups; separators required, so plain numbers,
# years and dates do not match.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\) ?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])")


def _scrubber(kind: str, replace, could_match):
    placeholder = PLACEHOLDERS[kind]

    def scrub(text: str) -> tuple[str, int]:
        if not could_match(text):  # the full patterns are slow to find nothing: a cheap test first
            return text, 0
        before = text.count(placeholder)  # datatrove's replacers do not count; the placeholders tell
        text = replace(text)
        return text, text.count(placeholder) - before

    return scrub


_SCRUBBERS = {  # URLs first: an address or IP inside a URL goes with it
    "url": _scrubber("url", partial(_URL.sub, PLACEHOLDERS["url"]), lambda text: "://" in text or "www." in text),
    "email": _scrubber("email", _DATATROVE_PII.emails_replacer.replace, lambda text: "@" in text),
    "ip": _scrubber("ip", _DATATROVE_PII.ip_replacer.replace, re.compile(r"\d\.\d").search),
    "phone": _scrubber("phone", partial(_PHONE.sub, PLACEHOLDERS["phone"]), re.compile(r"\d{3}[ .-]\d{3}").search),
}


def scrub_pii(text: str, pii: PiiConfig) -> tuple[str, dict[str, int]]:
    """Replace URLs, e-mail addresses, IPs and phone numbers by placeholders; count them by kind."""
    found = {}
    for kind, scrub in _SCRUBBERS.items():
        if pii.enabled and getattr(pii, kind):
            text, found[kind] = scrub(text)
    return text, found


class ScrubPii(PipelineStep):
    name = "PII scrub"
    type = "✂️ - FORMAT"

    def __init__(self, pii: PiiConfig):
        super().__init__()
        self.pii = pii

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc.text, doc.metadata["pii"] = scrub_pii(doc.text, self.pii)
            yield doc
