"""Progress bars for people watching a terminal, and quiet, line-by-line logs for everything else.

Bars are drawn only when someone watches: when stderr is a terminal, or when a stage runs under
`lmline run` started in a terminal (the flow pipes stage output into Prefect's logs, so the stage
draws on /dev/tty instead: LMLINE_PROGRESS_TTY=1). `--quiet` turns them off everywhere. Where no bar
is drawn, the libraries' own bars (tqdm in datatrove, transformers, datasets, MLflow uploads) are
switched off too, so CI and Prefect logs get lines, not carriage-return debris.

The choice (`quiet`, `normal`, `verbose`) travels to child processes (dvc → `lmline stage`) in
LMLINE_VERBOSITY, so `lmline --quiet run` is quiet all the way down.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from typing import Callable, Iterable, TextIO

VERBOSITY_ENV = "LMLINE_VERBOSITY"
TTY_ENV = "LMLINE_PROGRESS_TTY"
STAGE_OUTPUT = "lmline_stage_output"  # log-record attribute: a line a stage process printed

# Loggers --verbose lowers to DEBUG: the project's own. Every other logger inherits the root's level,
# INFO at the lowest (lmline.cli.root.global_options).
OWN_LOGGERS = ("lmline", "tasks", "flows")
# Libraries whose INFO lines are per HTTP request, file lock or migration step: WARNING in every mode.
NOISY_LOGGERS = ("httpx", "httpcore", "alembic", "urllib3", "filelock", "websockets", "graphviz", "pydot", "git")

LIBRARY_BARS_OFF = {
    "TQDM_DISABLE": "1",  # tqdm's default for every bar that does not decide for itself
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers and huggingface_hub
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def verbosity() -> str:
    return os.environ.get(VERBOSITY_ENV, "normal")


def configure(verbose: bool = False, quiet: bool = False) -> int:
    """Decide this process's verbosity (flags win over the inherited choice), pass it on to child
    processes, switch library bars off unless we draw bars, and return the log level."""
    level = "verbose" if verbose else "quiet" if quiet else verbosity()
    os.environ[VERBOSITY_ENV] = level
    stream.cache_clear()
    if stream() is not sys.stderr:
        os.environ.update(LIBRARY_BARS_OFF)
        # transformers reads HF_HUB_DISABLE_PROGRESS_BARS at import: only a copy imported already needs
        # telling. Importing it here just to tell it would load it in every `lmline stage`, torch-free ones too.
        hf_logging = sys.modules.get("transformers.utils.logging")
        if hf_logging is not None:
            hf_logging.disable_progress_bar()
    return {"verbose": logging.DEBUG, "quiet": logging.WARNING}.get(level, logging.INFO)


@functools.cache
def stream() -> TextIO | None:
    """Where bars go: stderr if it is a terminal, /dev/tty under `lmline run` in a terminal, else nowhere."""
    if verbosity() == "quiet":
        return None
    if sys.stderr.isatty():
        return sys.stderr
    if os.environ.get(TTY_ENV) == "1":
        try:
            return open("/dev/tty", "w")  # noqa: SIM115 (kept open for the life of the process)
        except OSError:  # no controlling terminal (a Prefect worker, a daemon)
            return None
    return None


def bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    show: bool = True,
    **kwargs,
):
    """A tqdm bar (count, rate, ETA) when someone watches; otherwise a silent pass-through."""
    from tqdm.auto import tqdm

    out = stream()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=out,
        disable=out is None or not show,
        dynamic_ncols=True,
        mininterval=0.5,
        **kwargs,
    )


class BarSafeHandler(logging.StreamHandler):
    """A stderr handler that writes through tqdm, so a log line appears above the bars, not inside one."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (logging's own contract: never raise from emit)
            self.handleError(record)


def console_filter(record: logging.LogRecord) -> bool:
    """On the terminal, `lmline run` shows one line per stage and the summary; the stages' own output
    (every line the flow streams into Prefect's logs) appears only with --verbose, but for warnings."""
    if verbosity() == "verbose" or not getattr(record, STAGE_OUTPUT, False):
        return True
    return record.getMessage().startswith(("WARNING", "ERROR", "CRITICAL", "error:"))  # a stage's own complaints


def training_bar(max_steps: int, seconds_left: Callable[[], float] | None = None, desc: str = "train"):
    """A Trainer callback drawing one bar over the training steps. With a time budget the bar's
    total is the number of steps the budget will allow at the current rate, so the ETA is honest
    when the budget, not max_steps, ends training (the usual case on a CPU)."""
    from transformers import TrainerCallback

    class TrainingBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # one bar per training, not per process (launch_distributed starts one process per device)
            self.bar = bar(
                total=max_steps, initial=state.global_step, desc=desc, unit="step", show=state.is_world_process_zero
            )
            self.first_step, self.started = state.global_step, time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)
            done, elapsed = state.global_step - self.first_step, time.perf_counter() - self.started
            if seconds_left is not None and done and elapsed > 0:
                reachable = state.global_step + max(0.0, seconds_left()) * done / elapsed
                # no time budget (inf): the step budget is the total
                self.bar.total = max(state.global_step, round(min(max_steps, reachable)))

        def on_log(self, args, state, control, logs=None, **kwargs):
            shown = {
                k: f"{v:.4g}" for k, v in (logs or {}).items() if k in ("loss", "eval_loss") and isinstance(v, float)
            }
            if shown:
                self.bar.set_postfix(shown, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.total = self.bar.n  # stopped by the budget: the bar ends full
            self.bar.close()

    return TrainingBar()
