"""Faults leave nothing half done: real kill -9s of real stage and pipeline processes, a real tracking
store that fails, closed loopback ports standing in for servers that are down, real concurrent writers.

The fault suite kills `lmline stage pretrain|finetune` at random points and checks that the re-run
resumes from the last complete checkpoint and ends at exactly the metrics of an uninterrupted run:
LMLINE_FAULT_RUNS=10 runs 10 kills per stage (1 by default, plus one finetune kill aimed at early
stopping's state), LMLINE_FAULT_SEED picks other points.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import BIN, free_port, make_dvc_repo, tiny_params, wait_for, write_params, write_tiny_corpus

from lmline import config
from tasks import resume

FAULT_RUNS = int(os.environ.get("LMLINE_FAULT_RUNS", "1"))  # per stage
FAULT_SEED = int(os.environ.get("LMLINE_FAULT_SEED", "0"))
# A step budget (max_minutes far away) so the result does not depend on timing; checkpoints every
# few steps so a random kill lands before, between, inside and after them. Logging every
# checkpoint_every steps keeps the logged train loss of a resumed run on the same step windows.
FAULT_PARAMS = tiny_params(
    pretrain={
        "n_layer": 1,
        "n_head": 2,
        "d_model": 32,
        "context": 32,
        "batch_size": 8,
        "max_steps": 24,
        "eval_every": 8,
        "eval_batches": 2,
        "checkpoint_every": 4,
        "warmup_steps": 2,
        "log_every": 4,
        "max_minutes": 60,
    },
    finetune={
        "max_steps": 40,
        "eval_every": 4,
        "batch_size": 16,
        "max_length": 32,
        "warmup_steps": 2,
        "lr": 3e-3,
        "early_stopping_patience": 2,
        "max_minutes": 60,
    },
)
# Not a result of training: timing, and which attempt or MLflow run produced the numbers.
NOT_RESULTS = {
    "tokens_per_second",
    "train_seconds",
    "mfu",
    "stage_seconds",
    "process_seconds",
    "mb_per_s",
    "startup_seconds",
    "forked_from_stage_host",
    "mlflow_run_id",
    "resumed_from_step",
}


def stage_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMLINE_", "MLFLOW_TRACKING", "PREFECT_API"))}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "LMLINE_VERBOSITY": "quiet",
            "PREFECT_HOME": str(root / "prefect-home"),
        }
    )
    return env


def results(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in NOT_RESULTS}


def complete_steps(ckpt_dir: Path) -> list[int]:
    return sorted(resume.checkpoint_step(p.parent) for p in ckpt_dir.glob(f"checkpoint-*/{resume.CLOCK_FILE}"))


def mlflow_runs(root: Path) -> list:
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mlflow_template) -> dict:
    """A workspace with the tiny corpus ingested, cleaned and tokenized, and the uninterrupted runs'
    metrics of pretrain and finetune (run in this process; their models are the next stage's input)."""
    from tasks import clean, finetune, ingest, pretrain, tokenize

    root = tmp_path_factory.mktemp("faults")
    write_tiny_corpus(root)
    write_params(root / "params.yaml", FAULT_PARAMS)
    shutil.copy(mlflow_template, root / "mlflow.db")
    here = Path.cwd()
    os.chdir(root)  # params.paths are relative to the workspace
    try:
        params = config.load("params.yaml")
        reference = {}
        for name, module in (
            ("ingest", ingest),
            ("clean", clean),
            ("tokenize", tokenize),
            ("pretrain", pretrain),
            ("finetune", finetune),
        ):
            inputs, outputs = config.stage_io(params, name)
            reference[name] = module.run(**config.stage_args(params, name), inputs=inputs, outputs=outputs)
        shutil.rmtree(root / "checkpoints")
        shutil.rmtree(root / params.paths.finetune_model)
    finally:
        os.chdir(here)
    assert reference["finetune"]["stopped_by"] == "early_stopping", "the finetune fault runs must stop early"
    return {"root": root, "reference": reference}


def kill_and_resume(prepared: dict, workspace: Path, stage: str, wait_for_checkpoint, monkeypatch) -> tuple[int, dict]:
    """Start `lmline stage STAGE`, SIGKILL it once `wait_for_checkpoint(ckpt_dir)` is true (checked
    every 10 ms), re-run the stage to completion as `lmline stage` does (in this process: the imports
    are paid already). Returns (the last complete checkpoint at the kill, the re-run's metrics)."""
    from lmline import stage_process

    shutil.copytree(prepared["root"], workspace, ignore=shutil.ignore_patterns("prefect-home"))
    env, ckpt_dir = stage_env(workspace), workspace / "checkpoints" / stage
    log = workspace / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [str(BIN / "lmline"), "stage", stage], cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            while proc.poll() is None and not wait_for_checkpoint(ckpt_dir):
                time.sleep(0.01)  # polling interval
            proc.kill()  # SIGKILL: no clean-up of any kind runs
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{stage} ended before the kill:\n{log.read_text()[-3000:]}"
    last = max(complete_steps(ckpt_dir), default=0)
    spent = resume.read_clock(ckpt_dir / f"checkpoint-{last}")["train_seconds"] if last else 0.0

    monkeypatch.chdir(workspace)
    for variable in ("MLFLOW_TRACKING_URI", "LMLINE_PARENT_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    metrics = stage_process.run_dvc_stage(stage, config.load("params.yaml"))
    assert not ckpt_dir.exists(), "the shell deletes the checkpoints once the run is logged"
    assert metrics["train_seconds"] >= round(spent, 3), "the time budget counts the killed attempt's training"
    runs = mlflow_runs(workspace)
    assert [r.info.status for r in runs if r.info.run_id == metrics["mlflow_run_id"]] == ["FINISHED"]
    # the killed attempt's run, if it got as far as opening one, was closed by the re-run
    assert {r.info.status for r in runs if r.info.run_id != metrics["mlflow_run_id"]} <= {"KILLED"}
    return last, metrics


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("run", range(FAULT_RUNS))
def test_kill_9_at_a_random_point_resumes_and_matches_the_uninterrupted_run(
    prepared, tmp_path, monkeypatch, stage, run
):
    rng = random.Random(f"{FAULT_SEED}-{stage}-{run}")
    every = FAULT_PARAMS[stage]["checkpoint_every" if stage == "pretrain" else "eval_every"]
    # a checkpoint to wait for (0: none, the kill may even land before training starts), any but the last
    wanted = rng.randrange(0, prepared["reference"][stage]["steps"], every)
    delay = rng.uniform(0, 0.4)  # then a little more: into the next steps, an evaluation or a save
    reached: list[float] = []

    def kill_point(ckpt_dir: Path) -> bool:
        if max(complete_steps(ckpt_dir), default=0) < wanted:
            return False
        reached.append(reached[0] if reached else time.monotonic())
        return time.monotonic() - reached[0] >= delay

    last, metrics = kill_and_resume(prepared, tmp_path / "ws", stage, kill_point, monkeypatch)
    assert metrics["resumed_from_step"] == last
    # exactly equal, not approximately: same weights, optimizer and RNG states, data order and
    # schedule from the checkpoint on, and the same CPU kernels in the same order
    assert results(metrics) == results(prepared["reference"][stage])


def test_finetune_resumes_early_stopping_where_it_was(prepared, tmp_path, monkeypatch):
    """Killed after a checkpoint where an evaluation had not improved: the resumed run still stops
    after `early_stopping_patience` such evaluations in all, not that many more."""

    def after_a_stale_eval(ckpt_dir: Path) -> bool:
        for step in complete_steps(ckpt_dir):
            state = json.loads((ckpt_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
            if state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]:
                return True
        return False

    last, metrics = kill_and_resume(prepared, tmp_path / "ws", "finetune", after_a_stale_eval, monkeypatch)
    assert 0 < metrics["resumed_from_step"] == last
    assert metrics["stopped_by"] == "early_stopping"
    assert results(metrics) == results(prepared["reference"]["finetune"])


def test_checkpoints_survive_a_failure_to_log_the_run(prepared, tmp_path, monkeypatch):
    """The stage wrote its outputs, then logging them failed: the checkpoints stay, and the re-run has
    nothing left to train."""
    from lmline import stage_process

    workspace = tmp_path / "ws"
    shutil.copytree(prepared["root"], workspace)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LMLINE_PARENT_RUN_ID", raising=False)
    params = config.load("params.yaml")
    # The experiment keeps its artifacts under a path that is a file: every artifact upload fails.
    import mlflow

    blocked = workspace / "blocked"
    blocked.write_text("a file where a folder should be")
    mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}").create_experiment(
        params.project.experiment, artifact_location=(blocked / "artifacts").as_uri()
    )
    with pytest.raises(OSError):
        stage_process.run_dvc_stage("pretrain", params)
    assert complete_steps(workspace / "checkpoints/pretrain")[-1] == params.pretrain.max_steps

    blocked.unlink()
    metrics = stage_process.run_dvc_stage("pretrain", params)
    assert metrics["resumed_from_step"] == params.pretrain.max_steps
    assert results(metrics) == results(prepared["reference"]["pretrain"])
    assert not (workspace / "checkpoints/pretrain").exists()


# ---------------------------------------------------------------- the pipeline process
def test_kill_9_of_lmline_run_ends_its_children_and_frees_the_workspace(prepared, tmp_path, mlflow_template):
    slow = {**FAULT_PARAMS["pretrain"], "max_steps": 1_000_000, "max_minutes": 60, "checkpoint_every": 1000}
    workspace = make_dvc_repo(tmp_path / "ws", tiny_params(pretrain=slow))
    shutil.copy(mlflow_template, workspace / "mlflow.db")
    # pretrain's inputs as the tokenize stage makes them (same params), so the run gets there sooner
    shutil.copytree(prepared["root"] / "data", workspace / "data")
    env = {**stage_env(tmp_path), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        [str(BIN / "lmline"), "run", "--stage", "pretrain", "--no-promote"],
        cwd=workspace,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.log_path = log
    tree: list[psutil.Process] = []
    try:
        # pretrain has started once it wrote its fingerprint, and runs (for hours) from then on; its
        # MLflow run opens on a thread beside the training (lmline.tracking.runs.stage_run): wait for it
        wait_for(
            lambda: (
                (workspace / "checkpoints/pretrain" / resume.FINGERPRINT_FILE).exists()
                and "pretrain" in {r.data.tags.get("mlflow.runName") for r in mlflow_runs(workspace)}
            ),
            "the pretrain stage to start",
            600,
            [proc],
        )
        tree = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in tree]
        assert any("dvc repro --single-item pretrain" in c for c in commands), commands
        assert any("lmline stage pretrain" in c for c in commands), commands
        proc.kill()
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(tree, timeout=60)  # the watcher itself ends too once it is done
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left running after kill -9 of lmline run: {[p.cmdline() for p in alive]}"
        assert not list((tmp_path / "tmp").glob("lmline-host-*")), "the stage host's socket folder was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tree:  # whatever a failed assertion above left behind
            try:
                p.kill()
            except psutil.Error:
                pass

    runs = {r.data.tags.get("mlflow.runName"): r for r in mlflow_runs(workspace)}
    assert runs["retrain"].info.status == runs["pretrain"].info.status == "RUNNING"  # left by the dead processes

    # The next run takes DVC's lock and the workspace lock without any clean-up, and closes the dead runs.
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "pretrain"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    again = subprocess.run(
        [str(BIN / "lmline"), "run", "--stage", "ingest", "--no-promote"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    closed = {r.info.run_id: r for r in mlflow_runs(workspace)}
    assert closed[runs["retrain"].info.run_id].info.status == "KILLED"
    assert closed[runs["pretrain"].info.run_id].info.status == "KILLED"


# ---------------------------------------------------------------- servers that are down
PROBE_BOUND_S = 2 * 5.0  # lmline.tracking.store.PROBE_TIMEOUT_S per server, both probed


@pytest.mark.parametrize(
    "variable, value",
    [
        ("MLFLOW_TRACKING_URI", "http://127.0.0.1:{port}"),
        ("PREFECT_API_URL", "http://127.0.0.1:{port}/api"),
    ],
)
def test_an_unreachable_server_is_one_error_line_naming_it(workspace, variable, value):
    write_params(workspace / "params.yaml", tiny_params())
    uri = value.format(port=free_port())  # nothing listens there
    env = {**stage_env(workspace), variable: uri}
    # the process start-up (imports) plus the bound, with room for a loaded machine: a hang would be minutes
    result = subprocess.run(
        [str(BIN / "lmline"), "run"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=120 + PROBE_BOUND_S,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and uri in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# ---------------------------------------------------------------- concurrent --set
def test_concurrent_overrides_never_leave_params_yaml_invalid(workspace):
    from flows.retrain import workspace_lock, write_overrides

    params_path = write_params(workspace / "params.yaml", tiny_params())
    (workspace / ".dvc" / "tmp").mkdir(parents=True)
    stop, problems, written = threading.Event(), [], {"a": 0, "b": 0}

    def writer(name: str, overrides: list[dict]) -> None:
        i = 0
        while not stop.is_set():
            with workspace_lock(workspace):
                try:
                    write_overrides(params_path, overrides[i % len(overrides)])
                    written[name] += 1
                except config.ConfigError:
                    pass  # this writer's overrides do not fit what the other one wrote: nothing written
            i += 1

    def reader() -> None:
        while not stop.is_set():
            try:
                config.load(params_path)
            except config.ConfigError as exc:
                problems.append(str(exc))

    # Valid alone, invalid together: eval_every must stay <= max_steps.
    threads = [
        threading.Thread(target=writer, args=("a", [{"finetune.max_steps": 5}, {"finetune.max_steps": 40}])),
        threading.Thread(target=writer, args=("b", [{"finetune.eval_every": 20}, {"finetune.eval_every": 2}])),
        threading.Thread(target=reader),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(written.values()) < 20 and not problems and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval
    stop.set()
    for t in threads:
        t.join()
    assert not problems, problems[:3]
    assert min(written.values()) >= 20, written  # both wrote, many times, interleaved
    config.load(params_path)


def test_overrides_that_clash_with_the_file_are_refused_and_nothing_is_written(workspace):
    from flows.retrain import write_overrides

    params_path = workspace / "params.yaml"
    params_path.write_text("# the knobs\n" + yaml.safe_dump(tiny_params(), sort_keys=False))
    # Each was validated against the file as it was when its run started; another run wrote first.
    write_overrides(params_path, {"finetune.max_steps": 8})  # valid with eval_every 6
    before = params_path.read_text()
    with pytest.raises(
        config.ConfigError, match=r"^params.yaml: finetune: eval_every \(10\) must be <= max_steps \(8\)"
    ):
        write_overrides(params_path, {"finetune.eval_every": 10})  # valid with the max_steps 12 it saw
    assert params_path.read_text() == before
    assert before.startswith("# the knobs\n")  # comments are kept
