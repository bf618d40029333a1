"""finetune: adapt the pretrained LM to the labelled (finetune-role) data with `transformers.Trainer`.

finetune.task = classification: AutoModelForSequenceClassification from the pretrained checkpoint (the
body loads, the score head is new), labels = the sorted label set of the train split. Trained with
eval on val every `eval_every` steps, early stopping on val macro-F1, the best checkpoint kept, and a
training-time budget. A killed run resumes from its last checkpoint when re-run (tasks/resume.py).
finetune.task = causal-lm: continued next-token training on the same source's text (domain
adaptation); with `mask_prompt`, the text before `prompt_separator` gets no loss (labels -100).

Writes models/finetune (model + tokenizer + finetune.json, which tells evaluate what the model is),
plots/finetune_loss.csv, and returns metrics. Bad input fails with an LmlineError before training.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PrinterCallback,
    Trainer,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import SAFE_WEIGHTS_NAME

from lmline import progress
from lmline.config import FinetuneConfig, Params
from lmline.errors import LmlineError
from lmline.io import atomic_path, read_json, write_json
from tasks import resume
from tasks.resume import TrainingClock, checkpoint_step

ROLE = "finetune"  # the clean stage's directory for finetune-role sources
INFO_FILE = "finetune.json"  # inside the model dir: what evaluate needs to know about the model
IGNORE = -100  # label id the loss skips (torch cross_entropy's ignore_index)

log = logging.getLogger("lmline.finetune")


# ---------------------------------------------------------------- data
def split_path(clean_dir: Path, split: str) -> Path:
    return Path(clean_dir) / ROLE / f"{split}.parquet"


def read_rows(clean_dir: Path, split: str) -> list[dict]:
    path = split_path(clean_dir, split)
    if not path.exists():
        raise LmlineError(f"{path}: no finetune-role data (add an ingest source with role: finetune)")
    return pq.read_table(path).to_pylist()


def pick_source(rows: list[dict], wanted: str | None, path: Path) -> str:
    """The finetune source to train on: the configured one, or the only one present."""
    present = sorted({r["source"] for r in rows})
    if wanted is not None:
        if wanted not in present:
            raise LmlineError(f"{path}: no rows from finetune.source {wanted!r} (sources here: {present})")
        return wanted
    if len(present) != 1:
        raise LmlineError(f"{path}: {len(present)} finetune-role sources {present}: set finetune.source")
    return present[0]


def source_rows(clean_dir: Path, split: str, source: str) -> list[dict]:
    rows = [r for r in read_rows(clean_dir, split) if r["source"] == source]
    if not rows:
        raise LmlineError(f"{split_path(clean_dir, split)}: no rows from source {source!r}")
    return rows


def label_set(rows: list[dict], path: Path) -> list[str]:
    """Sorted labels of a training split; every row must have one and there must be two or more."""
    if not rows or "label" not in rows[0]:
        raise LmlineError(f"{path}: no `label` column (classification needs labels; or set finetune.task: causal-lm)")
    unlabelled = [r["id"] for r in rows if r["label"] in (None, "")]
    if len(unlabelled) == len(rows):
        raise LmlineError(f"{path}: the label column is empty (classification needs labels; or set finetune.task: causal-lm)")
    if unlabelled:
        raise LmlineError(f"{path}: row {unlabelled[0]!r} has no label ({len(unlabelled)} rows without one)")
    labels = sorted({r["label"] for r in rows})
    if len(labels) < 2:
        raise LmlineError(f"{path}: only one label ({labels[0]!r}); classification needs at least two")
    return labels


def label_ids(rows: list[dict], labels: list[str], path: Path) -> list[int]:
    index = {label: i for i, label in enumerate(labels)}
    for r in rows:
        if r.get("label") not in index:
            raise LmlineError(f"{path}: row {r['id']!r} has label {r.get('label')!r}, not one of the training labels {labels}")
    return [index[r["label"]] for r in rows]


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


def causal_lm_example(tokenizer, text: str, max_length: int, separator: str | None) -> dict[str, list[int]]:
    """input_ids/attention_mask/labels for next-token training on one document. With a separator, the
    prompt (text up to and including it) is encoded on its own, as generation will see it, and gets
    label -100 so only the response is learned; a separator that is absent leaves the whole text trained."""
    head, sep, tail = text.partition(separator) if separator else ("", "", text)
    prompt, response = (head + sep, tail) if sep else ("", text)
    prompt_ids = document_ids(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    # The model shifts labels itself: position 0 (bos) is never a target, and prompt positions are masked.
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


# ---------------------------------------------------------------- metrics
def classification_metrics(actual: list[int], predicted: list[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all labels (a label never predicted counts as F1 0, not skipped)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(actual, predicted)),
        "macro_f1": float(f1_score(actual, predicted, labels=list(range(n_labels)), average="macro", zero_division=0)),
    }


def loss_history(log_history: list[dict]) -> list[dict]:
    """Trainer's log_history -> one row per step: step, train_loss, val_loss, val_<metric>..."""
    rows: dict[int, dict] = {}
    for entry in log_history:
        row = rows.setdefault(entry["step"], {"step": entry["step"]})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
        for key, value in entry.items():
            if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
                row["val_" + key.removeprefix("eval_")] = value
    return [rows[step] for step in sorted(rows) if len(rows[step]) > 1]


def write_history(path: Path, rows: list[dict]) -> None:
    columns = ["step"] + sorted({k for r in rows for k in r} - {"step"}, key=lambda k: (k != "train_loss", k))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- training
def training_args(cfg: FinetuneConfig, seed: int, checkpoints: Path, best_metric: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine",
        eval_strategy="steps",
        eval_steps=cfg.eval_every,
        save_strategy="steps",  # load_best_model_at_end needs a checkpoint at every eval
        save_steps=cfg.eval_every,
        save_total_limit=2,  # the best and the latest
        load_best_model_at_end=True,
        # EarlyStoppingCallback's count of evals without improvement lives in the checkpoint's
        # trainer_state.json; without this a resumed run would forget it and train longer.
        restore_callback_states_from_checkpoint=True,
        metric_for_best_model=best_metric,
        greater_is_better=best_metric != "loss",
        logging_steps=max(1, cfg.eval_every // 10),  # a train-loss curve finer than the eval points
        report_to=[],  # the stage shell logs to MLflow; the Trainer must not open runs of its own
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **resume.device_args(),
        disable_tqdm=True,
    )


def require_model(path: Path) -> None:
    if not (Path(path) / "config.json").exists():
        raise LmlineError(f"{path}: no saved model there (no config.json; has its stage run?)")


def context_length(model_config) -> int:
    # Llama-style configs call it max_position_embeddings, GPT-2 calls it n_positions.
    return getattr(model_config, "max_position_embeddings", None) or model_config.n_positions


def classification_setup(cfg: FinetuneConfig, model_dir: Path, clean: Path, tokenizer, source: str, max_length: int):
    """(model, train, val, labels) for sequence classification; the score head is new, the body pretrained."""
    train_rows, val_rows = source_rows(clean, "train", source), source_rows(clean, "val", source)
    labels = label_set(train_rows, split_path(clean, "train"))

    def encode(rows: list[dict], split: str) -> list[dict]:
        ids = classification_ids(tokenizer, [r["text"] for r in rows], max_length)
        targets = label_ids(rows, labels, split_path(clean, split))
        return [{"input_ids": x, "attention_mask": [1] * len(x), "labels": y} for x, y in zip(ids, targets)]

    train, val = encode(train_rows, "train"), encode(val_rows, "val")  # bad labels fail before the model loads
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=tokenizer.pad_token_id,  # how the classifier finds each row's last real token
    )
    return model, train, val, labels


def causal_lm_setup(cfg: FinetuneConfig, model_dir: Path, clean: Path, tokenizer, source: str, max_length: int):
    """(model, train, val) for continued next-token training, the prompt masked if cfg.mask_prompt."""
    separator = cfg.prompt_separator if cfg.mask_prompt else None

    def encode(split: str) -> list[dict]:
        examples = [causal_lm_example(tokenizer, r["text"], max_length, separator) for r in source_rows(clean, split, source)]
        # A prompt longer than max_length leaves nothing to learn: such an example only adds a NaN loss.
        kept = [e for e in examples if any(y != IGNORE for y in e["labels"])]
        if not kept:
            raise LmlineError(f"{split_path(clean, split)}: no example has a response within finetune.max_length={max_length}")
        return kept

    train, val = encode("train"), encode("val")
    return AutoModelForCausalLM.from_pretrained(model_dir), train, val


def fit(trainer: Trainer, clock: TrainingClock, resume_from: Path | None, done: bool, max_steps: int) -> dict:
    """Train (resuming from `resume_from`), reload the best checkpoint, and score it on val; returns how
    the run went. `done`: the checkpoint is the end of a run that was killed before its outputs were
    written, so nothing is left to train: load its state and best model as train() would have left them."""
    if done:
        trainer.state = TrainerState.load_from_json(str(resume_from / TRAINER_STATE_NAME))
        best = trainer.state.best_model_checkpoint
        for checkpoint in [resume_from] + ([Path(best)] if best and Path(best).is_dir() else []):
            # strict=False as the Trainer loads its best model: tied weights are stored once
            loaded = trainer.model.load_state_dict(load_file(checkpoint / SAFE_WEIGHTS_NAME), strict=False)
            if loaded.unexpected_keys:
                raise LmlineError(f"{checkpoint}: not a checkpoint of this model (unexpected {loaded.unexpected_keys[:3]})")
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = loss_history(trainer.state.log_history)  # before evaluate() adds a row of its own
    steps = trainer.state.global_step
    return {
        "steps": steps,
        "best_step": trainer.state.best_global_step,
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else 0,
        "stopped_by": "time_budget" if clock.hit else "max_steps" if steps >= max_steps else "early_stopping",
        "train_seconds": round(clock.seconds(), 3),
        "history": history,
        "final": trainer.evaluate(),  # the best checkpoint, reloaded by load_best_model_at_end
    }


def fingerprint(params: Params, inputs: dict[str, Path]) -> str:
    """What a checkpoint must have been trained on to be resumed: the finetune section, the seed, the
    pretrained model (weights, config, tokenizer) and the finetune-role train and val data."""
    model_files = sorted(p for p in Path(inputs["model"]).iterdir() if p.is_file())
    data = [split_path(inputs["clean"], split) for split in ("train", "val")]
    return resume.fingerprint(params.finetune, params.project.seed, model_files + data)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    cfg, seed = params.finetune, params.project.seed
    require_model(inputs["model"])
    source = pick_source(read_rows(inputs["clean"], "train"), cfg.source, split_path(inputs["clean"], "train"))
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    if tokenizer.pad_token_id is None:
        raise LmlineError(f"{inputs['model']}: the tokenizer has no pad token")
    max_length = min(cfg.max_length, context_length(transformers.AutoConfig.from_pretrained(inputs["model"])))

    transformers.set_seed(seed)  # before the model loads: a new classification head is initialised there
    if cfg.task == "classification":
        model, train, val, labels = classification_setup(cfg, inputs["model"], inputs["clean"], tokenizer, source, max_length)
        collator, best_metric = DataCollatorWithPadding(tokenizer), "macro_f1"

        def compute_metrics(pred) -> dict[str, float]:
            return classification_metrics(pred.label_ids.tolist(), pred.predictions.argmax(-1).tolist(), len(labels))
    else:
        model, train, val = causal_lm_setup(cfg, inputs["model"], inputs["clean"], tokenizer, source, max_length)
        labels, best_metric, compute_metrics = [], "loss", None
        # pads labels with -100 as well as input_ids with the pad id (nothing seq2seq about it)
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)

    # Same params and data as the checkpoints: a killed run continues; anything else starts fresh.
    ckpt_dir = Path(outputs["checkpoints"])
    with resume.processes().main_process_first():  # several processes (launch_distributed): rank 0 decides, then the rest
        resume_from = resume.resume_point(ckpt_dir, fingerprint(params, inputs))
    clock = TrainingClock.resumed(cfg.max_minutes * 60, resume_from, evaluate_at_stop=True, logger=log)
    if resume_from:
        log.info("resuming from %s (%.1f s already trained)", resume_from, clock.already_s)
    done = resume.finished(resume_from, cfg.max_steps, clock.budget_s)
    bar = [] if done else [progress.training_bar(cfg.max_steps, clock.seconds_left, "finetune")]  # no training, no bar
    trainer = Trainer(
        model=model,
        args=training_args(cfg, seed, outputs["checkpoints"], best_metric),
        train_dataset=train,
        eval_dataset=val,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[EarlyStoppingCallback(cfg.early_stopping_patience), clock, *bar],
    )
    trainer.remove_callback(PrinterCallback)  # the clock logs progress through `logging` instead
    result = fit(trainer, clock, resume_from, done, cfg.max_steps)

    history = result.pop("history")
    if trainer.is_world_process_zero():  # several processes (launch_distributed): one writes the outputs
        write_history(outputs["loss"], history)
        with atomic_path(outputs["model"]) as tmp:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / INFO_FILE, {"task": cfg.task, "source": source, "labels": labels, "max_length": max_length})

    final = result.pop("final")
    metrics = {"task": cfg.task, "source": source, "train_examples": len(train), "val_examples": len(val), **result}
    metrics["val_loss"] = final["eval_loss"]
    metrics["devices"] = trainer.args.world_size
    if cfg.task == "classification":
        metrics.update(labels=labels, val_accuracy=final["eval_accuracy"], val_macro_f1=final["eval_macro_f1"])
    else:
        metrics.update(val_perplexity=math.exp(final["eval_loss"]), mask_prompt=cfg.mask_prompt)
    return metrics


def read_info(model_dir: Path) -> dict:
    """What finetune recorded about a fine-tuned model (task, source, labels, max_length)."""
    path = Path(model_dir) / INFO_FILE
    if not path.exists():
        raise LmlineError(f"{model_dir}: no fine-tuned model there (run the finetune stage first)")
    return read_json(path)
