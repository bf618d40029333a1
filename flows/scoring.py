"""Scores the promotion gate compares: the candidate's from this run's evaluate metrics, and a
registered champion's re-measured on the current test split when that split changed since it was scored.

The test split is identified by the md5 of the finetune and pretrain test parquet files.

The task metric (`promote.metric`, resolved for `finetune.task`) is re-measured exactly as the evaluate
stage measures it: classification with `evaluate.classify` on the finetune source's test rows,
causal-lm with `evaluate.score_texts` on that source's test text. On the same model and split the
figure is the same as metrics/evaluate.json's. A test label the champion never saw counts as its error
(recall 0, and F1 0 for that label in macro-F1), never a crash.

A re-scored champion's base bits per byte comes from `score_texts` on the pretrain test documents,
tokenised by that base model's own tokenizer (the current tokenizer may be newer). The evaluate stage
reads the tokenize stage's packed `test.bin` instead: the same documents in the same non-overlapping
windows, separated by the same token (bos = eos), but test.bin also ends on an eos after the last
document, which evaluate scores and score_texts has no reason to. The token ids are otherwise the same,
so the two figures differ by that one token's loss over the split's bytes: measured 9.8e-4 bits/byte on
the tests' 8 kB test split (tests/test_flow.py), a millionth on a few MB, against a guard margin
(promote.max_bpb_regression) of 0.05. With `evaluate.max_eval_tokens` set, evaluate scores only the
first tokens while a re-score scores all of them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flows.promotion import Scores
from lmline import config
from lmline.tracking import registry

# The model code (tasks.evaluate and tasks.models load torch and transformers) is imported only where
# a champion is re-scored: every `lmline run` imports this module, a no-op run needs none of it.

# where each promote.metric sits in metrics/evaluate.json's `task` section
EVALUATE_KEYS = {"accuracy": "accuracy", "macro_f1": "macro_f1", "bits_per_byte": "test_bits_per_byte"}


def gate_config(params: config.Params) -> config.PromoteConfig:
    """params.promote with `auto` resolved for finetune.task."""
    return params.promote.resolved(params.finetune.task)


def test_split_id(params: config.Params, root: Path) -> str:
    clean = root / params.paths.clean
    h = hashlib.md5()
    for role in ("finetune", "pretrain"):
        path = clean / role / "test.parquet"
        h.update(path.read_bytes() if path.exists() else b"-")
    return h.hexdigest()


def _float(value) -> float | None:
    return None if value is None else float(value)


def candidate_scores(params: config.Params, root: Path, eval_metrics: dict) -> Scores:
    """This run's scores from metrics/evaluate.json; one not there is None (the gate then refuses)."""
    metric = (eval_metrics.get("task") or {}).get(EVALUATE_KEYS[gate_config(params).metric])
    bpb = (eval_metrics.get("lm") or {}).get("test_bits_per_byte")
    return Scores(_float(metric), _float(bpb), test_split_id(params, root))


def classification_score(params: config.Params, model_dir: Path, test: list[dict], metric: str) -> float:
    from tasks import evaluate, finetune_data, models

    model, tokenizer = models.load_classifier(model_dir)
    known = [model.config.id2label[i] for i in range(model.config.num_labels)]
    # labels the model never saw get ids it cannot predict: each of their rows is an error
    labels = known + sorted({r["label"] for r in test} - set(known))
    max_length = min(params.finetune.max_length, models.context_length(model.config))  # as finetune capped it
    predicted = evaluate.classify(model, tokenizer, [r["text"] for r in test], max_length, params.evaluate.batch_size)
    actual = evaluate.label_ids_of([r["label"] for r in test], labels)
    return finetune_data.classification_metrics(actual, predicted, len(labels))[metric]


def rescore_version(params: config.Params, root: Path, name: str, version: int) -> Scores:
    """Measure a registered fine-tuned model (and the base LM it came from) on the current test split."""
    import pyarrow.parquet as pq

    from tasks import evaluate, finetune_data, models

    clean = root / params.paths.clean
    metric = gate_config(params).metric
    rows = finetune_data.read_rows(clean, "test")
    source = finetune_data.pick_source(rows, params.finetune.source, finetune_data.split_path(clean, "test"))
    test = [r for r in rows if r["source"] == source]
    with registry.local_model(f"models:/{name}/{version}") as model_dir:
        if params.finetune.task == "classification":
            task_score = classification_score(params, model_dir, test, metric)
        else:
            lm, tokenizer = models.load_causal_lm(model_dir)
            task_score = evaluate.score_texts(lm, tokenizer, [r["text"] for r in test], params.evaluate.batch_size)[
                "bits_per_byte"
            ]

    bpb = None  # no base model recorded, or no pretrain test split: the gate refuses on a missing guard
    base = registry.version_tags(name, version).get("lmline.base_model")
    pretrain_test = clean / "pretrain" / "test.parquet"
    if base and pretrain_test.exists():
        with registry.local_model(f"models:/{base}") as base_dir:
            lm, lm_tokenizer = models.load_causal_lm(base_dir)
        texts = pq.read_table(pretrain_test, columns=["text"]).column("text").to_pylist()
        bpb = evaluate.score_texts(lm, lm_tokenizer, texts, params.evaluate.batch_size)["bits_per_byte"]
    return Scores(float(task_score), bpb, test_split_id(params, root))
