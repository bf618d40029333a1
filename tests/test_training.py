"""The training set-up pretrain and finetune share (tasks/training.py): why a run stopped, the loss CSV,
the Trainer arguments both stages start from."""

from __future__ import annotations

import torch

from tasks import training
from tasks.resume import TrainingClock


def test_stopped_by_names_the_budget_that_ended_training():
    within, spent = TrainingClock(budget_s=60), TrainingClock(budget_s=60, already_s=61)
    assert training.stopped_by(40, 40, spent) == "max_steps"  # the step budget first, as the schedule plans for it
    assert training.stopped_by(12, 40, spent) == "time_budget"
    assert training.stopped_by(12, 40, within) == "early_stopping"


def test_loss_csv_always_has_the_plotted_columns_and_the_final_figure_on_the_last_step(tmp_path):
    log = [
        {"step": 5, "loss": 2.0},
        {"step": 10, "loss": 1.5},
        {"step": 10, "eval_loss": 1.7, "eval_runtime": 0.1},
        {"step": 13, "train_runtime": 3.0, "train_loss": 1.6},
    ]
    rows = training.loss_history(log, final={"step": 13, "val_loss": 1.61234567})
    assert rows == [
        {"step": 5, "train_loss": 2.0},
        {"step": 10, "train_loss": 1.5, "val_loss": 1.7},
        {"step": 13, "val_loss": 1.612346},
    ]
    training.write_loss_csv(tmp_path / "loss.csv", rows)
    assert (tmp_path / "loss.csv").read_text().splitlines() == [
        "step,train_loss,val_loss",
        "5,2.0,",
        "10,1.5,1.7",
        "13,,1.612346",
    ]

    training.write_loss_csv(tmp_path / "short.csv", [])  # a run shorter than one log interval
    assert (tmp_path / "short.csv").read_text() == "step,train_loss,val_loss\n"


def test_both_stages_start_from_the_same_arguments(tmp_path):
    shared = dict(seed=3, max_steps=8, batch_size=4, eval_every=4, save_every=4, log_every=2)
    args = training.training_args(tmp_path, **shared, learning_rate=0.5)
    assert (args.seed, args.data_seed, args.max_steps, args.per_device_eval_batch_size) == (3, 3, 8, 4)
    assert args.learning_rate == 0.5 and args.report_to == [] and args.save_total_limit == 2
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert args.bf16 == gpu_bf16 and training.pick_precision() == ("bf16" if gpu_bf16 else "fp32")
