"""tokenize: train a byte-level BPE tokenizer on the pretraining train split, then pack every pretraining
split into one flat token file for the pretrain stage.

Reads  <clean>/pretrain/{train,val,test}.parquet (column `text`; one row = one document).
Writes <tokenizer>/  a transformers fast tokenizer (AutoTokenizer.from_pretrained loads it offline);
       <tokens>/{train,val,test}.bin  every document's ids followed by eos, as raw little-endian uint16
                                      (uint32 once the vocabulary outgrows uint16): np.memmap-able;
       <tokens>/meta.json  vocab_size, dtype, eos_id, pad_id, per split {documents, tokens, bytes}
                           and bytes_per_token. `tokens` counts the eos after each document and
                           `bytes` (the documents' UTF-8) does not, so a mean loss per token L gives
                           L / ln 2 / bytes_per_token bits per byte.
The fine-tuning role's val and test splits are never packed (the finetune stage tokenises its labelled
rows itself). Domain-adaptive pretraining: `tokenize.mix` weights each source's train-split documents in
the packed train split, and may add a finetune-role source's train-split text (labels dropped) to it;
the val and test splits stay the pretraining role's, so bits/byte stays comparable (`mixed_train`).

Speed (bench/data_stages.py measures it; the target is >= 10 MB/s on 2 cores). Hugging Face's
pipeline spends ~1 µs on every pre-token and ~10 µs on every input string: `encode_batch` runs at
~3-4 MB/s per core here, and wrapping it in datasets.map(num_proc=2) adds 0.3-0.5 s of process and
Arrow round trips per split (bench --baselines). So documents are encoded by *segment*: cut (in
Arrow's C++, see SEGMENT_CUT) at points that are always pre-token boundaries, numbered with Arrow's
hash table, and only the distinct segments (~10% of the bytes of natural text) go through Hugging
Face, glued into one string per thread; numpy then assembles every document from those ids. The ids
are exactly those of encoding each document whole (tests compare them).

Threads, not processes (`tokenize.num_proc`, 0 = one per core): Arrow and the Rust tokenizer both
release the GIL, so nothing forks and the documents are never copied to workers. lmline turns the
Rust thread pool off process-wide (TOKENIZERS_PARALLELISM=false, because other stages fork); this
stage turns it on around its own calls (`rust_threads`). The BPE trains on a seeded sample of the
train split (`tokenize.train_sample_mb`): with a vocabulary this small, a few MB fix the merges.

Long runs without whitespace (a minified file, a base64 blob, a 1 MB line of letters) are one
pre-token each, and the BPE trainer's merges are quadratic in a pre-token's length (1 MB: minutes,
8 MB: hours). So the trainer sees such runs cut every MAX_TRAIN_RUN characters (`training_pieces`);
a sample without such runs is passed unchanged, so the tokenizer it trains is the same as before.
Encoding is not cut (its BPE is n log n in the pre-token's length): ids are those of the whole text.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmline import progress
from lmline.config import TokenizeConfig
from lmline.errors import LmlineError
from lmline.io import atomic_path, write_json

SPLITS = ("train", "val", "test")
ROLE = "pretrain"  # the pretraining role is packed whole; finetune's train split only through tokenize.mix
FINETUNE_ROLE = "finetune"

# Where documents are cut into segments: between a non-space character and a following space, tab or
# newline. That is always a boundary of the byte-level (GPT-2) pre-tokenizer: none of its regex's
# alternatives takes whitespace after a non-space character, and a piece that ends in a non-space
# character never looks ahead; so encoding the segments one by one gives exactly the ids of the whole.
# "Non-space" must hold for the tokenizer's regex engine too: the class below excludes all of Python's
# whitespace (str.isspace), which contains the engine's. RE2 syntax (Arrow), two groups kept around a cut.
CUT_SPACE = " \t\n\r"
SEGMENT_CUT = (
    r"([^\t\n\x0b\x0c\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}])"
    r"([ \t\n\r])"
)


# ---------------------------------------------------------------- reading
def split_paths(clean_dir: Path) -> dict[str, Path]:
    if not Path(clean_dir).is_dir():
        raise LmlineError(f"{clean_dir}: no clean data; run the clean stage first (dvc repro clean)")
    paths = {split: Path(clean_dir) / ROLE / f"{split}.parquet" for split in SPLITS}
    for split, path in paths.items():
        if not path.is_file():
            raise LmlineError(f"{path}: missing; the clean stage writes a {split} split for the {ROLE} role")
    return paths


def read_texts(path: Path) -> pa.Array:
    try:
        table = pq.ParquetFile(path).read(columns=["text"])  # a missing column is left out, not an error
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise LmlineError(f"{path}: not a readable parquet file ({exc})") from None
    if "text" not in table.column_names:
        raise LmlineError(f"{path}: no `text` column")
    texts = table.column("text").combine_chunks()
    if texts.null_count:
        raise LmlineError(f"{path}: row {pc.index(pc.is_null(texts), True).as_py()} has no text")
    return texts.cast(pa.large_string())  # 64-bit offsets: a split may hold more than 2 GB of text


def read_sources(path: Path) -> pa.Table:
    texts = read_texts(path)
    try:
        sources = pq.ParquetFile(path).read(columns=["source"])
    except (OSError, ValueError) as exc:
        raise LmlineError(f"{path}: not a readable parquet file ({exc})") from None
    if "source" not in sources.column_names:
        raise LmlineError(f"{path}: no `source` column (tokenize.mix weighs documents by source)")
    return pa.table({"text": texts, "source": sources.column("source").combine_chunks()})


def weighted(table: pa.Table, weights: dict[str, float], default: float, rng: np.random.Generator) -> pa.Array:
    """Each source's documents repeated floor(w) times plus a seeded subset of the fraction w - floor(w)."""
    pieces = []
    for source in sorted(set(table.column("source").to_pylist())):
        texts = table.filter(pc.equal(table.column("source"), source)).column("text").combine_chunks()
        weight = weights.get(source, default)
        whole, fraction = int(weight), weight - int(weight)
        pieces += [texts] * whole
        if fraction > 0:
            keep = np.sort(rng.permutation(len(texts))[: round(fraction * len(texts))])
            pieces.append(texts.take(keep))
    return pa.concat_arrays(pieces) if pieces else pa.array([], pa.large_string())


def mixed_train(clean_dir: Path, train_path: Path, mix: dict[str, float], seed: int) -> pa.Array:
    """The packed train split: the pretraining role's train documents (weight 1 unless tokenize.mix says
    otherwise) and the finetune role's train documents weighted by tokenize.mix (default 0: none).
    Only train splits: a finetune source's val/test text never reaches pretraining."""
    if not mix:
        return read_texts(train_path)
    rng = np.random.default_rng(seed)
    parts = [weighted(read_sources(train_path), mix, 1.0, rng)]
    finetune_train = Path(clean_dir) / FINETUNE_ROLE / "train.parquet"
    if finetune_train.is_file():
        parts.append(weighted(read_sources(finetune_train), mix, 0.0, rng))
    return pa.concat_arrays([p.cast(pa.large_string()) for p in parts])


def utf8_bytes(texts: pa.Array) -> int:
    return pc.sum(pc.binary_length(texts)).as_py() or 0


# ---------------------------------------------------------------- training
# Longest whitespace-free run the BPE trainer sees whole. Natural text (URLs included) stays under
# it; tokens are far shorter; the trainer's time per merge grows with it.
MAX_TRAIN_RUN = 256
# A run longer than that, found in linear time: only a run's first character can start a match.
_LONG_RUN = re.compile(r"(?<!\S)\S{%d,}" % (MAX_TRAIN_RUN + 1))


def training_pieces(texts: list[str]):
    """The texts for the trainer: as they are, but a text with a run longer than MAX_TRAIN_RUN is
    given in pieces cut inside such runs every MAX_TRAIN_RUN characters (joined, they are the text)."""
    for text in texts:
        start = 0
        for run in _LONG_RUN.finditer(text):
            for cut in range(run.start() + MAX_TRAIN_RUN, run.end(), MAX_TRAIN_RUN):
                yield text[start:cut]
                start = cut
        yield text[start:]


def training_sample(texts: pa.Array, max_mb: float | None, seed: int) -> list[str]:
    """Whole documents in a seeded random order until about `max_mb` MB (all of them for None)."""
    if max_mb is None:
        return texts.to_pylist()
    order = np.random.default_rng(seed).permutation(len(texts))
    sizes = np.cumsum(pc.binary_length(texts).to_numpy()[order])
    keep = np.searchsorted(sizes, max_mb * 1e6) + 1  # up to and including the document that reaches it
    return texts.take(order[:keep]).to_pylist()


@contextlib.contextmanager
def rust_threads(enabled: bool = True):
    """Let the Rust side use every core within the block; tokenizers reads the variable on each call.
    Nothing forks while it is on (a rayon thread pool does not survive fork())."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def train_tokenizer(texts: list[str], cfg: TokenizeConfig, threads: int = 1) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text encodes and decodes back exactly
    (no unknown token, no normaliser, no prefix space)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eos_token, cfg.pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress.stream() is sys.stderr,  # the Rust bar draws on stderr only
    )
    with rust_threads(threads > 1):
        tokenizer.train_from_iterator(training_pieces(texts), trainer)
    return tokenizer


def save_for_transformers(tokenizer: Tokenizer, cfg: TokenizeConfig, directory: Path) -> None:
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=cfg.eos_token,  # documents are packed after an eos, so eos also opens one
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x
    ).save_pretrained(directory)


# ---------------------------------------------------------------- encoding
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def plain_copy(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer for document text: a literal "<|endoftext|>" inside a document is text, not a
    document boundary, so special tokens are not matched (the packed eos ids are the only boundaries)."""
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.encode_special_tokens = True
    return plain


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    # A byte-level token's string has one character per byte it stands for.
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        lengths[token_id] = len(token)
    return lengths


def cut_marker(texts: pa.Array) -> str:
    """A character that no document contains, to mark the cuts with before splitting on it."""
    for candidate in ("\uffff", "\x00", "\ufffe", "\U0010ffff"):
        if not pc.any(pc.match_substring(texts, candidate)).as_py():
            return candidate
    raise LmlineError("every candidate cut marker occurs in the documents (U+FFFF, U+0000, U+FFFE, U+10FFFF)")


def segment(texts: pa.Array, marker: str) -> pa.Array:
    """Each document's segments (a list array): cut where SEGMENT_CUT matches, in Arrow's C++ (no GIL)."""
    return pc.split_pattern(pc.replace_substring_regex(texts, SEGMENT_CUT, "\\1" + marker + "\\2"), marker)


def gluable(segment: str) -> bool:
    """Starts with whitespace and ends without: glued after any such segment, the join is a boundary."""
    return segment[:1] in CUT_SPACE and segment != "" and not segment[-1].isspace()


def encode_glued(segments: list[str], tokenizer: Tokenizer, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, tokens per segment) of gluable segments, from encoding their concatenation in `parts`
    pieces (one per thread): a few calls instead of one per segment is where the time goes."""
    bounds = np.linspace(0, len(segments), parts + 1).astype(int)
    glued = ["".join(segments[a:b]) for a, b in zip(bounds, bounds[1:])]
    encodings = tokenizer.encode_batch_fast(glued, add_special_tokens=False)  # _fast: no offsets
    ids = np.array([i for e in encodings for i in e.ids], dtype=np.int64)
    # Cut the ids where each segment's bytes end; a token never crosses a cut (SEGMENT_CUT).
    token_ends = np.cumsum(token_byte_lengths(tokenizer)[ids])
    segment_ends = np.cumsum([len(s.encode("utf-8")) for s in segments], dtype=np.int64)
    cuts = np.searchsorted(token_ends, segment_ends, side="right")
    if len(segments) and not np.array_equal(token_ends[cuts - 1], segment_ends):
        raise RuntimeError("a token straddles two segments: the pre-tokenizer is not the one SEGMENT_CUT assumes")
    return ids, np.diff(cuts, prepend=0)


def segment_table(segments: list[str], tokenizer: Tokenizer, parts: int) -> tuple[np.ndarray, ...]:
    """(ids, starts, counts): segments[i] encodes to ids[starts[i] : starts[i] + counts[i]]."""
    glue = np.array([gluable(s) for s in segments], dtype=bool)
    glued_ids, glued_counts = encode_glued([s for s, g in zip(segments, glue) if g], tokenizer, parts)
    # The rest (a document's first or last segment, at most two per document) one by one.
    others = [s for s, g in zip(segments, glue) if not g]
    rest = [e.ids for e in tokenizer.encode_batch_fast(others, add_special_tokens=False)]
    ids = np.concatenate([glued_ids, np.array([i for r in rest for i in r], dtype=np.int64)])
    counts = np.empty(len(segments), dtype=np.int64)
    counts[glue], counts[~glue] = glued_counts, [len(r) for r in rest]
    layout = np.concatenate([np.flatnonzero(glue), np.flatnonzero(~glue)])  # whose ids come where in `ids`
    starts = np.empty(len(segments), dtype=np.int64)
    starts[layout] = np.cumsum(counts[layout]) - counts[layout]
    return ids, starts, counts


def gather(ids: np.ndarray, starts: np.ndarray, counts: np.ndarray, sequence: np.ndarray) -> np.ndarray:
    """ids[starts[k] : starts[k] + counts[k]] for each k in `sequence`, concatenated (vectorised)."""
    lengths = counts[sequence]
    positions = np.repeat(starts[sequence] - (np.cumsum(lengths) - lengths), lengths)
    positions += np.arange(len(positions))  # in place: these arrays are as long as the output
    return ids[positions]


def encode_documents(
    texts: pa.Array | list[str], tokenizer: Tokenizer, eos_id: int, threads: int = 1, dtype=np.int64
) -> np.ndarray:
    """Every document's ids followed by eos, as one array: the same ids as encoding each document
    whole, computed once per distinct segment (module docstring)."""
    texts = pa.array(texts, pa.large_string()) if isinstance(texts, list) else texts.cast(pa.large_string())
    tokenizer = plain_copy(tokenizer)
    marker = cut_marker(texts)
    bounds = np.linspace(0, len(texts), threads + 1).astype(int)
    slices = [texts.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        segments = pa.chunked_array(pool.map(segment, slices, [marker] * threads), pa.list_(pa.large_string()))
    # Number the distinct segments in order of first appearance (Arrow's hash table, in C++).
    distinct = pc.dictionary_encode(pc.list_flatten(segments)).combine_chunks()
    with rust_threads(threads > 1):
        ids, starts, counts = segment_table(distinct.dictionary.to_pylist(), tokenizer, threads)
    # Table row 0 is eos; the sequence is each document's segments (rows 1..) and then eos.
    ids = np.append(eos_id, ids).astype(dtype)
    starts, counts = np.append(0, starts + 1), np.append(1, counts)
    per_document = pc.list_value_length(segments).to_numpy().astype(np.int64)
    eos_at = np.cumsum(per_document + 1) - 1
    is_eos = np.zeros(int(per_document.sum()) + len(texts), dtype=bool)
    is_eos[eos_at] = True
    sequence = np.zeros(len(is_eos), dtype=np.int64)
    sequence[~is_eos] = distinct.indices.to_numpy().astype(np.int64) + 1
    return gather(ids, starts, counts, sequence)


def worker_count(num_proc: int) -> int:
    return num_proc or len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- stage
def run(cfg: TokenizeConfig, seed: int, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    threads = worker_count(cfg.num_proc)
    paths = split_paths(inputs["clean"])
    texts = {split: read_texts(path) for split, path in paths.items() if split != "train"}
    texts["train"] = mixed_train(inputs["clean"], paths["train"], cfg.mix, seed)
    if not len(texts["train"]):
        raise LmlineError(f"{paths['train']}: no documents to train the tokenizer on")

    train_started = time.perf_counter()
    sample = training_sample(texts["train"], cfg.train_sample_mb, seed)
    tokenizer = train_tokenizer(sample, cfg, threads)
    train_seconds = time.perf_counter() - train_started

    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    eos_id, pad_id = tokenizer.token_to_id(cfg.eos_token), tokenizer.token_to_id(cfg.pad_token)
    encode_started = time.perf_counter()
    packed = {
        split: encode_documents(texts[split], tokenizer, eos_id, threads, dtype)
        for split in progress.bar(SPLITS, desc="encode", unit="split")
    }
    encode_seconds = time.perf_counter() - encode_started

    splits = {
        split: {"documents": len(texts[split]), "tokens": len(packed[split]), "bytes": utf8_bytes(texts[split])}
        for split in SPLITS
    }
    bytes_per_token = {s: round(v["bytes"] / v["tokens"], 6) if v["tokens"] else None for s, v in splits.items()}
    meta = {
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "splits": splits,
        "bytes_per_token": bytes_per_token,
    }
    with atomic_path(outputs["tokenizer"]) as tokenizer_dir, atomic_path(outputs["tokens"]) as tokens_dir:
        save_for_transformers(tokenizer, cfg, tokenizer_dir)
        tokens_dir.mkdir()
        for split, ids in packed.items():
            ids.tofile(tokens_dir / f"{split}.bin")
        write_json(tokens_dir / "meta.json", meta)

    total_mb = sum(v["bytes"] for v in splits.values()) / 1e6
    return {
        "vocab_size": vocab_size,
        "splits": {s: {**v, "bytes_per_token": bytes_per_token[s]} for s, v in splits.items()},
        "train_sample_mb": round(sum(len(t.encode("utf-8")) for t in sample) / 1e6, 3),
        "tokenizer_train_seconds": round(train_seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        # the encoding alone; the stage's mb_per_s (over its whole process) is the shell's: lmline/stage_process.py
        "encode_mb_per_s": round(total_mb / encode_seconds, 2),
        "mb_in": round(total_mb, 3),
        "threads": threads,
    }
