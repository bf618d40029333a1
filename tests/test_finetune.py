"""finetune stage: a real tiny Llama (2 layers, 64 wide, byte-level BPE) trained on a separable toy set.

The helpers here (tiny LM, toy clean data) are shared with tests/test_evaluate.py.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, SEED, stage_io
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lmline import config
from lmline.errors import LmlineError
from tasks import finetune, training
from tasks.models import classification_ids, document_ids, load_classifier, read_info

POSITIVE = ["great", "wonderful", "superb", "delightful", "brilliant"]
NEGATIVE = ["awful", "boring", "dreadful", "terrible", "tedious"]
THINGS = ["film", "movie", "story", "cast", "script", "ending"]
SOURCE = {"name": "rotten_tomatoes", "type": "sample", "role": "finetune"}


def review(i: int, label: str) -> str:
    words = POSITIVE if label == "fresh" else NEGATIVE
    # the noun cycles independently of the label, so only the adjectives carry it
    return f"a {words[i % 5]} {THINGS[(i // 2) % 6]}, truly {words[(i + 2) % 5]}."


def toy_rows(n: int, offset: int = 0, source: str = "rotten_tomatoes") -> list[dict]:
    labels = ["fresh", "rotten"]
    return [
        {
            "id": f"{source}-{offset + i}",
            "source": source,
            "text": review(offset + i, labels[i % 2]),
            "label": labels[i % 2],
        }
        for i in range(n)
    ]


def write_clean(root: Path, splits: dict[str, list[dict]], with_label: bool = True) -> Path:
    """data/clean/finetune/{split}.parquet in the clean stage's columns (id, source, text, label)."""
    fields = [("id", pa.string()), ("source", pa.string()), ("text", pa.string())]
    schema = pa.schema(fields + ([("label", pa.string())] if with_label else []))
    for split, rows in splits.items():
        path = root / "data/clean/finetune" / f"{split}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema), path)
    return root / "data/clean"


def write_toy_clean(root: Path) -> Path:
    return write_clean(root, {"train": toy_rows(40), "val": toy_rows(10, 100), "test": toy_rows(10, 200)})


def save_tiny_lm(path: Path, texts: list[str], context: int = 64, uniform: bool = False) -> Path:
    """A pretrain-stage-shaped model dir: byte-level BPE tokenizer (eos = bos = <|endoftext|>, pad <pad>)
    and a 2-layer Llama. uniform=True zeroes lm_head, so every next-token distribution is uniform."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=context,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )
    if uniform:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def toy_lm(root: Path, **kwargs) -> Path:
    texts = [r["text"] for r in toy_rows(60)] + ["Q: is it good?\n### Response:\nyes it is."]
    return save_tiny_lm(root / "models/pretrain", texts, **kwargs)


FAST = {"batch_size": 8, "lr": 5e-3, "warmup_steps": 0, "max_steps": 40, "eval_every": 10, "max_length": 32}


def finetune_cfg(**section) -> config.FinetuneConfig:
    return config.FinetuneConfig(**{**FAST, **section})


def run_finetune(cfg: config.FinetuneConfig):
    inputs, outputs = stage_io("finetune")
    return finetune.run(cfg, SEED, inputs, outputs), outputs


# ---------------------------------------------------------------- classification
def test_classification_run_writes_a_model_that_reloads_and_classifies(workspace):
    toy_lm(workspace)
    write_toy_clean(workspace)
    cfg = finetune_cfg(early_stopping_patience=1, pooling="mean")
    metrics, outputs = run_finetune(cfg)

    assert metrics["labels"] == ["fresh", "rotten"]
    assert metrics["val_accuracy"] == 1.0 and metrics["val_macro_f1"] == 1.0
    # val macro-F1 cannot beat 1.0: one more eval without improvement stops training
    assert metrics["stopped_by"] == "early_stopping" and metrics["steps"] == metrics["best_step"] + 10 < 40
    json.dumps(metrics)  # the shell writes it as JSON

    # Killed after its last checkpoint, before the shell deleted it: the re-run trains nothing more
    # and ends with the same best model and numbers.
    again, _ = run_finetune(cfg)
    assert (again["resumed_from_step"], metrics["resumed_from_step"]) == (metrics["steps"], 0)
    drop = ("train_seconds", "resumed_from_step")
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in metrics.items() if k not in drop}

    with open(outputs["loss"]) as fh:
        history = list(csv.DictReader(fh))
    assert list(history[0]) == ["step", "train_loss", "val_accuracy", "val_loss", "val_macro_f1"]
    assert sum(1 for r in history if r["val_loss"]) == metrics["steps"] // 10

    # Mean-pooled: the folder carries tasks/pooling.py, so plain transformers loads the
    # same read-out the project's loader uses, given trust_remote_code.
    assert (outputs["model"] / "pooling.py").read_text() == (REPO / "tasks" / "pooling.py").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(outputs["model"], trust_remote_code=True)
    ours, _ = load_classifier(outputs["model"])
    assert type(model).__name__ == type(ours).__name__ == "LlamaMeanPooledForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(outputs["model"])
    assert model.config.id2label == {0: "fresh", 1: "rotten"}
    assert read_info(outputs["model"]) == {
        "task": "classification",
        "source": "rotten_tomatoes",
        "labels": ["fresh", "rotten"],
        "max_length": 32,
    }
    texts = ["a superb cast, truly great.", "a dreadful script, truly boring."]  # word pairs never seen together
    ids = classification_ids(tokenizer, texts, 32)
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    logits = model.eval()(**batch).logits
    assert torch.equal(logits, ours.to("cpu")(**batch).logits)
    assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == ["fresh", "rotten"]
    assert not any(p.name.startswith(".") for p in outputs["model"].parent.iterdir())  # no temp dirs left


def test_same_seed_same_metrics(workspace):
    toy_lm(workspace)
    write_toy_clean(workspace)
    cfg = finetune_cfg(max_steps=6, eval_every=3)
    first, outputs = run_finetune(cfg)
    # the default read-out is transformers' own last-token class: no code of ours travels with the model
    assert AutoConfig.from_pretrained(outputs["model"]).architectures == ["LlamaForSequenceClassification"]
    assert not (outputs["model"] / "pooling.py").exists()
    shutil.rmtree(outputs["checkpoints"])  # as the shell does after logging: the next run starts fresh
    second, _ = run_finetune(cfg)
    drop = ("train_seconds",)
    assert {k: v for k, v in first.items() if k not in drop} == {k: v for k, v in second.items() if k not in drop}


def test_time_budget_stops_training(workspace):
    toy_lm(workspace)
    write_toy_clean(workspace)
    metrics, _ = run_finetune(finetune_cfg(max_minutes=1e-6, max_steps=40))
    assert metrics["stopped_by"] == training.TIME_BUDGET == "time_budget" and metrics["steps"] == 1


# ---------------------------------------------------------------- causal-lm
def test_prompt_masking_labels(workspace):
    tokenizer = AutoTokenizer.from_pretrained(toy_lm(workspace))
    sep = "\n### Response:\n"
    example = finetune.causal_lm_example(tokenizer, "Q: is it good?" + sep + "yes it is.", 64, sep)
    prompt = document_ids(tokenizer, "Q: is it good?" + sep)
    response = tokenizer("yes it is.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    assert example["input_ids"] == prompt + response
    assert example["labels"] == [-100] * len(prompt) + response
    plain = finetune.causal_lm_example(tokenizer, "no separator here", 64, sep)
    assert plain["labels"] == [-100] + plain["input_ids"][1:]  # only the bos is not a target
    cut = finetune.causal_lm_example(tokenizer, "Q: is it good?" + sep + "yes it is.", 5, sep)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 5


def test_causal_lm_run_with_prompt_masking(workspace):
    toy_lm(workspace)
    sep = "\n### Response:\n"
    rows = [
        {"id": f"qa-{i}", "source": "rotten_tomatoes", "text": f"Q: is the {t} good?{sep}yes, {w}.", "label": None}
        for i, (t, w) in enumerate(zip(THINGS * 4, POSITIVE * 5))
    ]
    write_clean(workspace, {"train": rows[:16], "val": rows[16:20], "test": rows[20:]})
    metrics, outputs = run_finetune(
        finetune_cfg(task="causal-lm", mask_prompt=True, max_steps=10, eval_every=5, max_length=64)
    )

    assert metrics["task"] == "causal-lm" and metrics["mask_prompt"] is True
    assert math.isfinite(metrics["val_loss"]) and metrics["val_perplexity"] == pytest.approx(
        math.exp(metrics["val_loss"])
    )
    model = AutoModelForCausalLM.from_pretrained(outputs["model"])
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert read_info(outputs["model"])["task"] == "causal-lm"


# ---------------------------------------------------------------- bad input
def one_label(root):
    rows = [dict(r, label="fresh") for r in toy_rows(10)]
    write_clean(root, {"train": rows, "val": rows})


def no_label_column(root):
    write_clean(root, {"train": toy_rows(10), "val": toy_rows(4)}, with_label=False)


def empty_labels(root):
    write_clean(root, {"train": [dict(r, label=None) for r in toy_rows(10)], "val": toy_rows(4)})


def one_unlabelled_row(root):
    rows = toy_rows(10)
    rows[3]["label"] = None
    write_clean(root, {"train": rows, "val": toy_rows(4)})


def unseen_val_label(root):
    write_clean(root, {"train": toy_rows(10), "val": [dict(r, label="meh") for r in toy_rows(4)]})


def no_finetune_data(root):
    (root / "data/clean/pretrain").mkdir(parents=True)


def two_sources(root):
    write_clean(root, {"train": toy_rows(10) + toy_rows(10, source="imdb"), "val": toy_rows(4)})


@pytest.mark.parametrize(
    "make_data, message",
    [
        (one_label, "train.parquet: only one label ('fresh'); classification needs at least two"),
        (no_label_column, "train.parquet: no `label` column"),
        (empty_labels, "train.parquet: the label column is empty"),
        (one_unlabelled_row, "train.parquet: row 'rotten_tomatoes-3' has no label (1 rows without one)"),
        (unseen_val_label, "val.parquet: row 'rotten_tomatoes-0' has label 'meh', not one of the training labels"),
        (no_finetune_data, "data/clean/finetune/train.parquet: no finetune-role data"),
        (two_sources, "2 finetune-role sources ['imdb', 'rotten_tomatoes']: set finetune.source"),
    ],
)
def test_bad_data_fails_before_training(workspace, make_data, message):
    toy_lm(workspace)
    make_data(workspace)
    with pytest.raises(LmlineError, match=re.escape(message)):
        run_finetune(finetune_cfg())
    assert not (workspace / "models/finetune").exists() and not (workspace / "checkpoints").exists()


def test_missing_model_fails(workspace):
    write_toy_clean(workspace)
    with pytest.raises(LmlineError, match=r"^models/pretrain: no saved model there"):
        run_finetune(finetune_cfg())


def test_prompts_longer_than_max_length_fail_before_training(workspace):
    toy_lm(workspace)
    rows = [
        {
            "id": f"qa-{i}",
            "source": "rotten_tomatoes",
            "text": "Q: " + "very " * 40 + "long?\n### Response:\nyes",
            "label": None,
        }
        for i in range(4)
    ]
    write_clean(workspace, {"train": rows, "val": rows})
    with pytest.raises(LmlineError, match=r"train.parquet: no example has a response within finetune.max_length=32"):
        run_finetune(finetune_cfg(task="causal-lm", mask_prompt=True))


def test_eval_every_beyond_max_steps_is_a_config_error(make_params):
    with pytest.raises(
        config.ConfigError, match=r"^params.yaml: finetune: eval_every \(50\) must be <= max_steps \(10\)"
    ):
        make_params({"ingest": {"sources": [SOURCE]}, "finetune": {**FAST, "max_steps": 10, "eval_every": 50}})


def test_loss_history_merges_train_and_eval_rows():
    log = [
        {"step": 2, "loss": 1.5, "learning_rate": 1e-3},
        {"step": 4, "loss": 1.2},
        {"step": 4, "eval_loss": 1.3, "eval_accuracy": 0.5, "eval_runtime": 0.1, "epoch": 1.0},
        {"step": 4, "train_runtime": 3.0},
    ]
    assert training.loss_history(log) == [
        {"step": 2, "train_loss": 1.5},
        {"step": 4, "train_loss": 1.2, "val_loss": 1.3, "val_accuracy": 0.5},
    ]
