"""evaluate stage and `lmline evaluate-text`: LM scores against hand-computed values, baselines on a
separable toy set, the whole run() on tiny real models."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SEED, stage_io
from test_finetune import SOURCE, run_finetune, save_tiny_lm, toy_lm, toy_rows, write_clean, write_toy_clean
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lmline import config
from lmline.cli import app
from lmline.errors import LmlineError
from tasks import evaluate

EVAL = {"prompts": ["a great", "the cast"], "max_new_tokens": 5, "batch_size": 4}


def write_test_tokens(root: Path, tokenizer, texts: list[str]) -> tuple[int, int]:
    """data/tokens/test.bin + meta.json as the tokenize stage packs them (eos before each document)."""
    ids = [
        i for text in texts for i in [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    ]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    tokens = root / "data/tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    np.array(ids, dtype=np.uint16).tofile(tokens / "test.bin")
    meta = {
        "vocab_size": len(tokenizer),
        "dtype": "uint16",
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
        "splits": {"test": {"documents": len(texts), "tokens": len(ids), "bytes": n_bytes}},
        "bytes_per_token": {"test": n_bytes / len(ids)},
    }
    (tokens / "meta.json").write_text(json.dumps(meta))
    return len(ids), n_bytes


def uniform_lm(root: Path):
    path = toy_lm(root, uniform=True)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- LM scoring
def test_bits_per_byte_and_perplexity_by_hand():
    assert evaluate.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert evaluate.perplexity(3 * math.log(5), 3) == pytest.approx(5.0)


def test_uniform_model_scores_log2_vocab_per_token(workspace):
    model, tokenizer = uniform_lm(workspace)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (150,))  # context 64: two full windows and a 21-token tail
    nll, n = evaluate.total_nll(model, ids, 64, batch_size=1)
    assert n == 149 and nll == pytest.approx(149 * math.log(vocab), rel=1e-5)

    texts = ["a great film, truly superb.", "naïve café ☕"]  # multi-byte characters count as bytes
    scores = evaluate.score_texts(model, tokenizer, texts, batch_size=4)
    n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts) - 1
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert (scores["tokens"], scores["bytes"]) == (n_tokens, n_bytes)
    assert scores["bits_per_byte"] == pytest.approx(n_tokens * math.log2(vocab) / n_bytes, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(vocab, rel=1e-4)


def test_windows_are_non_overlapping_and_batching_does_not_change_them(workspace):
    path = toy_lm(workspace)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, model.config.vocab_size, (16 * 3 + 6,))
    # each window k: the model's own mean loss on ids[16k : 16k+17] (16 targets), or the 5-target tail
    expected = 0.0
    for start in range(0, len(ids) - 1, 16):
        window = ids[start : start + 17][None]
        with torch.no_grad():
            expected += model(input_ids=window, labels=window).loss.item() * (window.shape[1] - 1)
    for batch_size in (1, 2, 8):
        nll, n = evaluate.total_nll(model, ids, 16, batch_size)
        assert n == len(ids) - 1 and nll == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- baselines
def test_baselines_on_a_separable_toy_set():
    labels = ["fresh", "rotten"]
    train = toy_rows(40) + [r for r in toy_rows(10, 500) if r["label"] == "rotten"]  # 20 fresh, 25 rotten
    held_out = toy_rows(6, 200)
    test = [r for r in held_out if r["label"] == "fresh"] + [held_out[1]]
    assert [r["label"] for r in test] == ["fresh", "fresh", "fresh", "rotten"]
    cfg = config.EvaluateConfig()

    majority = evaluate.majority_baseline([r["label"] for r in train], [r["label"] for r in test], labels)
    # train is 25 rotten / 20 fresh: always "rotten" gets 1 of 4 right; F1 rotten = 2*.25*1/1.25, fresh 0
    assert majority == {"label": "rotten", "accuracy": 0.25, "macro_f1": pytest.approx(0.2)}
    pairs = [[(r["text"], r["label"]) for r in rows] for rows in (train, test)]
    tfidf = evaluate.tfidf_logreg_baseline(*pairs, labels, cfg, seed=0)
    assert tfidf == {"accuracy": 1.0, "macro_f1": 1.0}


def test_majority_ties_go_to_the_first_label_in_sort_order():
    assert evaluate.majority_baseline(["b", "a"], ["a", "b"], ["a", "b"])["label"] == "a"


# ---------------------------------------------------------------- the stage
def finetune_first(**finetune):
    """Fine-tune the toy LM as the evaluate tests need it (the finetune stage's outputs are evaluate's inputs)."""
    run_finetune(
        config.FinetuneConfig(
            batch_size=8, lr=5e-3, warmup_steps=0, max_steps=4, eval_every=2, max_length=64, **finetune
        )
    )


def run_evaluate():
    inputs, outputs = stage_io("evaluate")
    return evaluate.run(config.EvaluateConfig(**EVAL), SEED, inputs, outputs), outputs


def test_run_scores_lm_task_and_baselines(workspace):
    model, tokenizer = uniform_lm(workspace)
    write_toy_clean(workspace)
    test_texts = [r["text"] for r in toy_rows(30, 400)]
    n_tokens, n_bytes = write_test_tokens(workspace, tokenizer, test_texts)
    finetune_first()

    metrics, outputs = run_evaluate()

    lm = metrics["lm"]
    assert (lm["test_tokens"], lm["test_bytes"], lm["context"]) == (n_tokens, n_bytes, 64)
    assert lm["test_bits_per_byte"] == pytest.approx(n_tokens * math.log2(model.config.vocab_size) / n_bytes, rel=1e-5)
    assert set(metrics["task"]) == {"accuracy", "macro_f1", "test_examples", "confusion"}
    assert metrics["task"]["test_examples"] == 10
    assert sum(n for row in metrics["task"]["confusion"].values() for n in row.values()) == 10
    assert metrics["baselines"]["majority"] == {"label": "fresh", "accuracy": 0.5, "macro_f1": pytest.approx(1 / 3)}
    assert metrics["baselines"]["tfidf_logreg"]["accuracy"] == 1.0
    assert metrics["macro_f1_over_best_baseline"] == pytest.approx(metrics["task"]["macro_f1"] - 1.0)

    with open(outputs["confusion"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and [r["actual"] for r in rows] == [r["label"] for r in toy_rows(10, 200)]
    samples = outputs["samples"].read_text()
    assert "temperature=0.8 top_k=40 max_new_tokens=5 seed=1337" in samples
    assert all(f"## prompt: {p!r}\n{p}" in samples for p in EVAL["prompts"])

    again, _ = run_evaluate()  # same data + params + seed -> same metrics and samples
    assert again == metrics and outputs["samples"].read_text() == samples


def test_max_eval_tokens_caps_the_lm_score(workspace):
    model, tokenizer = uniform_lm(workspace)
    n_tokens, n_bytes = write_test_tokens(workspace, tokenizer, [r["text"] for r in toy_rows(30, 400)])
    cfg = config.EvaluateConfig(max_eval_tokens=50)
    lm = evaluate.evaluate_lm(model, workspace / "data/tokens", cfg)
    assert (lm["test_tokens"], lm["test_bytes"]) == (50, round(n_bytes * 50 / n_tokens))


def test_run_for_a_causal_lm_finetune_compares_with_the_base_model(workspace):
    toy_lm(workspace)
    tokenizer = AutoTokenizer.from_pretrained(workspace / "models/pretrain")
    rows = [dict(r, label=None) for r in toy_rows(30)]
    write_clean(workspace, {"train": rows[:20], "val": rows[20:25], "test": rows[25:]})
    write_test_tokens(workspace, tokenizer, [r["text"] for r in toy_rows(10, 400)])
    finetune_first(task="causal-lm")

    metrics, outputs = run_evaluate()

    assert set(metrics["task"]) == {"test_bits_per_byte", "test_perplexity", "test_tokens", "test_bytes"}
    base = metrics["baselines"]["base_model"]
    assert base["test_bytes"] == metrics["task"]["test_bytes"] == sum(len(r["text"]) for r in rows[25:])
    assert metrics["task"]["test_bits_per_byte"] < base["test_bits_per_byte"]  # it learned the toy domain
    assert "# fine-tuned model:" in outputs["samples"].read_text()
    assert outputs["confusion"].read_text() == "actual,predicted\n"  # the declared DVC out, with no classes


def test_run_without_a_finetuned_model_fails(workspace):
    toy_lm(workspace)
    with pytest.raises(LmlineError, match=r"^models/finetune: no fine-tuned model there"):
        run_evaluate()


# ---------------------------------------------------------------- lmline evaluate-text
def test_evaluate_text_on_any_file(workspace):
    model, tokenizer = uniform_lm(workspace)
    text = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate. ✓\n" * 3
    (workspace / "sonnet.txt").write_text(text, encoding="utf-8")

    result = CliRunner().invoke(app, ["evaluate-text", "--model", "models/pretrain", "sonnet.txt"])

    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert (scores["tokens"], scores["bytes"], scores["context"]) == (n_tokens, len(text.encode()), 64)
    assert scores["bits_per_byte"] == pytest.approx(
        n_tokens * math.log2(model.config.vocab_size) / len(text.encode()), rel=1e-5
    )
    assert scores["model"] == "models/pretrain" and scores["file"] == "sonnet.txt"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nowhere", "a.txt"], "error: nowhere: no model here"),
        (["--model", "models/pretrain", "missing.txt"], "error: missing.txt: no such file"),
        (["--model", "models/pretrain", "latin1.txt"], "error: latin1.txt: not UTF-8 text (byte 3)"),
        (["--model", "models/finetune", "a.txt"], "error: models/finetune: not a causal language model"),
    ],
)
def test_evaluate_text_bad_input_exits_1(workspace, args, message):
    save_tiny_lm(workspace / "models/pretrain", ["some text"])
    (workspace / "a.txt").write_text("hello")
    (workspace / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(workspace / "models/pretrain", num_labels=2).save_pretrained(
        workspace / "models/finetune"
    )
    result = CliRunner().invoke(app, ["evaluate-text", *args])
    assert result.exit_code == 1 and message in result.output


def test_evaluate_text_resolves_a_registered_model(workspace):
    from lmline.tracking import runs, store

    toy_lm(workspace, uniform=True)
    store.setup(config.Params.model_validate({"ingest": {"sources": [SOURCE]}}), workspace)
    import mlflow

    with mlflow.start_run():  # a stage logs the model; the retrain flow registers it
        model_id = runs.log_model(workspace / "models/pretrain", "lmline-base", "text-generation")
    version = mlflow.register_model(f"models:/{model_id}", "lmline-base").version
    (workspace / "notes.txt").write_text("the registry copy scores like the local one", encoding="utf-8")

    local = CliRunner().invoke(app, ["evaluate-text", "--model", "models/pretrain", "notes.txt"])
    registered = CliRunner().invoke(app, ["evaluate-text", "--model", f"models:/lmline-base/{version}", "notes.txt"])

    assert registered.exit_code == 0, registered.output
    local_scores, registered_scores = json.loads(local.stdout), json.loads(registered.stdout)
    assert registered_scores.pop("model") == f"models:/lmline-base/{version}"
    assert local_scores.pop("model") == "models/pretrain" and registered_scores == local_scores
