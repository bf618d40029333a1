"""evaluate: score the pretrained LM and the fine-tuned model on the test splits, beside two baselines.

LM: bits per byte and perplexity of models/pretrain on data/tokens/test.bin. Windows are
non-overlapping: window k reads tokens [kC, kC+C) and predicts [kC+1, kC+C+1), C = the model's
context length, so every token is predicted exactly once with 0..C-1 tokens of context (a sliding
window would give each token more context and a lower figure). Bits per byte = total negative
log-likelihood in bits / UTF-8 bytes of the text those tokens encode, which compares models across
tokenizers; perplexity is per token and does not.

Task (classification): accuracy, macro-F1 and a confusion plot of models/finetune on the finetune
source's test split, beside a majority-class and a TF-IDF + logistic-regression baseline trained on
its train split: the LM should beat them to earn its keep. (causal-lm: bits per byte of the tuned
model on that test text, with the pretrained model as the baseline.)

Plus generation samples for evaluate.prompts. `evaluate_text` backs `lmline evaluate-text`.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from lmline import progress
from lmline.config import EvaluateConfig
from lmline.errors import LmlineError
from lmline.io import atomic_path, read_json
from tasks.finetune_data import classification_metrics, label_ids, source_rows, split_path
from tasks.models import (
    classification_ids,
    context_length,
    document_ids,
    load_causal_lm,
    load_classifier,
    read_info,
)


# ---------------------------------------------------------------- LM scoring (pure)
def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    return total_nll_nats / math.log(2) / n_bytes


def perplexity(total_nll_nats: float, n_tokens: int) -> float:
    return math.exp(total_nll_nats / n_tokens)


def _window_nll(model, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    device = next(model.parameters()).device
    logits = model(input_ids=inputs.to(device), use_cache=False).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum").item()


@torch.no_grad()
def total_nll(model, ids: torch.Tensor, context: int, batch_size: int) -> tuple[float, int]:
    """Sum of -ln p(token) over every token of `ids` after the first, in non-overlapping windows of
    `context` tokens (see the module docstring). Returns (nats, tokens predicted)."""
    model.eval()
    n_targets = len(ids) - 1
    n_full = n_targets // context
    inputs = ids[: n_full * context].view(n_full, context)
    targets = ids[1 : n_full * context + 1].view(n_full, context)
    batches = progress.bar(range(0, n_full, batch_size), desc="LM windows", unit="batch")
    nll = sum(_window_nll(model, inputs[i : i + batch_size], targets[i : i + batch_size]) for i in batches)
    tail = n_full * context  # the last, shorter window
    if tail < n_targets:
        nll += _window_nll(model, ids[tail:-1][None], ids[tail + 1 :][None])
    return nll, n_targets


def lm_scores(nll_nats: float, n_tokens: int, n_bytes: int, prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}bits_per_byte": bits_per_byte(nll_nats, n_bytes),
        f"{prefix}perplexity": perplexity(nll_nats, n_tokens),
        f"{prefix}tokens": n_tokens,
        f"{prefix}bytes": n_bytes,
    }


def score_texts(model, tokenizer, texts: list[str], batch_size: int) -> dict[str, float]:
    """Bits per byte / perplexity of documents, each after a bos as in pretraining, packed back to back.
    The bos is the only token not scored, so the tokens scored encode exactly the texts' bytes."""
    ids = torch.tensor([i for text in texts for i in document_ids(tokenizer, text)], dtype=torch.long)
    nll, n_tokens = total_nll(model, ids, context_length(model.config), batch_size)
    return lm_scores(nll, n_tokens, sum(len(t.encode("utf-8")) for t in texts))


# ---------------------------------------------------------------- classification (pure)
@torch.no_grad()
def classify(model, tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[int]:
    """Predicted label ids, encoded exactly as finetune encoded its training examples."""
    model.eval()
    device = next(model.parameters()).device
    predicted: list[int] = []
    for start in progress.bar(range(0, len(texts), batch_size), desc="classify", unit="batch"):
        ids = classification_ids(tokenizer, texts[start : start + batch_size], max_length)
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
        predicted += model(**batch).logits.argmax(-1).tolist()
    return predicted


def majority_baseline(train_labels: list[str], test_labels: list[str], labels: list[str]) -> dict:
    counts = Counter(train_labels)
    majority = min(labels, key=lambda label: (-counts[label], label))  # ties: the first in sort order
    scores = classification_metrics(
        label_ids_of(test_labels, labels), [labels.index(majority)] * len(test_labels), len(labels)
    )
    return {**scores, "label": majority}


def tfidf_logreg_baseline(
    train: list[tuple[str, str]], test: list[tuple[str, str]], labels: list[str], cfg: EvaluateConfig, seed: int
) -> dict:
    """Word n-gram TF-IDF + logistic regression on (text, label) pairs: the cheap model an LM must beat."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, cfg.tfidf_max_ngram), sublinear_tf=True)
    features = vectorizer.fit_transform([text for text, _ in train])
    classifier = LogisticRegression(C=cfg.logreg_c, max_iter=1000, random_state=seed)
    classifier.fit(features, label_ids_of([label for _, label in train], labels))
    predicted = classifier.predict(vectorizer.transform([text for text, _ in test])).tolist()
    return classification_metrics(label_ids_of([label for _, label in test], labels), predicted, len(labels))


def label_ids_of(values: list[str], labels: list[str]) -> list[int]:
    return [labels.index(v) for v in values]


def confusion_counts(actual: list[str], predicted: list[str], labels: list[str]) -> dict[str, dict[str, int]]:
    counts = Counter(zip(actual, predicted))
    return {a: {p: counts[(a, p)] for p in labels} for a in labels}


# ---------------------------------------------------------------- generation
@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], cfg: EvaluateConfig, seed: int) -> list[str]:
    """One sampled continuation per prompt; the seed is reset per prompt so a sample does not depend
    on which prompts came before it."""
    model.eval()
    device = next(model.parameters()).device
    context = context_length(model.config)
    samples = []
    for prompt in progress.bar(prompts, desc="generate", unit="prompt"):
        ids = torch.tensor([document_ids(tokenizer, prompt)], device=device)
        transformers.set_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=cfg.temperature,
            top_k=cfg.top_k,  # 0 = no top-k cut
            max_new_tokens=max(1, min(cfg.max_new_tokens, context - ids.shape[1])),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        samples.append(prompt + tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return samples


def format_samples(model_name: str, prompts: list[str], samples: list[str], cfg: EvaluateConfig, seed: int) -> str:
    header = (
        f"# {model_name}: temperature={cfg.temperature} top_k={cfg.top_k} "
        f"max_new_tokens={cfg.max_new_tokens} seed={seed}\n"
    )
    return header + "".join(f"\n## prompt: {p!r}\n{s}\n" for p, s in zip(prompts, samples))


# ---------------------------------------------------------------- I/O
def test_tokens(tokens_dir: Path, max_tokens: int | None) -> tuple[torch.Tensor, int]:
    """The packed test tokens (capped), after an eos so the first one is scored too, and the UTF-8
    bytes they encode: the split's bytes pro rata (exact when uncapped)."""
    meta_path = Path(tokens_dir) / "meta.json"
    if not meta_path.exists():
        raise LmlineError(f"{meta_path}: not found (run the tokenize stage first)")
    meta = read_json(meta_path)
    split = meta["splits"].get("test") or {}
    if not split.get("tokens"):
        raise LmlineError(f"{meta_path}: the test split has no tokens")
    packed = np.memmap(Path(tokens_dir) / "test.bin", dtype=meta["dtype"], mode="r")
    n = min(len(packed), max_tokens or len(packed))
    ids = torch.from_numpy(np.concatenate([[meta["eos_id"]], packed[:n]]).astype(np.int64))
    return ids, round(split["bytes"] * n / split["tokens"])


def evaluate_lm(model, tokens_dir: Path, cfg: EvaluateConfig) -> dict:
    ids, n_bytes = test_tokens(tokens_dir, cfg.max_eval_tokens)
    nll, n_tokens = total_nll(model, ids, context_length(model.config), cfg.batch_size)
    # names say which split; the window scheme is fixed (non-overlapping, the model's context)
    return {**lm_scores(nll, n_tokens, n_bytes, prefix="test_"), "context": context_length(model.config)}


def evaluate_classifier(
    tuned: Path, clean: Path, info: dict, cfg: EvaluateConfig, seed: int, confusion_csv: Path
) -> tuple[dict, dict]:
    labels, source = info["labels"], info["source"]
    train, test = source_rows(clean, "train", source), source_rows(clean, "test", source)
    label_ids(test, labels, split_path(clean, "test"))  # fails on a label the model never saw
    model, tokenizer = load_classifier(tuned)
    predicted = [
        labels[i] for i in classify(model, tokenizer, [r["text"] for r in test], info["max_length"], cfg.batch_size)
    ]
    actual = [r["label"] for r in test]

    with atomic_path(confusion_csv) as tmp, open(tmp, "w", newline="") as fh:
        # one row per example: DVC's confusion template counts rows itself
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip(actual, predicted))

    task = {
        **classification_metrics(label_ids_of(actual, labels), label_ids_of(predicted, labels), len(labels)),
        "test_examples": len(test),
        "confusion": confusion_counts(actual, predicted, labels),
    }
    baselines = {
        "majority": majority_baseline([r["label"] for r in train], actual, labels),
        "tfidf_logreg": tfidf_logreg_baseline(
            [(r["text"], r["label"]) for r in train], [(r["text"], r["label"]) for r in test], labels, cfg, seed
        ),
    }
    return task, baselines


def evaluate_causal(base, tuned, clean: Path, info: dict, cfg: EvaluateConfig) -> tuple[dict, dict]:
    """The tuned and the pretrained LM on the finetune source's test text: (task, baselines)."""
    texts = [r["text"] for r in source_rows(clean, "test", info["source"])]
    tuned_scores, base_scores = (score_texts(*lm, texts, cfg.batch_size) for lm in (tuned, base))
    return with_prefix(tuned_scores, "test_"), {"base_model": with_prefix(base_scores, "test_")}


def with_prefix(scores: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in scores.items()}


def run(cfg: EvaluateConfig, seed: int, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    info = read_info(inputs["tuned"])
    base = load_causal_lm(inputs["base"])

    metrics: dict = {"lm": evaluate_lm(base[0], inputs["tokens"], cfg)}
    if info["task"] == "classification":
        task, baselines = evaluate_classifier(inputs["tuned"], inputs["clean"], info, cfg, seed, outputs["confusion"])
        best = max(b["macro_f1"] for b in baselines.values())
        metrics.update(task=task, baselines=baselines, macro_f1_over_best_baseline=task["macro_f1"] - best)
        samplers = {"pretrained model": base}
    else:
        tuned = load_causal_lm(inputs["tuned"])
        metrics["task"], metrics["baselines"] = evaluate_causal(base, tuned, inputs["clean"], info, cfg)
        with atomic_path(outputs["confusion"]) as tmp:  # a declared DVC out: no classes, so no rows
            tmp.write_text("actual,predicted\n", encoding="utf-8")
        samplers = {"pretrained model": base, "fine-tuned model": tuned}

    text = "\n".join(
        format_samples(name, cfg.prompts, generate_samples(model, tokenizer, cfg.prompts, cfg, seed), cfg, seed)
        for name, (model, tokenizer) in samplers.items()
    )
    with atomic_path(outputs["samples"]) as tmp:
        tmp.write_text(text, encoding="utf-8")
    metrics["samples"] = len(cfg.prompts) * len(samplers)
    return metrics


def evaluate_text(model_path: Path, text_path: Path, batch_size: int = 16) -> dict:
    """`lmline evaluate-text`: bits per byte and perplexity of a causal LM on one UTF-8 text file,
    tokenised with the model's own tokenizer, in the same non-overlapping windows as the stage."""
    text_path = Path(text_path)
    if not text_path.is_file():
        raise LmlineError(f"{text_path}: no such file")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LmlineError(f"{text_path}: not UTF-8 text (byte {exc.start})") from None
    if not text:
        raise LmlineError(f"{text_path}: the file is empty")
    model, tokenizer = load_causal_lm(Path(model_path))
    scores = score_texts(model, tokenizer, [text], batch_size)
    return {"model": str(model_path), "file": str(text_path), "context": context_length(model.config), **scores}
