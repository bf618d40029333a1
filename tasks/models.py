"""The project's saved models and how they read text: what finetune, evaluate, the CLI and the scoring
flow share, so none of them needs another stage's module to load a model or encode an example.

A model folder is what `save_pretrained` wrote (config.json, weights, tokenizer); a fine-tuned one
also holds `finetune.json` (INFO_FILE), which says what it is: task, source, labels, max_length.
Text reaches a model as pretraining packed it: a bos (<|endoftext|>) before each document, no other
special token; a classification example ends on eos as well, so the classifier reads every example
out at the same token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lmline.errors import LmlineError
from lmline.io import read_json, write_json
from tasks.pooling import MEAN_POOLED

INFO_FILE = "finetune.json"  # inside a fine-tuned model's folder: what evaluate needs to know about the model


# ---------------------------------------------------------------- folders
def require_model(path: Path) -> None:
    if not (Path(path) / "config.json").exists():
        raise LmlineError(f"{path}: no saved model there (no config.json; has its stage run?)")


def context_length(model_config) -> int:
    # Llama-style configs call it max_position_embeddings, GPT-2 calls it n_positions.
    return getattr(model_config, "max_position_embeddings", None) or model_config.n_positions


def write_info(model_dir: Path, task: str, source: str, labels: list[str], max_length: int) -> None:
    write_json(
        Path(model_dir) / INFO_FILE, {"task": task, "source": source, "labels": labels, "max_length": max_length}
    )


def read_info(model_dir: Path) -> dict:
    """What finetune recorded about a fine-tuned model (task, source, labels, max_length)."""
    path = Path(model_dir) / INFO_FILE
    if not path.exists():
        raise LmlineError(f"{model_dir}: no fine-tuned model there (run the finetune stage first)")
    return read_json(path)


# ---------------------------------------------------------------- loading
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def architectures(path: Path, suffix: str, what: str) -> None:
    """Refuse a model whose saved architecture is not a ...`suffix` one: loading it as one would give
    it a random head and answers at random."""
    require_model(path)
    found = AutoConfig.from_pretrained(path).architectures or []
    if not any(a.endswith(suffix) for a in found):
        raise LmlineError(f"{path}: not {what} (architectures: {found})")


def load_causal_lm(path: Path):
    """A causal LM (on the device, for inference) and its tokenizer; refuses a classifier, whose
    lm_head would be silently random."""
    architectures(path, "ForCausalLM", "a causal language model")
    return AutoModelForCausalLM.from_pretrained(path).to(device()).eval(), AutoTokenizer.from_pretrained(path)


def classifier_class(path: Path):
    """The class that reads a saved classifier out as it was trained: a mean-pooled one (tasks/pooling.py,
    named in its config's architectures) as such, any other through AutoModelForSequenceClassification."""
    saved = AutoConfig.from_pretrained(path).architectures or []
    return next((c for c in MEAN_POOLED.values() if c.__name__ in saved), AutoModelForSequenceClassification)


def load_classifier(path: Path):
    """A sequence classifier with its trained head (on the device, for inference), and its tokenizer.
    Refuses a causal LM (or any model whose saved weights lack the head): transformers would add a
    random head and answer at random."""
    architectures(path, "ForSequenceClassification", "a fine-tuned classifier")
    model, info = classifier_class(path).from_pretrained(path, output_loading_info=True)
    if info["missing_keys"]:
        raise LmlineError(f"{path}: the classifier's weights lack {', '.join(sorted(info['missing_keys']))}")
    return model.to(device()).eval(), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- encoding
def bos_id(tokenizer) -> int:
    # Pretraining packs documents after an <|endoftext|>, which the tokenizer also declares as bos.
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def document_ids(tokenizer, text: str) -> list[int]:
    """One document's ids as pretraining saw them: bos first, no other special tokens."""
    return [bos_id(tokenizer)] + tokenizer(text, add_special_tokens=False)["input_ids"]


def classification_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """bos + text + eos, cut to max_length. The classifier reads the last non-pad position, so ending
    every example on the same eos token gives it the same read-out position whatever the text."""
    bos, eos = bos_id(tokenizer), tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[bos] + ids[: max_length - 2] + [eos] for ids in encoded]
