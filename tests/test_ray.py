"""clean on a real Ray cluster: a local head (2 CPUs, loopback only) started with `ray start`, the same
stage run with clean.executor local and ray, and the outputs compared byte for byte."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, REPO, free_port, tiny_params, write_params, write_tiny_corpus

from lmline import config
from lmline.config import ConfigError
from lmline.errors import LmlineError
from tasks import clean, clean_executor, ingest

# Ray's local-only mode: without it Ray swaps 127.0.0.1 for the machine's outward IP and its servers
# listen on every interface. (tasks/clean_executor.py sets the same for a loopback clean.ray.address.)
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def start_ray_head(temp_dir: Path, port: int) -> int:
    """`ray start --head` on 127.0.0.1 with 2 CPUs; returns the process group its daemons run in."""
    env = {
        **os.environ,
        **LOOPBACK_ONLY,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        # the workers import tasks.clean to run the pipelines: this checkout, as in the driver
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(temp_dir),
    }  # datatrove's Ray tasks write their logs under $TMPDIR/ray_logs
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
        "--object-store-memory",
        str(80 * 1024 * 1024),  # Ray's minimum is 75 MiB; the tasks pass no data
        "--temp-dir",
        str(temp_dir),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # the daemons stay in this session's process group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"ray start failed:\n{out[-3000:]}"
    return proc.pid


def stop_process_group(pgid: int) -> None:
    """SIGKILL the head's daemons and workers: a throwaway head gains nothing from Ray's graceful
    shutdown (10 s and more here). Never `ray stop`: it stops every Ray on the machine."""
    deadline = time.monotonic() + 20
    while group_members(pgid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.2)  # polling interval
    assert not group_members(pgid), f"Ray head processes {group_members(pgid)} outlived SIGKILL"


def group_members(pgid: int) -> list[int]:
    """Live processes of the group; zombies left for init to reap do not count."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
    return members


def listening_outside_loopback(pgid: int) -> list[str]:
    """TCP listeners of the head's processes on any address other than loopback."""
    pids = set(group_members(pgid))
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "the head's servers listen somewhere"  # else this check would prove nothing
    return [
        f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})"
        for c in listening
        if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")
    ]


def write_corpus_with_drops(root: Path) -> None:
    """The tiny corpus plus a document each rule drops: an exact copy, a near copy, a too-short one,
    and an e-mail address to scrub."""
    write_tiny_corpus(root)
    docs = root / "corpus" / "docs"
    original = (docs / "doc000.txt").read_text(encoding="utf-8")
    (docs / "doc900.txt").write_text(original, encoding="utf-8")
    first = original.split()[3]
    (docs / "doc901.txt").write_text(original.replace(first, "harbourmaster", 1), encoding="utf-8")
    (docs / "doc902.txt").write_text("Hi.\n", encoding="utf-8")
    (docs / "doc903.txt").write_text(
        "Letters for the harbour market go to clerk@harbour.example today.\n", encoding="utf-8"
    )


def run_clean(sections: dict, out: Path) -> tuple[dict, float]:
    params = config.load(write_params(Path("params.yaml"), sections))
    inputs, outputs = config.stage_io(params, "clean")
    started = time.perf_counter()
    metrics = clean.run(**config.stage_args(params, "clean"), inputs=inputs, outputs=outputs)
    seconds = time.perf_counter() - started
    shutil.copytree(outputs["clean"], out / "clean")
    shutil.copy(outputs["drops"], out / "clean_drops.csv")
    return metrics, seconds


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
# a Ray head plus ~15 s of tasks on 2 cores: `make test-integration`, run by .ci/run after `make test`
@pytest.mark.integration
def test_clean_on_a_ray_cluster_writes_what_it_writes_locally(workspace, monkeypatch):
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # restored after the test
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    write_corpus_with_drops(workspace)
    # 2 tasks per pass, as many as the head has CPUs; 2 LSH bands instead of 14: a Ray task costs ~1 s
    # to start (a fresh actor process), and the bucket pass runs one task per band.
    clean_params = {
        "min_chars": 10,
        "workers": 2,
        "split": {"val": 0.15, "test": 0.15},
        "minhash": {"num_buckets": 2, "hashes_per_bucket": 8},
    }
    sections = tiny_params(clean=clean_params)
    params = config.load(write_params(workspace / "params.yaml", sections))
    ingest.run(params.ingest, *config.stage_io(params, "ingest"))

    local, local_s = run_clean(sections, workspace / "local")

    # Unix socket paths under Ray's temp dir must stay short (108 bytes): not under pytest's tmp_path.
    ray_tmp = Path(tempfile.mkdtemp(prefix="lmray", dir="/tmp"))
    port = free_port()
    started = time.perf_counter()
    pgid = start_ray_head(ray_tmp, port)
    try:
        head_s = time.perf_counter() - started
        assert listening_outside_loopback(pgid) == []
        ray_sections = tiny_params(
            clean={**clean_params, "executor": "ray", "ray": {"address": f"127.0.0.1:{port}", "mem_per_cpu_gb": 0.25}}
        )
        on_ray, ray_s = run_clean(ray_sections, workspace / "ray")
        # every task of every pass ran in one of Ray's RankWorker actors on this head
        actor_logs = [
            p
            for p in (ray_tmp / "session_latest" / "logs").glob("worker-*.out")
            if ":actor_name:RankWorker" in p.read_text(errors="replace")
        ]
        passes_tasks = 2 + 1 + 2 + 2 + 1 + 2  # filter, find exact dups, exact filter, 2 bands, cluster, near filter
        assert len(actor_logs) >= passes_tasks

        # a reservation no node can hold fails at once (Ray itself would wait for ever)
        too_big = tiny_params(
            clean={**clean_params, "executor": "ray", "ray": {"address": f"127.0.0.1:{port}", "mem_per_cpu_gb": 4096}}
        )
        with pytest.raises(LmlineError, match=r"clean\.ray: no node of the cluster can hold a task"):
            run_clean(too_big, workspace / "too-big")
    finally:
        stop_process_group(pgid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"\nray head start {head_s:.1f}s, clean local {local_s:.1f}s, clean on ray {ray_s:.1f}s")

    assert file_bytes(workspace / "ray") == file_bytes(workspace / "local")  # parquet splits and drops CSV
    same = ("sources", "docs_in", "docs_out", "duplicates_removed", "pii_replaced", "splits", "workers", "mb_in")
    assert {k: on_ray[k] for k in same} == {k: local[k] for k in same}
    drops = local["sources"]["docs"]["drops"]
    assert drops["exact_dup"] == 1 and drops["near_dup"] == 1 and drops["min_chars"] == 1  # the rules really ran
    assert local["pii_replaced"]["email"] == 1


def test_ray_settings_are_validated(make_params):
    base = tiny_params()
    for ray, message in (
        ({"address": "ray://head:10001"}, "clean.ray: address must be host:port"),
        ({"address": "head:99999"}, "clean.ray: address must be host:port"),
        ({"cpus_per_task": 0}, "clean.ray.cpus_per_task must be >= 1"),
        ({"mem_per_cpu_gb": 0}, "clean.ray.mem_per_cpu_gb must be > 0"),
        ({"head": "x:1"}, "clean.ray.head is not a known key"),
    ):
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            make_params({**base, "clean": {"executor": "ray", "ray": ray}})
    with pytest.raises(ConfigError, match=r"clean\.executor must be one of"):
        make_params({**base, "clean": {"executor": "slurm"}})
    params, _ = make_params({**base, "clean": {"executor": "ray", "ray": {"address": "10.0.0.5:6379"}}})
    assert params.clean.ray.address == "10.0.0.5:6379" and params.clean.ray.cpus_per_task == 1


def test_clean_stage_imports_ray_only_for_the_ray_executor():
    """Stages stay light: `executor: local` (the default) never imports Ray."""
    code = (
        "import sys; import tasks.clean; from lmline.clean_config import CleanConfig; "
        "print('ray' in sys.modules, CleanConfig().executor)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout.split()
    assert out == ["False", "local"]


def test_an_unreachable_head_fails_at_once_naming_the_key(workspace):
    """ray.init would retry an address for minutes; clean says which key is wrong before connecting."""
    write_tiny_corpus(workspace)
    port = free_port()  # free: nothing listens there
    sections = tiny_params(clean={"executor": "ray", "ray": {"address": f"127.0.0.1:{port}"}})
    params = config.load(write_params(workspace / "params.yaml", sections))
    ingest.run(params.ingest, *config.stage_io(params, "ingest"))
    inputs, outputs = config.stage_io(params, "clean")
    with pytest.raises(LmlineError, match=rf"clean\.ray\.address 127\.0\.0\.1:{port}: no Ray head answers there"):
        clean.run(**config.stage_args(params, "clean"), inputs=inputs, outputs=outputs)
    assert not outputs["clean"].exists() and not outputs["drops"].exists()


def test_a_pass_with_a_task_that_did_not_complete_fails_naming_it(tmp_path):
    """RayPipelineExecutor only logs a failed task: the stage checks every rank's completion mark."""
    from datatrove.executor import LocalPipelineExecutor

    executor = LocalPipelineExecutor([], tasks=3, logging_dir=str(tmp_path))
    executor.mark_rank_as_completed(1)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "task_00000.log").write_text(
        "2026-12-02 INFO reading shard\n2026-12-02 ERROR RuntimeError: No files found on /data/shards!\n"
    )
    with pytest.raises(LmlineError) as caught:
        clean_executor.check_every_task_completed(executor, "clean pass 1 of 6")
    assert str(caught.value) == (
        "clean pass 1 of 6: tasks [0, 2] of 3 did not complete "
        "(2026-12-02 ERROR RuntimeError: No files found on /data/shards!)"
    )
    for rank in (0, 2):
        executor.mark_rank_as_completed(rank)
    clean_executor.check_every_task_completed(executor, "clean pass 1 of 6")  # all done: no error
