"""Training on several devices: `pretrain.devices: 2` makes `lmline stage pretrain` relaunch itself as 2
processes (CPU, gloo here) meeting through a file; the Trainer runs DDP and rank 0 alone writes and logs.
Nothing of the run listens beyond loopback (issue 13)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import mlflow
import psutil
import pytest
from conftest import BIN, write_params
from test_faults import stage_env
from test_pretrain import (  # noqa: F401  (fixtures: the tiny tokenized corpus in a workspace)
    TINY,
    complete_checkpoints,
    stage,
    tokenized,
)

from lmline import config

STEPS = 12
SHAPE = {"max_steps": STEPS, "eval_every": 6, "checkpoint_every": 6, "log_every": 3, "warmup_steps": 2}
# Same seed, same initial weights, same global batch (8 windows a step) and the same LR schedule, but
# not the same windows: one process takes 8 in a row from the seeded shuffle, two processes take 4
# each from the DistributedSampler's interleaved split of it. Measured on this corpus (2-core CPU,
# under load): 4.4391 vs 4.4389 after 12 steps, 2.7957 vs 2.7946 after 60. The tolerance leaves a wide
# margin for that sampling noise while still far below what 12 steps learn (about 1.3 nats here).
LOSS_TOLERANCE = 0.02


LOOPBACK = {"127.0.0.1", "::1"}


def write_stage_params(workspace, **pretrain) -> None:
    """The params.yaml `lmline stage pretrain` reads in the workspace; the tests' `stage` fixture has
    linked the tokenized data in at the paths it names."""
    write_params(
        workspace / "params.yaml",
        {
            "project": {"seed": 7},
            "paths": {**config.PathsConfig().model_dump(), "tokenizer": "shared/tokenizer", "tokens": "shared/tokens"},
            "ingest": {"sources": [{"name": "shakespeare", "type": "sample"}]},
            "pretrain": {**TINY, **pretrain},
        },
    )


def run_launcher(workspace, *overrides: str, listeners: set | None = None) -> tuple[dict, str]:
    """Run the stage; with `listeners`, collect into it the (address, port) of every listening socket
    of the launcher and its descendants, polled while the run lasts."""
    cmd = [str(BIN / "lmline"), "stage", "pretrain"]
    for item in overrides:
        cmd += ["--set", item]
    launcher = subprocess.Popen(
        cmd, cwd=workspace, env=stage_env(workspace), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if listeners is not None:
        poller = threading.Thread(target=poll_listeners, args=(launcher, listeners), daemon=True)
        poller.start()
    stdout, stderr = launcher.communicate(timeout=300)
    if listeners is not None:
        poller.join(timeout=30)
    assert launcher.returncode == 0, stderr[-3000:]
    return json.loads((workspace / "metrics/pretrain.json").read_text()), stdout


def poll_listeners(launcher: subprocess.Popen, found: set) -> None:
    root = psutil.Process(launcher.pid)
    while launcher.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.Error:  # the launcher ended meanwhile
            return
        for process in family:
            try:
                found.update(
                    (c.laddr.ip, c.laddr.port)
                    for c in process.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN
                )
            except psutil.Error:  # gone meanwhile
                continue
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.integration  # ~35 s each on 2 cores: `make test-integration`, run by .ci/run after `make test`
def test_two_processes_train_one_model_with_the_same_global_batch(stage, workspace):  # noqa: F811
    write_stage_params(workspace, **SHAPE)
    single, _ = run_launcher(workspace, "pretrain.batch_size=8")
    model = workspace / "models/pretrain"
    single_model = (model / "model.safetensors").stat().st_mtime_ns

    listeners: set = set()
    ddp, stdout = run_launcher(workspace, "pretrain.batch_size=4", "pretrain.devices=2", listeners=listeners)
    # gloo's sockets are among those seen (the check cannot pass vacuously); torchrun's rendezvous
    # store, which listened on '::', is gone: every listener is on loopback
    assert listeners, "no listening socket seen during the 2-process run"
    assert {ip for ip, _ in listeners} <= LOOPBACK, f"listening beyond loopback: {sorted(listeners)}"
    assert stdout.count('"pretrain":') == 1  # the result printed once, not once per process
    assert (ddp["devices"], single["devices"]) == (2, 1)
    assert ddp["steps"] == single["steps"] == STEPS
    assert ddp["tokens_seen"] == single["tokens_seen"] == STEPS * 8 * 32  # the same global batch
    assert ddp["mlflow_run_id"] != single["mlflow_run_id"]
    assert (model / "model.safetensors").stat().st_mtime_ns != single_model  # the 2-process run wrote it
    assert sorted(p.name for p in model.parent.iterdir()) == ["pretrain"]
    rows = (workspace / "plots/pretrain_loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3", "6", "9", "12"]  # written once, whole
    assert not (workspace / "checkpoints/pretrain").exists()  # deleted once the run was logged
    print(
        f"\nval_loss 1 process {single['val_loss']}, 2 processes {ddp['val_loss']}; tokens/s "
        f"{single['tokens_per_second']} vs {ddp['tokens_per_second']}; listening: {sorted(listeners)}"
    )
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], abs=LOSS_TOLERANCE)

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 2  # one per stage run: ranks other than 0 opened none
    by_id = {r.info.run_id: r for r in runs}
    logged = by_id[ddp["mlflow_run_id"]]
    assert logged.info.status == "FINISHED" and logged.data.metrics["devices"] == 2


@pytest.mark.slow
@pytest.mark.integration  # ~35 s each on 2 cores: `make test-integration`, run by .ci/run after `make test`
def test_a_killed_launcher_takes_its_workers_along_and_the_rerun_resumes(stage, workspace):  # noqa: F811
    write_stage_params(workspace, **{**SHAPE, "max_steps": 60})
    ddp = ["--set", "pretrain.batch_size=4", "--set", "pretrain.devices=2"]
    ckpt_dir = workspace / "checkpoints/pretrain"
    launcher = subprocess.Popen(
        [str(BIN / "lmline"), "stage", "pretrain", *ddp],
        cwd=workspace,
        env=stage_env(workspace),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while not complete_checkpoints(ckpt_dir) and launcher.poll() is None:
            time.sleep(0.02)
        started = psutil.Process(launcher.pid).children(recursive=True)  # the 2 workers, the guard's watcher
        launcher.send_signal(signal.SIGKILL)
    finally:
        _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{err.decode()[-2000:]}"
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left running after the launcher died: {[p.cmdline()[:4] for p in alive]}"
    # orphaned workers would have finished the run: written the model, deleted the checkpoints
    assert not (workspace / "models/pretrain").exists(), "the workers outlived the launcher and finished"
    last = complete_checkpoints(ckpt_dir)[-1]

    metrics, _ = run_launcher(workspace, "pretrain.batch_size=4", "pretrain.devices=2")
    assert metrics["resumed_from_step"] == last > 0
    assert (metrics["steps"], metrics["devices"]) == (60, 2)
    assert (workspace / "models/pretrain/model.safetensors").is_file()


def test_a_failing_process_stops_the_others_and_its_code_is_the_launchers():
    """launch_distributed's wait: the others would wait forever for the failed one in their next
    collective, so they are stopped, and the launcher exits with the failed process's code."""
    from lmline.stage_process import wait_all

    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    failing = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"])
    assert wait_all([waiting, failing]) == 3
    assert waiting.poll() is not None  # stopped, not left running
