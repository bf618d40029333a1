"""Progress bars where a person watches (a terminal: here a real pseudo-terminal), plain lines elsewhere;
--quiet silences them all the way down to the stage processes; the terminal filter of `lmline run`."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys

from lmline import progress

BAR_SCRIPT = """
from types import SimpleNamespace
from lmline import progress
progress.configure()
for _ in progress.bar(range(3), desc="work", unit="doc"):
    pass
# a Trainer callback driven by hand: a budget already spent ends the bar at the steps taken
cb = progress.training_bar(max_steps=100, seconds_left=lambda: 0.0, desc="train")
state = SimpleNamespace(global_step=0, is_world_process_zero=True)
cb.on_train_begin(None, state, None)
for step in range(1, 6):
    state.global_step = step
    cb.on_step_end(None, state, None)
print("total", cb.bar.total, flush=True)
cb.on_train_end(None, state, None)
"""


def run_in_terminal(code: str, env: dict) -> str:
    """Run python `code` with stdout and stderr on a pseudo-terminal 100 columns wide; return what it drew."""
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LMLINE_VERBOSITY", "TQDM_DISABLE", progress.TTY_ENV)}
    return {**env, **extra}


def test_a_terminal_gets_bars_with_rate_and_an_honest_total():
    drawn = run_in_terminal(BAR_SCRIPT, clean_env())
    assert "work: 100%" in drawn and "3/3" in drawn and "doc/s" in drawn
    assert "total 5" in drawn, "with the budget spent, the bar's total is the steps taken, not max_steps"
    assert "train: 100%" in drawn and "5/5" in drawn


def test_quiet_silences_the_bars_and_passes_on_to_child_processes():
    drawn = run_in_terminal(BAR_SCRIPT, clean_env(LMLINE_VERBOSITY="quiet"))
    assert "work:" not in drawn and "train:" not in drawn and "total 5" in drawn


def test_no_terminal_no_bars_and_library_bars_off():
    out = subprocess.run(
        [sys.executable, "-c", BAR_SCRIPT + "\nimport os; print(os.environ['TQDM_DISABLE'])"],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "work:" not in out.stderr and "train:" not in out.stderr
    assert out.stdout.strip().endswith("1"), "libraries' tqdm bars are switched off too"


def test_the_terminal_filter_hides_stage_output_but_not_its_complaints(monkeypatch):
    def record(message: str, stage_output: bool) -> logging.LogRecord:
        r = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, message, None, None)
        if stage_output:
            setattr(r, progress.STAGE_OUTPUT, True)
        return r

    monkeypatch.setenv(progress.VERBOSITY_ENV, "normal")
    assert progress.console_filter(record("stage clean ran in 3.0s", False))
    assert not progress.console_filter(record('  "docs_out": 180,', True))
    assert progress.console_filter(record("WARNING lmline.tracking: model card not written", True))
    monkeypatch.setenv(progress.VERBOSITY_ENV, "verbose")
    assert progress.console_filter(record('  "docs_out": 180,', True))


def test_verbose_adds_the_stages_own_lines_not_library_debug_and_quiet_prints_the_summary_only(tmp_path):
    from conftest import lmline_cli, make_dvc_repo, tiny_params

    root = make_dvc_repo(tmp_path, tiny_params())
    verbose = lmline_cli(root, "--verbose", "run", "--stage", "ingest")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    lines = (verbose.stdout + verbose.stderr).splitlines()
    # what the stage process printed (its metrics JSON), streamed through the flow's log
    assert any('"documents": 180' in line for line in lines), lines
    # libraries log at INFO at the lowest: before, --verbose printed ~580 DEBUG lines for this one stage
    # (httpcore, websockets, graphviz, pydot, GitPython), from the flow and from the stage process alike
    library_debug = [
        line for line in lines if "DEBUG " in line and not line.split("DEBUG ", 1)[1].startswith(progress.OWN_LOGGERS)
    ]
    assert library_debug == []
    assert not any(line.startswith("INFO httpx") for line in lines)

    quiet = lmline_cli(root, "--quiet", "run", "--stage", "ingest", "--force")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == ""
    out = [line for line in quiet.stdout.splitlines() if line.strip()]
    assert out[0].startswith("lmline retrain: 1 of 1 stages ran")
    assert out[1].split() == ["stage", "status", "time", "key", "numbers"] and out[2].startswith("ingest  ran")
    assert not any('"documents"' in line or line.startswith(("INFO", "DEBUG")) for line in out)
