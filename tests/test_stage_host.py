"""The warm stage host (lmline/stage_host.py): a real host process, real `lmline stage` processes
handing themselves over, real signals. The flow's use of it is exercised by every pipeline run in
test_flow.py and the kill -9 tests in test_faults.py."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import BIN, tiny_params, wait_for, write_params, write_tiny_corpus

from lmline import guard, stage_host

REPO = Path(__file__).resolve().parents[1]
# What a stage of a real run sees (flows/stage_task.py:stage_env): our venv first, this checkout's code.
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("LMLINE_", "MLFLOW_TRACKING", "PREFECT_API"))},
    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    "PYTHONPATH": str(REPO),
    "LMLINE_VERBOSITY": "quiet",
}
# A command that blocks until it is killed, started by the host like `lmline stage`: it writes its pid
# and that of a process it started (a datatrove worker, say) so the test can see both end.
BLOCKER = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    def main():
        worker = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
        with open("pids.tmp", "w") as f:
            f.write(f"{os.getpid()} {worker.pid}")
        os.rename("pids.tmp", "pids")
        signal.pause()
    """
)


@pytest.fixture
def host(tmp_path):
    """A host serving `tmp_path` (with the blocker module beside it), stopped after the test."""
    (tmp_path / "blocker.py").write_text(BLOCKER)
    with stage_host.hosting(tmp_path, {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}) as address:
        assert os.path.exists(address), "the host bound its socket before hosting() yielded"
        yield address


def lmline_stage(root: Path, *args: str, address: str | None) -> subprocess.CompletedProcess:
    env = {**ENV, **({stage_host.ADDRESS_ENV: address} if address else {})}
    return subprocess.run(
        [str(BIN / "lmline"), "stage", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


# what differs between two runs of a stage that do the same work: clocks, and which process ran it
NOT_RESULTS = {
    "stage_seconds",
    "startup_seconds",
    "process_seconds",
    "mb_per_s",
    "mlflow_run_id",
    "forked_from_stage_host",
    "tokens_per_second",
    "train_seconds",
    "mfu",
    "tokenizer_train_seconds",
    "encode_seconds",
    "encode_mb_per_s",
}


def results(metrics: dict) -> dict:
    return {k: results(v) if isinstance(v, dict) else v for k, v in metrics.items() if k not in NOT_RESULTS}


def test_stages_handed_to_the_host_write_what_their_own_processes_would(tmp_path, host, mlflow_template):
    """ingest to pretrain, each `lmline stage` in its own process and each forked from the host: the
    same bytes out of the data stages, the same pretraining metrics (torch forked after its import)."""
    import shutil

    runs = {}
    for way, address in (("own process", None), ("host", host)):
        root = tmp_path / way.replace(" ", "-")
        root.mkdir()
        write_tiny_corpus(root)
        write_params(root / "params.yaml", tiny_params())
        shutil.copy(mlflow_template, root / "mlflow.db")
        metrics = {}
        for stage in ("ingest", "clean", "tokenize", "pretrain"):
            out = lmline_stage(root, stage, address=address)
            assert out.returncode == 0, out.stderr
            metrics[stage] = json.loads((root / "metrics" / f"{stage}.json").read_text())
            assert json.loads(out.stdout)[stage] == metrics[stage]  # the child wrote to the handing process's stdout
        runs[way] = (root, metrics)
    (own, own_metrics), (hosted, hosted_metrics) = runs["own process"], runs["host"]
    data = sorted(p.relative_to(own) for p in (own / "data").rglob("*") if p.is_file())
    assert data and data == sorted(p.relative_to(hosted) for p in (hosted / "data").rglob("*") if p.is_file())
    assert all((own / p).read_bytes() == (hosted / p).read_bytes() for p in data)
    assert results(own_metrics) == results(hosted_metrics)
    assert hosted_metrics["pretrain"]["val_bits_per_byte"] == own_metrics["pretrain"]["val_bits_per_byte"]
    for stage, metrics in hosted_metrics.items():
        assert (own_metrics[stage]["forked_from_stage_host"], metrics["forked_from_stage_host"]) == (False, True)
        # Timed from the handing process's start, not the fork's: the whole stage, as in its own process.
        assert metrics["process_seconds"] >= metrics["startup_seconds"] + metrics["stage_seconds"]


def test_a_failing_command_fails_the_same_way_through_the_host(tmp_path, host):
    own, hosted = (lmline_stage(tmp_path, "nosuch", address=a) for a in (None, host))
    assert own.returncode == hosted.returncode == 1
    assert hosted.stderr.strip().splitlines()[-1] == own.stderr.strip().splitlines()[-1]
    assert "error: unknown stage 'nosuch'" in hosted.stderr


def test_without_a_host_to_answer_the_stage_runs_in_its_own_process(tmp_path):
    out = lmline_stage(tmp_path, "nosuch", address=str(tmp_path / "no-such-socket"))
    assert out.returncode == 1 and "error: unknown stage 'nosuch'" in out.stderr


def hand_over_blocker(root: Path, address: str) -> tuple[subprocess.Popen, psutil.Process, psutil.Process]:
    """A handing process running the blocker in a host child; returns it, the child and the child's worker."""
    code = "import sys; from lmline import stage_host; "
    code += f"sys.exit(stage_host.hand_over(['blocker'], {address!r}, 'blocker:main'))"
    client = subprocess.Popen([sys.executable, "-c", code], cwd=root, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (root / "pids").exists(), "the host's child to start", 60, ())
    child, worker = (psutil.Process(int(pid)) for pid in (root / "pids").read_text().split())
    assert child.ppid() != client.pid and child.parent().cmdline()[1:3] == ["-m", "lmline.stage_host"]
    return client, child, worker


def test_kill_9_of_the_handing_process_ends_the_stage_and_what_it_started(tmp_path, host):
    client, child, worker = hand_over_blocker(tmp_path, host)
    client.kill()  # SIGKILL: what `dvc` and its command get when the flow stops their group the hard way
    client.wait()
    gone, alive = psutil.wait_procs([child, worker], timeout=guard.GRACE_S + 5)
    assert not alive, f"still running after the handing process died: {alive}"


def test_a_stopped_host_ends_the_stage_and_the_handing_process_says_so(tmp_path):
    (tmp_path / "blocker.py").write_text(BLOCKER)
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    with stage_host.hosting(tmp_path, env) as address:
        client, child, worker = hand_over_blocker(tmp_path, address)
        host = child.parent()
    # hosting() has SIGTERMed the host on the way out
    assert client.wait(timeout=guard.GRACE_S + 10) == 1
    assert "the stage host ended before the stage did" in client.stderr.read()
    gone, alive = psutil.wait_procs([child, worker, host], timeout=guard.GRACE_S + 5)
    assert not alive, f"still running after the host stopped: {alive}"


def test_the_exit_status_of_a_signal_is_the_shells(tmp_path, host):
    """A stage killed by signal N ends its handing process with 128 + N, as a shell reports it."""
    client, child, worker = hand_over_blocker(tmp_path, host)
    child.send_signal(signal.SIGKILL)
    assert client.wait(timeout=30) == 128 + signal.SIGKILL
    worker.kill()


def test_dvc_yaml_still_runs_lmline_stage():
    """The hand-over sits in the `lmline` script (lmline/entry.py): dvc.yaml's commands stay `lmline stage NAME`."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {s["cmd"] for s in stages.values()} == {f"lmline stage {name}" for name in stages}
    scripts = (REPO / "pyproject.toml").read_text()
    assert 'lmline = "lmline.entry:main"' in scripts


def test_kill_9_of_the_process_that_started_the_host_ends_the_host_and_its_stage(tmp_path):
    """A deployment's flow run has no guard watching it: its host must still not outlive it."""
    (tmp_path / "blocker.py").write_text(BLOCKER)
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    starter_code = (
        "import os, signal, sys; from pathlib import Path; from lmline import stage_host\n"
        f"with stage_host.hosting(Path({str(tmp_path)!r}), os.environ.copy()) as address:\n"
        "    print(address, flush=True); signal.pause()\n"
    )
    starter = subprocess.Popen([sys.executable, "-c", starter_code], env=env, stdout=subprocess.PIPE, text=True)
    address = starter.stdout.readline().strip()
    client, child, worker = hand_over_blocker(tmp_path, address)
    host = child.parent()
    starter.kill()
    starter.wait()
    assert client.wait(timeout=guard.GRACE_S + 10) == 1
    gone, alive = psutil.wait_procs([host, child, worker], timeout=guard.GRACE_S + 5)
    assert not alive, f"still running after the process that started the host died: {alive}"


def test_a_process_start_is_read_to_a_clock_tick():
    """started_at() is when the process began (the stages' startup_seconds and MB/s count from it), not
    up to a second earlier, as psutil's create_time() reads it (whole-second boot time)."""
    code = "import time; now = time.time(); from lmline.stage_host import started_at; print(started_at(), now)"
    before = time.time()
    started, printed_at = map(float, subprocess.check_output([sys.executable, "-c", code], env=ENV, text=True).split())
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert before - tick <= started <= printed_at, (before, started, printed_at)


# A module the host imports as a preload step that lasts until the test says so: `<name>.started`
# appears when the import begins, and it ends when the test creates `<name>.go`.
GATE = textwrap.dedent(
    """
    import pathlib, time
    pathlib.Path(__name__ + ".started").touch()
    while not pathlib.Path(__name__ + ".go").exists():
        time.sleep(0.01)
    """
)


def start_host(tmp_path: Path, preload: tuple, training_preload: tuple) -> tuple[subprocess.Popen, str, dict]:
    """A host on tmp_path/socket whose preload steps are the test's own modules (in tmp_path):
    (its process, its address, the environment its requests carry)."""
    address = str(tmp_path / "socket")
    code = f"import sys; from lmline import stage_host as h; h.PRELOAD = {preload!r}; "
    code += f"h.TRAINING_PRELOAD = {training_preload!r}; h.main(sys.argv[1:])"
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    host = subprocess.Popen([sys.executable, "-c", code, address, str(os.getpid())], cwd=tmp_path, env=env)
    return host, address, env


def test_a_stage_is_answered_while_the_host_is_busy_importing(tmp_path):
    """The child answers its handing process itself: a host in the middle of importing torch (seconds)
    must not hold a finished stage's `dvc repro`, nor the flow behind it, until the import ends."""
    for name in ("gate_a", "gate_b"):
        (tmp_path / f"{name}.py").write_text(GATE)
    # the stage ends while the host is busy with gate_b
    (tmp_path / "quick.py").write_text(GATE.replace('__name__ + ".go"', '"gate_b.started"') + "main = lambda: 7\n")
    host, address, env = start_host(tmp_path, ("gate_a", "gate_b"), ())
    try:
        wait_for(lambda: (tmp_path / "gate_a.started").exists(), "the host's first import", 60, ())
        # A request while the host imports gate_a: taken when that import ends, before gate_b's begins.
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(address)
        body = json.dumps({"argv": ["quick"], "entry": "quick:main", "cwd": str(tmp_path), "env": env}).encode()
        with open(os.devnull, "rb") as null_in, open(os.devnull, "wb") as null_out:
            socket.send_fds(
                conn,
                [stage_host.HEADER.pack(len(body)) + body],
                [null_in.fileno(), null_out.fileno(), null_out.fileno()],
            )
        (tmp_path / "gate_a.go").touch()
        conn.settimeout(60)
        answer = stage_host.receive(conn, stage_host.STATUS.size)
        assert answer is not None and stage_host.STATUS.unpack(answer)[0] == 7
        conn.close()
    finally:
        (tmp_path / "gate_a.go").touch()
        (tmp_path / "gate_b.go").touch()
        host.terminate()
        host.wait(timeout=30)


# A command that says which process forked it, and whether the training host's module was imported and
# its function step (remember) called there.
PROBE = textwrap.dedent(
    """
    import json, os, sys
    REMEMBERED = False
    def remember():
        global REMEMBERED
        REMEMBERED = True
    def main():
        with open(sys.argv[1], "w") as f:
            json.dump({"parent": os.getppid(), "preloaded": "gate_t" in sys.modules, "called": REMEMBERED}, f)
    """
)


def hand_probe(tmp_path: Path, address: str, env: dict, out: str, needs: str | None) -> dict:
    """Hand `probe` (writing to `out`) to the host as `lmline stage` hands itself over; what it wrote."""
    hand = f"import sys; from lmline import stage_host as h; sys.exit(h.hand_over(['probe', {out!r}], "
    hand += f"{address!r}, 'probe:main', {needs!r}))"
    assert subprocess.run([sys.executable, "-c", hand], cwd=tmp_path, env=env, timeout=60).returncode == 0
    return json.loads((tmp_path / out).read_text())


def test_a_data_stage_is_not_held_by_the_training_hosts_imports(tmp_path):
    """The training stages' modules (torch: seconds, one import step) are the training host's to import:
    a data stage asking meanwhile is forked at once by the first host; a stage that needs them waits for
    the training host, which was forked from the first host and forks it with them imported."""
    (tmp_path / "gate_t.py").write_text(GATE)
    (tmp_path / "probe.py").write_text(PROBE)
    host, address, env = start_host(tmp_path, (), ("gate_t", "probe:remember"))
    probe = functools.partial(hand_probe, tmp_path, address, env)
    try:
        wait_for(lambda: (tmp_path / "gate_t.started").exists(), "the training host's import", 60, ())
        [training_host] = psutil.Process(host.pid).children()
        data = probe("data.json", None)  # while gate_t is imported
        assert data == {"parent": host.pid, "preloaded": False, "called": False}
        (tmp_path / "gate_t.go").touch()
        training = probe("training.json", "gate_t")
        assert training == {"parent": training_host.pid, "preloaded": True, "called": True}
    finally:
        (tmp_path / "gate_t.go").touch()
        host.terminate()
        host.wait(timeout=30)
    gone, alive = psutil.wait_procs([training_host], timeout=10)
    assert not alive, "the training host outlived the first host"
    assert not os.path.exists(address), "the first host removes its socket as it ends"


def test_a_training_host_that_dies_is_reaped_and_its_stages_run_in_the_first_host(tmp_path):
    """Killed (or crashed while importing), the training host is reaped by the first host at once, not
    left a zombie until the run ends, and the stages it would have served are forked by the first host."""
    (tmp_path / "probe.py").write_text(PROBE)
    host, address, env = start_host(tmp_path, (), ("probe",))
    try:
        wait_for(lambda: psutil.Process(host.pid).children(), "the training host", 60, [host])
        [training_host] = psutil.Process(host.pid).children()
        training_host.kill()

        def reaped() -> bool:  # a killed child stays in the process table, a zombie, until it is reaped
            try:
                training_host.status()
            except psutil.NoSuchProcess:
                return True
            return False

        wait_for(reaped, "the first host to reap its training host", 30, [host])
        assert hand_probe(tmp_path, address, env, "out.json", "probe")["parent"] == host.pid
    finally:
        host.terminate()
        host.wait(timeout=30)


def test_every_preload_step_names_what_there_is():
    """A step that names nothing would fail quietly (the stage imports or builds it itself, slower): the
    function steps name private MLflow functions, which an upgrade may rename."""
    for step in (*stage_host.PRELOAD, *stage_host.TRAINING_PRELOAD):
        module, _, function = step.partition(":")
        if function:
            assert callable(getattr(importlib.import_module(module), function)), step
        else:
            assert importlib.util.find_spec(module) is not None, step
