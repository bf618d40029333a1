"""Resumable training, shared by the pretrain and finetune stages.

A stage trains with `transformers.Trainer` into its checkpoint folder (params.paths.checkpoints/<stage>)
and may be killed at any point (kill -9, a lost machine). Re-running it with the same params and data
continues from the newest complete checkpoint and ends where an uninterrupted run would:
- `fingerprint.json` in the folder names what the checkpoints were trained on (the stage's params
  section, the seed, the input files); any change empties the folder and starts fresh, so a stale
  checkpoint never leaks into a new run.
- `clock.json`, written last into each checkpoint by `TrainingClock.on_save`, marks it complete (a run
  killed while saving leaves the newest checkpoint without one) and carries the training seconds spent
  so far, so a time budget counts earlier attempts, and whether training was told to stop there (the
  run was done, only its outputs were not yet written).
The stage never deletes its checkpoints: the shell does, once the outputs are written and logged
(lmline.stage_process.run_dvc_stage), so a failure anywhere before that still resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import PartialState
from pydantic import BaseModel
from transformers import TrainerCallback

from lmline.io import read_json, write_json

CLOCK_FILE = "clock.json"  # written last into each checkpoint: its presence marks the checkpoint complete
FINGERPRINT_FILE = "fingerprint.json"

log = logging.getLogger("lmline.resume")


def fingerprint(section: BaseModel, seed: int, files: list[Path]) -> str:
    """What must match for a checkpoint to be resumed: the stage's params section, the seed and the
    content of the input files that decide the data and the starting model."""
    h = hashlib.sha256()
    h.update(json.dumps(section.model_dump(mode="json"), sort_keys=True).encode())
    h.update(str(seed).encode())
    for path in files:
        with open(path, "rb") as fh:
            h.update(path.name.encode() + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


STORE_ENV = "LMLINE_DIST_STORE"  # the rendezvous file lmline.stage_process.launch_distributed gives its processes


def join_processes() -> None:
    """Join the process group of `lmline.stage_process.launch_distributed`'s processes, through the file it
    names (a FileStore): no TCP rendezvous store, so nothing listens beyond loopback. accelerate and
    the Trainer then find the group initialised and use it. Nothing to do for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.distributed.is_initialized():
        return
    store = os.environ.get(STORE_ENV)
    if not store:
        # Started by another launcher (torchrun, accelerate launch): accelerate joins its group itself.
        return
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # NCCL binds each rank to its GPU
    torch.distributed.init_process_group(
        backend="nccl" if on_gpu else "gloo",
        init_method=f"file://{store}",
        rank=int(os.environ["RANK"]),
        world_size=world,
    )


def processes() -> PartialState:
    """This process's place among the stage's processes (one, or launch_distributed's world). Without
    a GPU, accelerate treats the processes as distributed only when told `cpu`: they then use the gloo
    group, so `main_process_first()` really makes the other ranks wait for rank 0."""
    join_processes()
    return PartialState(cpu=not torch.cuda.is_available())


def device_args() -> dict:
    """TrainingArguments that make the Trainer run DDP across launch_distributed's processes: on CPUs (gloo)
    as on GPUs (NCCL, the default there). Without `use_cpu` transformers 5 leaves CPU processes
    unaware of each other: each trains alone."""
    on_cpu = not torch.cuda.is_available()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a backend for one process makes accelerate ask for a group
    return {"use_cpu": on_cpu, "ddp_backend": "gloo" if on_cpu and several else None}


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def read_clock(checkpoint: Path) -> dict:
    return read_json(checkpoint / CLOCK_FILE)


def resume_point(ckpt_dir: Path, expected: str) -> Path | None:
    """The newest complete checkpoint if `ckpt_dir` was written under the `expected` fingerprint, with
    any newer half-written one removed; otherwise empty the folder and return None."""
    marker = ckpt_dir / FINGERPRINT_FILE
    if marker.is_file() and read_json(marker).get("fingerprint") == expected:
        complete = [p for p in ckpt_dir.glob("checkpoint-*") if (p / CLOCK_FILE).is_file()]
        newest = max(complete, key=checkpoint_step, default=None)
        for partial in ckpt_dir.glob("checkpoint-*"):
            if not (partial / CLOCK_FILE).is_file() and (
                newest is None or checkpoint_step(partial) > checkpoint_step(newest)
            ):
                shutil.rmtree(partial)  # killed while saving: the Trainer would count it among the kept ones
        return newest
    if ckpt_dir.exists():
        log.info("%s was written for other params or data: starting fresh", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    write_json(marker, {"fingerprint": expected})
    return None


def finished(checkpoint: Path | None, max_steps: int, budget_s: float) -> bool:
    """Whether the run that saved `checkpoint` had nothing left to train: it was told to stop there
    (steps, time, early stopping). Resuming would make the Trainer take a step past the end."""
    if checkpoint is None:
        return False
    clock = read_clock(checkpoint)
    return bool(clock.get("stopping")) or clock["step"] >= max_steps or clock["train_seconds"] >= budget_s


class TrainingClock(TrainerCallback):
    """Training seconds, earlier attempts included, evaluation and checkpoint writes excluded. Stops
    training at the budget (checkpointing, and evaluating first when `evaluate_at_stop`), records the
    seconds as each checkpoint's last file, logs progress to `logger`."""

    def __init__(
        self, budget_s: float, already_s: float = 0.0, evaluate_at_stop: bool = False, logger: logging.Logger = log
    ):
        self.budget_s, self.already_s = budget_s, already_s
        self.evaluate_at_stop, self.log = evaluate_at_stop, logger
        self.started: float | None = None
        self.ended: float | None = None
        self.mark = 0.0  # when the last step ended, or the last pause was accounted
        self.paused = 0.0

    @classmethod
    def resumed(cls, budget_s: float, checkpoint: Path | None, **kwargs) -> "TrainingClock":
        return cls(budget_s, read_clock(checkpoint)["train_seconds"] if checkpoint else 0.0, **kwargs)

    def seconds(self) -> float:
        if self.started is None:
            return self.already_s
        return self.already_s + (self.ended or time.perf_counter()) - self.started - self.paused

    def this_attempt(self) -> float:
        return self.seconds() - self.already_s

    def seconds_left(self) -> float:
        return self.budget_s - self.seconds()

    @property
    def hit(self) -> bool:
        """The time budget ended (or will end) training."""
        return self.seconds() >= self.budget_s

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.mark = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()
        if self.seconds() >= self.budget_s:
            # stop, and checkpoint as a step-budget stop does: a crash in the final evaluation or
            # while saving the model then resumes with nothing left to train
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = control.should_evaluate or self.evaluate_at_stop

    def _pause(self) -> None:
        # The Trainer evaluates and saves between on_step_end and these hooks: take that time off.
        now = time.perf_counter()
        if self.started is not None and self.ended is None:
            self.paused += now - self.mark
        self.mark = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._pause()

    def on_save(self, args, state, control, **kwargs):
        self._pause()
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json(
                ckpt / CLOCK_FILE,
                {
                    "train_seconds": self.seconds(),
                    "step": state.global_step,
                    "stopping": bool(control.should_training_stop),
                },
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if isinstance(v, float))
            self.log.info("step %d/%d %s (%.0f s trained)", state.global_step, state.max_steps, shown, self.seconds())
