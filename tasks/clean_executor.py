"""Where the clean stage's datatrove passes run, and the checks around them: LocalPipelineExecutor
(processes here) or, with `clean.executor: ray`, RayPipelineExecutor on a Ray cluster that
executor_session connects to for the stage's duration. Both run the same pipeline lists with the same
task counts, so they write the same outputs (tests/test_ray.py compares them byte for byte)."""

from __future__ import annotations

import contextlib
import io
import os
import socket

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.utils.logging import setup_default_logger
from loguru import logger

from lmline.clean_config import CleanConfig, RayConfig
from lmline.errors import LmlineError

# fork, not datatrove's default forkserver: a forkserver pool re-imports everything for each of the
# six executor runs (~0.7 s each), and forked workers inherit the quieted logs.
START_METHOD = "fork"


def pipeline_executor(cfg: CleanConfig, steps: list, tasks: int, workers: int, logs: str) -> PipelineExecutor:
    """The one place clean.executor is read: the same pipeline and task count, run by processes here
    or by tasks on the Ray cluster that executor_session connected to."""
    if cfg.executor == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        # workers=-1: as many tasks at once as the cluster has room for (Ray schedules by the reservations)
        return RayPipelineExecutor(
            steps,
            tasks=tasks,
            workers=-1,
            logging_dir=logs,
            cpus_per_task=cfg.ray.cpus_per_task,
            mem_per_cpu_gb=cfg.ray.mem_per_cpu_gb,
            time=cfg.ray.task_timeout_s,
        )
    return LocalPipelineExecutor(steps, tasks=tasks, workers=workers, logging_dir=logs, start_method=START_METHOD)


LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def import_ray(address: str):
    """ray, set up for `address`. Ray replaces a loopback address by the machine's outward IP, which a
    head bound to loopback (the tests', a laptop's) does not answer on; its local-only mode (the one it
    uses on macOS) keeps loopback. Ray reads that switch when it is first imported."""
    loopback = address.rpartition(":")[0] in LOOPBACK
    if loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray._private import ray_constants

    if loopback and getattr(ray_constants, "ENABLE_RAY_CLUSTER", False):
        raise LmlineError(
            f"clean.ray.address {address}: a loopback head needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
            "before Ray is imported (unset it, or give the head's outward address)"
        )
    return ray


def check_reachable(address: str) -> None:
    """Fail at once on a head that does not answer: ray.init retries an address for minutes."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise LmlineError(f"clean.ray.address {address}: no Ray head answers there ({exc.strerror or exc})") from None


@contextlib.contextmanager
def executor_session(cfg: CleanConfig):
    """Be connected to where the passes run for the stage's duration; yield how many tasks fit there at
    once (the task count for clean.workers: 0)."""
    if cfg.executor == "local":
        yield os.cpu_count() or 1
        return
    check_reachable(cfg.ray.address)
    ray = import_ray(cfg.ray.address)
    try:
        # log_to_driver off: task errors come back through check_every_task_completed, not as noise
        ray.init(address=cfg.ray.address, log_to_driver=False, logging_level="WARNING")
    except ConnectionError as exc:
        raise LmlineError(f"clean.ray.address {cfg.ray.address}: cannot connect to a Ray cluster ({exc})") from None
    try:
        check_a_task_fits(ray.nodes(), cfg.ray)
        cpus = ray.cluster_resources().get("CPU", 0)
        yield max(1, int(cpus // cfg.ray.cpus_per_task))
    finally:
        ray.shutdown()


def check_a_task_fits(nodes: list[dict], ray_cfg: RayConfig) -> None:
    """Ray waits forever for a reservation no node can hold: fail instead, naming the keys."""
    memory = ray_cfg.mem_per_cpu_gb * ray_cfg.cpus_per_task * 2**30
    for node in nodes:
        have = node.get("Resources", {})
        if node.get("Alive") and have.get("CPU", 0) >= ray_cfg.cpus_per_task and have.get("memory", 0) >= memory:
            return
    biggest = max((n.get("Resources", {}) for n in nodes if n.get("Alive")), key=lambda r: r.get("CPU", 0), default={})
    raise LmlineError(
        f"clean.ray: no node of the cluster can hold a task of cpus_per_task={ray_cfg.cpus_per_task} and "
        f"{memory / 2**30:g} GB (cpus_per_task x mem_per_cpu_gb); the largest has {biggest.get('CPU', 0):g} CPUs "
        f"and {biggest.get('memory', 0) / 2**30:.1f} GB for tasks"
    )


def check_every_task_completed(executor: PipelineExecutor, what: str) -> None:
    """Fail closed: LocalPipelineExecutor raises when a task fails, RayPipelineExecutor only logs it;
    a missing completion mark means a shard's documents are missing from the outputs."""
    missing = executor.get_incomplete_ranks(range(executor.world_size), skip_completed=True)
    if missing:
        cause = last_error(executor, missing[0])
        raise LmlineError(f"{what}: tasks {missing} of {executor.world_size} did not complete ({cause})")


def last_error(executor: PipelineExecutor, rank: int) -> str:
    """The last line of task `rank`'s log naming an error, for the one-line message."""
    try:
        with executor.logging_dir.open(f"logs/task_{rank:05d}.log", "r") as fh:
            lines = [line.strip() for line in fh if "Error" in line or "Exception" in line]
    except FileNotFoundError:
        return "no task log: killed, timed out or never started"
    return lines[-1][-300:] if lines else "its log names no error"


@contextlib.contextmanager
def quiet_datatrove():
    """datatrove logs every task at INFO and draws progress bars on stderr; the stage's report is its
    metrics. (Its log files would go to work/logs, which is deleted with the temp dir.)"""
    logger.disable("datatrove")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.enable("datatrove")
        setup_default_logger()  # datatrove re-adds its console log on whatever stderr was: the real one
