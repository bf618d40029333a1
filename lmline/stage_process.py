"""What `dvc repro` runs for a stage: dvc.yaml's `cmd`, `lmline stage NAME`, lands in run_dvc_stage.

It calls tasks/<NAME>.py's run() with the stage's paths, with tracking around it: metrics/<NAME>.json,
the stage's MLflow run (nested under $LMLINE_PARENT_RUN_ID when the retrain flow started it) and its
small outputs as artifacts. Every way into a stage (the flow, `dvc repro`, `lmline stage`) comes here.

A stage with `devices > 1` runs as that many copies of its `lmline stage` process (launch_distributed):
the Trainer runs DDP across them, and rank 0 alone writes metrics and talks to MLflow.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmline import config, guard, stage_host
from lmline.io import write_json
from lmline.tracking import runs

log = logging.getLogger(__name__)


def is_rank_zero() -> bool:
    """This process writes outputs, metrics and the MLflow run: the only one, or rank 0 of several."""
    return int(os.environ.get("RANK", "0")) == 0


def call_stage(name: str, params: config.Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    """The stage's own run(), given its own params section (and the seed where it uses one)."""
    module = importlib.import_module(f"tasks.{name}")
    return module.run(**config.stage_args(params, name), inputs=inputs, outputs=outputs)


def process_seconds() -> float:
    """Wall seconds since this `lmline stage` process started (interpreter start-up and imports included).
    Under a warm stage host the stage runs in a fork of the host: its start is the handing process's."""
    started = os.environ.get(stage_host.STARTED_ENV)
    return time.time() - (float(started) if started else stage_host.started_at())


def throughput(metrics: dict) -> dict:
    """The one MB/s every data stage reports (metrics, the run summary): `mb_in` (its input, 10^6 bytes
    of UTF-8 document text, which its run() returns) over `process_seconds`, the whole stage process
    from its start to its metrics written (imports, the MLflow run's start and the work included;
    DVC's own hashing around the process is not). A stage without `mb_in` gets process_seconds only."""
    seconds = process_seconds()
    out = {"process_seconds": round(seconds, 3)}
    if "mb_in" in metrics:
        out["mb_per_s"] = round(metrics["mb_in"] / seconds, 3)
    return out


def run_dvc_stage(name: str, params: config.Params, root: Path | None = None) -> dict:
    """Run one stage's run() with tracking around it; write metrics/<stage>.json; return metrics."""
    inputs, outputs = config.stage_io(params, name)
    if not is_rank_zero():
        # Under launch_distributed every rank runs this; only rank 0 writes metrics and talks to MLflow.
        return call_stage(name, params, inputs, outputs)
    # The stage's module (torch, transformers, ...) is imported before the clock starts: stage_seconds is
    # the stage's own compute, startup_seconds what the process spent before it could start (interpreter,
    # imports, params); the MLflow run's set-up and logging around it are neither.
    importlib.import_module(f"tasks.{name}")
    startup = process_seconds()
    with runs.stage_run(name, params, root) as tracked:
        started = time.perf_counter()
        metrics = call_stage(name, params, inputs, outputs)
        metrics["stage_seconds"] = round(time.perf_counter() - started, 3)
        metrics["startup_seconds"] = round(startup, 3)
        # forked from the run's warm stage host (lmline/stage_host.py), or a process of its own
        metrics["forked_from_stage_host"] = stage_host.STARTED_ENV in os.environ
        # Which MLflow run produced these numbers: a later cached run of the stage links back to it.
        # Asked before the clock is read: waiting for the run (opened beside the work) counts in the stage.
        metrics["mlflow_run_id"] = tracked.run_id
        metrics.update(throughput(metrics))
        write_json(config.metrics_path(params, name), metrics)
        tracked.log_metrics(metrics)
        tracked.log_artifact(config.metrics_path(params, name), "metrics")
        for key, path in outputs.items():
            # small outputs go to MLflow as artifacts; big data and models are DVC's job
            if path.is_file() and path.stat().st_size < 5_000_000:
                tracked.log_artifact(path, key)
        tracked.log_stage_outputs(name, params, inputs, outputs, metrics)
    # Only now, with the outputs written and the run logged, is nothing left to resume: a failure
    # anywhere before this line re-runs from the stage's last checkpoint (tasks/resume.py).
    if "checkpoints" in outputs:
        shutil.rmtree(outputs["checkpoints"], ignore_errors=True)
    return metrics


def launch_distributed(name: str, devices: int, params: Path, overrides: list[str] | None) -> int:
    """Run this same `lmline stage NAME` as `devices` processes on this machine (DDP: the Trainer sees
    WORLD_SIZE and RANK; rank 0 alone writes outputs and the MLflow run, see run_dvc_stage). Returns the
    exit code: 0, or the code of the first process that failed (the others are then stopped).

    The processes are started here, not by torchrun: torchrun's rendezvous TCPStore listens on every
    interface (torch has no bind-address option), and nothing of a run may listen beyond loopback.
    They meet through a file instead (LMLINE_DIST_STORE, a FileStore: tasks/resume.join_processes),
    and gloo's own sockets stay on loopback (GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)."""
    guard.watch_children()  # a kill -9 of this launcher takes its workers with it
    cmd = [sys.executable, "-m", "lmline.cli", "stage", name, "--params", str(params)]
    for item in overrides or []:
        cmd += ["--set", item]
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # else gloo picks the interface the hostname resolves to
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")  # NCCL's bootstrap sockets, on GPUs
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    log.info("%s: %d processes", name, devices)
    with tempfile.TemporaryDirectory(prefix="lmline-dist-") as rendezvous:
        store = os.path.join(rendezvous, "store")  # must not exist yet: the first process creates it
        workers = [
            subprocess.Popen(
                cmd,
                env={
                    **env,
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(devices),
                    "LOCAL_WORLD_SIZE": str(devices),
                    "LMLINE_DIST_STORE": store,
                },
            )
            for rank in range(devices)
        ]
        return wait_all(workers)


def wait_all(workers: list) -> int:
    """Wait for every process; when one fails, stop the others (they would wait for it forever in
    the next collective) and return its exit code."""
    running = list(workers)
    try:
        while running:
            for worker in list(running):
                code = worker.poll()
                if code is None:
                    continue
                running.remove(worker)
                if code != 0:
                    return code if code > 0 else 128 - code  # killed by a signal: the shell's 128+N
            time.sleep(0.2)
        return 0
    finally:
        for worker in running:
            worker.terminate()
        for worker in running:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
