"""The training set-up pretrain and finetune share (LitGPT's shared-TrainArgs idea): one place for the
Trainer arguments both need, the precision, the callbacks, how a run says why it stopped, and the
loss-history CSV. What differs (pretrain's own AdamW and budget-aware schedule, finetune's best-model
and early-stopping settings) stays in the stage and reaches here as extra arguments.

Precision is picked once for both: `auto` is bf16 on a GPU that has it (Ampere and newer), else fp32;
such a GPU also runs fp32 matmuls on its tensor cores (tf32). On a CPU both stay fp32, so a CPU run's
numbers do not depend on this module.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from lmline import progress
from lmline.io import atomic_path
from tasks.resume import TrainingClock, device_args

# Why training ended, in the stage's metrics (`stopped_by`) and the model card.
MAX_STEPS, TIME_BUDGET, EARLY_STOPPING = "max_steps", "time_budget", "early_stopping"
KEEP_CHECKPOINTS = 2  # pretrain: a run killed while saving leaves the newest half-written, the one before is used;
# finetune: the best and the latest


def pick_precision(precision: str = "auto") -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def training_args(
    output_dir: Path,
    *,
    seed: int,
    max_steps: int,
    batch_size: int,
    eval_every: int,
    save_every: int,
    log_every: int,
    precision: str = "auto",
    **stage_args,
) -> TrainingArguments:
    """The Trainer arguments of a training stage; `stage_args` adds or overrides the stage's own."""
    picked = pick_precision(precision)
    on_gpu = torch.cuda.is_available()
    tf32 = on_gpu and torch.cuda.get_device_capability()[0] >= 8  # Ampere or newer: fp32 matmuls on tensor cores
    shared = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=save_every,
        save_total_limit=KEEP_CHECKPOINTS,
        logging_steps=log_every,
        seed=seed,
        data_seed=seed,
        bf16=picked == "bf16",
        fp16=picked == "fp16",
        tf32=True if tf32 else None,
        report_to=[],  # the stage shell logs to MLflow; the Trainer must not open runs of its own
        disable_tqdm=True,  # progress.training_bar shows progress where a person watches
        # Loader worker processes would add only IPC for data already in memory (or memory-mapped);
        # pinning needs a GPU.
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        **device_args(),
    )
    return TrainingArguments(**{**shared, **stage_args})


def make_trainer(
    stage: str,
    args: TrainingArguments,
    clock: TrainingClock,
    *,
    callbacks: tuple = (),
    bar: bool = True,
    **trainer_kwargs,
) -> Trainer:
    """A Trainer with the stage's callbacks, then the clock (time budget, checkpoint marker, progress
    log) and, unless `bar` is off (nothing left to train), the progress bar."""
    shown = [progress.training_bar(args.max_steps, clock.seconds_left, stage)] if bar else []
    trainer = Trainer(args=args, callbacks=[*callbacks, clock, *shown], **trainer_kwargs)
    trainer.remove_callback(PrinterCallback)  # the clock logs progress through `logging` instead
    return trainer


def stopped_by(steps: int, max_steps: int, clock: TrainingClock) -> str:
    """Why training ended: the step budget, the time budget, or else early stopping."""
    if steps >= max_steps:
        return MAX_STEPS
    return TIME_BUDGET if clock.hit else EARLY_STOPPING


# ---------------------------------------------------------------- loss history
def loss_history(log_history: list[dict], final: dict | None = None) -> list[dict]:
    """The Trainer's log_history -> one row per logged step: step, train_loss, val_loss, val_<metric>...
    (6 decimals). `final`: {"step": the last step, figure: value...}, measured after training (pretrain's
    whole-split val loss), which replace what that step logged."""
    rows: dict[int, dict] = {}
    for entry in log_history:
        row = rows.setdefault(entry["step"], {"step": entry["step"]})
        if "loss" in entry:
            row["train_loss"] = round(entry["loss"], 6)
        for key, value in entry.items():
            if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
                row["val_" + key.removeprefix("eval_")] = round(value, 6)
    if final:
        row = rows.setdefault(final["step"], {"step": final["step"]})
        row.update({k: round(v, 6) for k, v in final.items() if k != "step"})
    return [rows[step] for step in sorted(rows) if len(rows[step]) > 1]


def write_loss_csv(path: Path, rows: list[dict]) -> None:
    """step, train_loss, then the val_ columns in name order; a cell not measured at a step is blank.
    train_loss and val_loss are always there: dvc.yaml's plots draw them."""
    names = {k for r in rows for k in r} | {"train_loss", "val_loss"}
    columns = ["step"] + sorted(names - {"step"}, key=lambda k: (k != "train_loss", k))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
