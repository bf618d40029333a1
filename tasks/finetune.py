"""finetune: adapt the pretrained LM to the labelled (finetune-role) data with `transformers.Trainer`.

finetune.task = classification: AutoModelForSequenceClassification from the pretrained checkpoint (the
body loads, the score head is new), labels = the sorted label set of the train split. Trained with
eval on val every `eval_every` steps, early stopping on val macro-F1, the best checkpoint kept, and a
training-time budget. A killed run resumes from its last checkpoint when re-run (tasks/resume.py).
finetune.task = causal-lm: continued next-token training on the same source's text (domain
adaptation); with `mask_prompt`, the text before `prompt_separator` gets no loss (labels -100).

Writes models/finetune (model + tokenizer + finetune.json, which tells evaluate what the model is:
tasks/models.py), plots/finetune_loss.csv, and returns metrics. Bad input fails with an LmlineError
before training. The data helpers are tasks/finetune_data.py; the Trainer set-up shared with
pretrain is tasks/training.py.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import transformers
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import SAFE_WEIGHTS_NAME

from lmline.config import FinetuneConfig
from lmline.errors import LmlineError
from lmline.io import atomic_path
from tasks import resume, training
from tasks.finetune_data import (
    classification_metrics,
    label_ids,
    label_set,
    pick_source,
    read_rows,
    source_rows,
    split_path,
)
from tasks.models import classification_ids, context_length, document_ids, require_model, write_info
from tasks.pooling import MEAN_POOLED
from tasks.resume import TrainingClock, checkpoint_step

IGNORE = -100  # label id the loss skips (torch cross_entropy's ignore_index)

log = logging.getLogger("lmline.finetune")


# ---------------------------------------------------------------- encoding
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


# ---------------------------------------------------------------- training
def training_args(cfg: FinetuneConfig, seed: int, checkpoints: Path, best_metric: str) -> TrainingArguments:
    """The shared arguments (tasks/training.py) plus finetune's own: the Trainer's AdamW with a cosine
    schedule, and the best checkpoint kept and reloaded at the end."""
    return training.training_args(
        checkpoints,
        seed=seed,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        eval_every=cfg.eval_every,
        save_every=cfg.eval_every,  # load_best_model_at_end needs a checkpoint at every eval
        log_every=max(1, cfg.eval_every // 10),  # a train-loss curve finer than the eval points
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine",
        load_best_model_at_end=True,
        # EarlyStoppingCallback's count of evals without improvement lives in the checkpoint's
        # trainer_state.json; without this a resumed run would forget it and train longer.
        restore_callback_states_from_checkpoint=True,
        metric_for_best_model=best_metric,
        greater_is_better=best_metric != "loss",
        label_smoothing_factor=cfg.label_smoothing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )


def classification_setup(cfg: FinetuneConfig, model_dir: Path, clean: Path, tokenizer, source: str, max_length: int):
    """(model, train, val, labels) for sequence classification; the score head is new, the body pretrained."""
    train_rows, val_rows = source_rows(clean, "train", source), source_rows(clean, "val", source)
    labels = label_set(train_rows, split_path(clean, "train"))

    def encode(rows: list[dict], split: str) -> list[dict]:
        ids = classification_ids(tokenizer, [r["text"] for r in rows], max_length)
        targets = label_ids(rows, labels, split_path(clean, split))
        return [{"input_ids": x, "attention_mask": [1] * len(x), "labels": y} for x, y in zip(ids, targets)]

    train, val = encode(train_rows, "train"), encode(val_rows, "val")  # bad labels fail before the model loads
    model_type = transformers.AutoConfig.from_pretrained(model_dir).model_type
    classifier = MEAN_POOLED[model_type] if cfg.pooling == "mean" else AutoModelForSequenceClassification
    model = classifier.from_pretrained(
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
        examples = [
            causal_lm_example(tokenizer, r["text"], max_length, separator) for r in source_rows(clean, split, source)
        ]
        # A prompt longer than max_length leaves nothing to learn: such an example only adds a NaN loss.
        kept = [e for e in examples if any(y != IGNORE for y in e["labels"])]
        if not kept:
            raise LmlineError(
                f"{split_path(clean, split)}: no example has a response within finetune.max_length={max_length}"
            )
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
                raise LmlineError(
                    f"{checkpoint}: not a checkpoint of this model (unexpected {loaded.unexpected_keys[:3]})"
                )
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = training.loss_history(trainer.state.log_history)  # before evaluate() adds a row of its own
    steps = trainer.state.global_step
    return {
        "steps": steps,
        "best_step": trainer.state.best_global_step,
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else 0,
        "stopped_by": training.stopped_by(steps, max_steps, clock),
        "train_seconds": round(clock.seconds(), 3),
        "history": history,
        "final": trainer.evaluate(),  # the best checkpoint, reloaded by load_best_model_at_end
    }


def fingerprint(cfg: FinetuneConfig, seed: int, inputs: dict[str, Path]) -> str:
    """What a checkpoint must have been trained on to be resumed: the finetune section, the seed, the
    pretrained model (weights, config, tokenizer) and the finetune-role train and val data."""
    model_files = sorted(p for p in Path(inputs["model"]).iterdir() if p.is_file())
    data = [split_path(inputs["clean"], split) for split in ("train", "val")]
    return resume.fingerprint(cfg, seed, model_files + data)


def run(cfg: FinetuneConfig, seed: int, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    require_model(inputs["model"])
    source = pick_source(read_rows(inputs["clean"], "train"), cfg.source, split_path(inputs["clean"], "train"))
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    if tokenizer.pad_token_id is None:
        raise LmlineError(f"{inputs['model']}: the tokenizer has no pad token")
    max_length = min(cfg.max_length, context_length(transformers.AutoConfig.from_pretrained(inputs["model"])))

    transformers.set_seed(seed)  # before the model loads: a new classification head is initialised there
    if cfg.task == "classification":
        model, train, val, labels = classification_setup(
            cfg, inputs["model"], inputs["clean"], tokenizer, source, max_length
        )
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
    with (
        resume.processes().main_process_first()
    ):  # several processes (launch_distributed): rank 0 decides, then the rest
        resume_from = resume.resume_point(ckpt_dir, fingerprint(cfg, seed, inputs))
    clock = TrainingClock.resumed(cfg.max_minutes * 60, resume_from, evaluate_at_stop=True, logger=log)
    if resume_from:
        log.info("resuming from %s (%.1f s already trained)", resume_from, clock.already_s)
    done = resume.finished(resume_from, cfg.max_steps, clock.budget_s)
    trainer = training.make_trainer(
        "finetune",
        training_args(cfg, seed, outputs["checkpoints"], best_metric),
        clock,
        callbacks=(EarlyStoppingCallback(cfg.early_stopping_patience),),
        bar=not done,  # no training, no bar
        model=model,
        train_dataset=train,
        eval_dataset=val,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    result = fit(trainer, clock, resume_from, done, cfg.max_steps)

    history = result.pop("history")
    if trainer.is_world_process_zero():  # several processes (launch_distributed): one writes the outputs
        training.write_loss_csv(outputs["loss"], history)
        with atomic_path(outputs["model"]) as tmp:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_info(tmp, cfg.task, source, labels, max_length)

    final = result.pop("final")
    metrics = {"task": cfg.task, "source": source, "train_examples": len(train), "val_examples": len(val), **result}
    metrics["val_loss"] = final["eval_loss"]
    metrics["devices"] = trainer.args.world_size
    metrics["precision"] = training.pick_precision()
    if cfg.task == "classification":
        metrics.update(labels=labels, val_accuracy=final["eval_accuracy"], val_macro_f1=final["eval_macro_f1"])
    else:
        metrics.update(val_perplexity=math.exp(final["eval_loss"]), mask_prompt=cfg.mask_prompt)
    return metrics
