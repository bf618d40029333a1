"""Scores the promotion gate compares: the candidate's from this run's evaluate metrics, and a
registered champion's re-measured on the current test split when that split changed since it was scored.

The test split is identified by the md5 of the finetune and pretrain test parquet files. A re-scored
champion's bits per byte comes from `score_texts` on the pretrain test documents (the same
non-overlapping windows as the evaluate stage, bos-separated instead of eos-separated: the same
token, so the figures agree to well within the guard's margin).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq

from flows.promotion import Scores
from lmline import config, tracking
from tasks import evaluate, finetune


def test_split_id(params: config.Params, root: Path) -> str:
    clean = root / params.paths.clean
    h = hashlib.md5()
    for role in ("finetune", "pretrain"):
        path = clean / role / "test.parquet"
        h.update(path.read_bytes() if path.exists() else b"-")
    return h.hexdigest()


def candidate_scores(params: config.Params, root: Path, eval_metrics: dict) -> Scores:
    metric = eval_metrics["task"][params.promote.metric]
    bpb = (eval_metrics.get("lm") or {}).get("test_bits_per_byte")
    return Scores(float(metric), None if bpb is None else float(bpb), test_split_id(params, root))


def rescore_version(params: config.Params, root: Path, name: str, version: int) -> Scores:
    """Measure a registered classifier (and the base LM it came from) on the current test split."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clean = root / params.paths.clean
    model_dir = tracking.resolve_model_uri(f"models:/{name}/{version}")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(evaluate.device())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = finetune.read_rows(clean, "test")
    source = finetune.pick_source(rows, params.finetune.source, finetune.split_path(clean, "test"))
    test = [r for r in rows if r["source"] == source]
    max_length = min(params.finetune.max_length, finetune.context_length(model.config))  # as finetune capped it
    predicted = evaluate.classify(model, tokenizer, [r["text"] for r in test], max_length, params.evaluate.batch_size)
    actual = evaluate.label_ids_of([r["label"] for r in test], labels)
    task = finetune.classification_metrics(actual, predicted, len(labels))

    bpb = None
    base = tracking.version_tags(name, version).get("lmline.base_model")
    pretrain_test = clean / "pretrain" / "test.parquet"
    if base and pretrain_test.exists():
        lm, lm_tokenizer = evaluate.load_causal_lm(tracking.resolve_model_uri(f"models:/{base}"))
        texts = pq.read_table(pretrain_test, columns=["text"]).column("text").to_pylist()
        bpb = evaluate.score_texts(lm, lm_tokenizer, texts, params.evaluate.batch_size)["bits_per_byte"]
    return Scores(float(task[params.promote.metric]), bpb, test_split_id(params, root))
