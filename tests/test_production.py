"""Production on one machine: the production stack, real, on loopback ports. A throwaway PostgreSQL
cluster holds the Prefect server's database and the MLflow server's backend store; moto's standalone
server (`moto_server`) is the S3-compatible object store, standing in for AWS S3 (or MinIO): it holds
MLflow's artifacts and the DVC remote. cpu and gpu process pools have one worker each in its own clone of
a temp git repo; the deployments come from prefect.yaml (`lmline deploy`); then a distributed retrain and
the data trigger.

The server tests are marked `integration` (`make test-integration`, run by .ci/run after `make test`):
they need Debian's `postgresql` installed (initdb/postgres; as root they run as its `postgres` user).
Every process started here is stopped by process group (and any descendant that left the group, by
PID) when the module ends, failed or not. Waits poll with deadlines; nothing sleeps a fixed time.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_dvc_repo, mlflow_server, tiny_params

from lmline import OFFLINE_ENV, config
from lmline.config import ConfigError
from lmline.errors import LmlineError

BIN = Path(sys.executable).parent
GPU_STAGES = {"pretrain", "finetune", "evaluate"}
BUCKET = "lmline"
# dummy credentials for moto: it accepts any, and no real AWS account is ever reached (endpoints are loopback)
S3_ENV = {"AWS_ACCESS_KEY_ID": "lmline-test", "AWS_SECRET_ACCESS_KEY": "lmline-test", "AWS_DEFAULT_REGION": "us-east-1"}


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Child processes, transitively (flow-run processes start their own sessions, so a group kill misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(proc: subprocess.Popen) -> None:
    """SIGINT the group (twice: a process worker needs a second one), then SIGKILL whatever is left."""
    tree = descendants(proc.pid)
    for _ in range(2):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def listening_addresses(procs: list[subprocess.Popen]) -> set[tuple[str, int]]:
    """Local (address, port) pairs our processes (and their children) listen on."""
    import psutil

    addresses = set()
    for pid in [p.pid for p in procs] + [d for p in procs for d in descendants(p.pid)]:
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        addresses |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
    return addresses


def wait_until(check, what: str, timeout: float, procs: list[subprocess.Popen] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                log = p.log_path.read_text()[-3000:]
                raise AssertionError(f"{what}: {p.args[:3]} exited with {p.returncode}\n{log}")
        result = check()
        if result:
            return result
        time.sleep(0.25)  # polling interval, not a wait for something to happen
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def healthy(url: str):
    def check():
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    return check


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


# ---------------------------------------------------------------- the installation
def postgres_bin() -> Path:
    """Debian's PostgreSQL server binaries (package `postgresql`; .ci/run installs it where it is missing)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (the production tests start a cluster)")
    return Path(found[-1]).parent


def as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its binaries as Debian's `postgres` system user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def sql(url: str, query: str):
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchone()[0]


@pytest.fixture(scope="module")
def prod(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("prod")
    pg_port, s3_port, prefect_port, mlflow_port = free_port(), free_port(), free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    s3_url = f"http://127.0.0.1:{s3_port}"
    pg_password = "lmline-test"
    pg = {db: f"postgresql://lmline:{pg_password}@127.0.0.1:{pg_port}/{db}" for db in ("prefect", "mlflow")}
    env = {
        **os.environ,
        **S3_ENV,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_UI_API_URL": api,
        **OFFLINE_ENV,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",  # the trigger's quiet window is checked every second
        # no ~/.aws file may add a profile or endpoint: the S3 endpoints are the loopback ones set here
        "AWS_CONFIG_FILE": str(root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t.invalid",
    }
    env.pop("LMLINE_PARENT_RUN_ID", None)

    logs, procs = root / "logs", []
    logs.mkdir()
    # the cluster's directory is outside pytest's temp dir: that one is private to root, and postgres runs
    # as the postgres user when we are root
    pg_dir = Path(tempfile.mkdtemp(prefix="lmline-pg-"))

    def start(name: str, cmd: list[str], cwd: Path, extra: dict | None = None) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")
        proc = subprocess.Popen(
            cmd, cwd=cwd, env={**env, **(extra or {})}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        proc.log_path = logs / f"{name}.log"
        procs.append(proc)
        return proc

    try:
        # PostgreSQL: a throwaway cluster, password auth, listening on 127.0.0.1 only (-k: its Unix socket
        # in the cluster's directory, not /var/run/postgresql). fsync off: the data dies with the test.
        pg_bin = postgres_bin()
        (pg_dir / "pwfile").write_text(pg_password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pg_dir, "postgres")
            shutil.chown(pg_dir / "pwfile", "postgres")
        started = time.perf_counter()
        sh(
            [
                *as_postgres_user(),
                str(pg_bin / "initdb"),
                "-D",
                str(pg_dir / "data"),
                "-U",
                "lmline",
                "--pwfile",
                str(pg_dir / "pwfile"),
                "--auth",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            pg_dir,
            env,
        )
        postgres = start(
            "postgres",
            [
                *as_postgres_user(),
                str(pg_bin / "postgres"),
                "-D",
                str(pg_dir / "data"),
                "-h",
                "127.0.0.1",
                "-p",
                str(pg_port),
                "-k",
                str(pg_dir),
                "-c",
                "fsync=off",
            ],
            pg_dir,
        )
        wait_until(
            lambda: (
                subprocess.run([str(pg_bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(pg_port)]).returncode
                == 0
            ),
            "PostgreSQL",
            60,
            [postgres],
        )
        for db in pg:
            sh(
                [str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "lmline", db],
                root,
                {**env, "PGPASSWORD": pg_password},
            )
        print(f"\nPostgreSQL: initdb, start and two databases in {time.perf_counter() - started:.1f}s")

        # the object store: moto's S3, standing in for AWS S3 / MinIO
        started = time.perf_counter()
        s3 = start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], root)
        wait_until(healthy(f"{s3_url}/moto-api/"), "the S3 server (moto)", 60, [s3])
        s3_client(s3_url).create_bucket(Bucket=BUCKET)
        print(f"S3 (moto_server): started, bucket created in {time.perf_counter() - started:.1f}s")

        # one origin repo; the cpu worker's clone is the retrain flow's workspace, the gpu worker has its own
        # quiet_seconds: wide enough that the two `lmline data add` calls below (~7 s apart here) form one burst
        params = tiny_params(orchestration={"retries": {}, "mode": "distributed", "trigger": {"quiet_seconds": 20}})
        origin = make_dvc_repo(root / "origin", params)
        shutil.copy(REPO / "prefect.yaml", origin / "prefect.yaml")
        sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "store", f"s3://{BUCKET}/dvc"], origin, env)
        sh([sys.executable, "-m", "dvc", "remote", "modify", "store", "endpointurl", s3_url], origin, env)
        sh(["git", "add", "-A"], origin, env)
        sh(["git", "commit", "-q", "-m", "production config"], origin, env)
        clones = {pool: root / pool for pool in ("cpu", "gpu")}
        for clone in clones.values():
            sh(["git", "clone", "-q", str(origin), str(clone)], root, env)

        servers = [
            postgres,
            s3,
            start(
                "prefect-server",
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                root,
                {"PREFECT_SERVER_DATABASE_CONNECTION_URL": pg["prefect"].replace("postgresql:", "postgresql+asyncpg:")},
            ),
            # artifacts are proxied by the server (--artifacts-destination): only the server needs the S3
            # endpoint; the workers need the S3 credentials for DVC
            start(
                "mlflow-server",
                # psycopg2 named: SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3
                mlflow_server(
                    mlflow_port, pg["mlflow"].replace("postgresql:", "postgresql+psycopg2:"), f"s3://{BUCKET}/mlflow"
                ),
                root,
                {"MLFLOW_S3_ENDPOINT_URL": s3_url},
            ),
        ]
        started = time.perf_counter()
        wait_until(healthy(f"{api}/health"), "the Prefect server", 180, servers)
        print(f"Prefect server on PostgreSQL healthy after {time.perf_counter() - started:.1f}s")
        wait_until(healthy(f"{mlflow_url}/health"), "the MLflow server", 180, servers)
        print(f"MLflow server on PostgreSQL + S3 healthy after {time.perf_counter() - started:.1f}s")
        deployed = json.loads(sh([str(BIN / "lmline"), "deploy"], clones["cpu"], env))
        assert deployed["deployments"] == ["retrain/retrain", "run-stage/run-stage"]
        for pool, clone in clones.items():
            start(
                f"{pool}-worker",
                [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1", "--name", f"{pool}-worker"],
                clone,
                {"LMLINE_WORKSPACE": str(clone)},
            )
        with temporary_settings({PREFECT_API_URL: api}):
            yield {
                "root": root,
                "clones": clones,
                "mlflow": mlflow_url,
                "env": env,
                "logs": logs,
                "procs": procs,
                "s3": s3_url,
                "pg": pg,
                "ports": {"postgres": pg_port, "s3": s3_port, "prefect": prefect_port, "mlflow": mlflow_port},
            }
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(pg_dir, ignore_errors=True)


def flow_runs(deployment: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    flow_name, name = deployment.split("/")
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        return [r for r in runs if client.read_flow(r.flow_id).name == flow_name]


def dump_logs(prod) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(prod["logs"].glob("*.log")))


# ---------------------------------------------------------------- pieces, without servers
def git_repo(root: Path, params: dict | None = None) -> Path:
    """A tiny pipeline repo (make_dvc_repo) whose `origin` is a bare repo beside it, as a clone's would be."""
    repo = make_dvc_repo(root / "ws", params or tiny_params())
    subprocess.run(["git", "init", "-q", "--bare", str(root / "origin.git")], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(root / "origin.git")], cwd=repo, check=True)
    subprocess.run(["git", "push", "-q", "origin", "main"], cwd=repo, check=True, capture_output=True)
    return repo


@pytest.mark.parametrize(
    "override, message",
    [
        ("orchestration.pools.train=gpu", "retries/pools name unknown stages ['train']"),
        ("orchestration.pools.pretrain=tpu", "orchestration.pools.pretrain must be one of 'cpu' or 'gpu'"),
        ("orchestration.mode=cloud", "orchestration.mode must be one of 'local' or 'distributed'"),
        ("orchestration.trigger.quiet_seconds=5", "orchestration.trigger.quiet_seconds must be >= 10"),
        ("orchestration.schedule.timezone=Mars/Olympus", "timezone 'Mars/Olympus' is not an IANA time zone"),
    ],
)
def test_orchestration_params_are_checked(make_params, override, message):
    _, path = make_params(tiny_params())
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(path, [override])


def test_prefect_yaml_reads_exactly_the_values_lmline_deploy_sets(make_params):
    from flows import deploy

    params, _ = make_params(
        tiny_params(
            orchestration={"work_pools": {"gpu": "a100", "gpu_devices": "0,1"}, "trigger": {"quiet_seconds": 30}}
        )
    )
    env = deploy.deploy_values(params)
    used = set(re.findall(r"\{\{ \$(LMLINE_\w+) \}\}", (REPO / "prefect.yaml").read_text()))
    assert used == set(env)
    assert env["LMLINE_GPU_POOL"] == "a100" and env["LMLINE_TRIGGER_QUIET_SECONDS"] == "PT30S"
    gpu = deploy.pool_job_template("gpu", params.orchestration.work_pools)
    assert gpu["variables"]["properties"]["env"]["default"] == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert (
        "default"
        not in deploy.pool_job_template("cpu", params.orchestration.work_pools)["variables"]["properties"]["env"]
    )


def test_snapshot_carries_uncommitted_changes_without_touching_branch_or_index(tmp_path):
    from lmline.vcs import git, snapshot

    repo = git_repo(tmp_path)
    head, status = git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("seed: 7", "seed: 8"))
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    commit = snapshot(repo, "refs/lmline/test/pretrain")
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") != status
    assert git(repo, "diff", "--cached", "--name-only") == "", "the index is untouched"
    remote = tmp_path / "origin.git"
    assert git(remote, "rev-parse", "refs/lmline/test/pretrain") == commit
    assert "seed: 8" in git(remote, "show", f"{commit}:params.yaml")
    assert git(remote, "show", f"{commit}:dvc.lock").startswith("schema")
    assert git(remote, "rev-parse", f"{commit}^") == head


def test_distributed_mode_needs_a_dvc_remote_and_a_git_origin(tmp_path):
    from flows import routing

    repo = make_dvc_repo(tmp_path / "ws", tiny_params(orchestration={"mode": "distributed"}))
    params = config.load(repo / "params.yaml")
    with pytest.raises(LmlineError, match="no default DVC remote"):
        routing.check_ready(repo, params)
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(tmp_path / "store")],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    with pytest.raises(LmlineError, match="no git remote 'origin'"):
        routing.check_ready(repo, params)


def test_stage_data_targets_and_lock_entries(tmp_path):
    from lmline import vcs

    repo = make_dvc_repo(tmp_path / "ws", tiny_params())
    assert vcs.data_targets(repo, "ingest") == []  # corpus/ is in git here: nothing for DVC to move
    assert vcs.data_targets(repo, "pretrain") == ["data/tokenizer", "data/tokens"]
    assert vcs.data_targets(repo, "evaluate") == ["data/clean", "data/tokens", "models/finetune", "models/pretrain"]
    entry = {"cmd": "lmline stage pretrain", "outs": [{"path": "models/pretrain", "md5": "abc.dir", "hash": "md5"}]}
    vcs.record_lock_entry(repo, "pretrain", entry)
    vcs.record_lock_entry(repo, "tokenize", {"cmd": "lmline stage tokenize"})
    assert vcs.lock_entry(repo, "pretrain") == entry
    assert yaml.safe_load((repo / "dvc.lock").read_text())["schema"] == "2.0"


def test_a_worker_enters_its_clone_at_the_branch_tip(tmp_path, monkeypatch):
    from flows import routing
    from lmline.vcs import git

    repo = git_repo(tmp_path)
    monkeypatch.delenv(routing.WORKSPACE_ENV, raising=False)
    with pytest.raises(LmlineError, match="LMLINE_WORKSPACE is not set"):
        routing.enter_workspace()
    clone = tmp_path / "worker"
    subprocess.run(["git", "clone", "-q", str(tmp_path / "origin.git"), str(clone)], check=True)
    (repo / "new.txt").write_text("x")
    subprocess.run(["git", "add", "new.txt"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "new"], cwd=repo, check=True
    )
    subprocess.run(["git", "push", "-q", "origin", "main"], cwd=repo, check=True, capture_output=True)
    monkeypatch.setenv(routing.WORKSPACE_ENV, str(clone))
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)  # not started by a worker: no run parameters
    monkeypatch.chdir(tmp_path)
    assert routing.enter_workspace("main") == {"directory": str(clone)}
    assert Path.cwd() == clone and git(clone, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")

    # git_ref / revision come from flow parameters and event payloads: checked before git sees them
    from flows.retrain import retrain
    from lmline.vcs import snapshot

    head = git(clone, "rev-parse", "HEAD")
    marker = tmp_path / "pwned"
    # the attack is real: handed to git unchecked, this value runs a command on the worker
    subprocess.run(
        ["git", "fetch", "origin", f"--upload-pack=touch {tmp_path / 'control'}"], cwd=clone, capture_output=True
    )
    assert (tmp_path / "control").exists()
    for git_ref, revision, branch in [
        (f"--upload-pack=touch {marker}", None, "main"),
        ("refs/heads/main", f"--upload-pack=touch {marker}", "main"),
        ("refs/heads/main", "HEAD~1", "main"),  # a revision is a full commit id
        (None, None, "main bad"),
    ]:
        with pytest.raises(LmlineError) as refused:
            routing.check_out(clone, git_ref, revision, branch)
        assert "\n" not in str(refused.value) and (
            "is not a valid git ref name" in str(refused.value) or "must be a full commit id" in str(refused.value)
        )
    with pytest.raises(LmlineError, match="git_ref '--upload-pack=touch .*' is not a valid git ref name"):
        retrain.fn(git_ref=f"--upload-pack=touch {marker}")  # the data trigger's parameters, before any work
    assert not marker.exists() and git(clone, "rev-parse", "HEAD") == head

    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("seed: 7", "seed: 8"))
    revision = snapshot(repo, "refs/lmline/run-1/pretrain")
    routing.check_out(clone, "refs/lmline/run-1/pretrain", revision, "main")
    assert git(clone, "rev-parse", "HEAD") == revision and "seed: 8" in (clone / "params.yaml").read_text()


@pytest.mark.parametrize(
    "path, pattern",
    [
        ("corpus/docs/a.txt", "corpus/docs/*.txt"),
        ("corpus/docs/sub/a.txt", "corpus/docs/*.txt"),
        ("corpus/docs/a.md", "corpus/docs/*.txt"),
        ("corpus/docs/sub/deeper/a.txt", "corpus/docs/**/*.txt"),
        ("corpus/docs/sub/a.txt", "corpus/docs/*/*.txt"),
    ],
)
def test_added_files_must_be_what_the_sources_glob_finds(tmp_path, monkeypatch, path, pattern):
    import glob
    from pathlib import PurePosixPath

    from lmline.data import matches_glob

    monkeypatch.chdir(tmp_path)
    Path(path).parent.mkdir(parents=True)
    Path(path).write_text("x")
    assert matches_glob(PurePosixPath(path), pattern) == (path in glob.glob(pattern, recursive=True))


def test_data_add_appends_rows_and_checks_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmline.data import Rollback, append_rows
    from lmline.sources import CsvSource, JsonlSource, ParquetSource

    def append(new, source):
        with Rollback(tmp_path) as rollback:
            return append_rows(tmp_path, new, source, rollback)

    (tmp_path / "old.jsonl").write_text('{"t": "a"}')  # no final newline: the rows must not run together
    (tmp_path / "new.jsonl").write_text('{"t": "b"}\n')
    append(tmp_path / "new.jsonl", JsonlSource(name="j", type="jsonl", path="old.jsonl", text_field="t"))
    assert (tmp_path / "old.jsonl").read_text() == '{"t": "a"}\n{"t": "b"}\n'

    (tmp_path / "old.csv").write_text("text,label\nx,1\n")
    (tmp_path / "new.csv").write_text("text,label\ny,0\n")
    (tmp_path / "bad.csv").write_text("label,text\n0,z\n")
    csv_source = CsvSource(name="c", type="csv", path="old.csv")
    append(tmp_path / "new.csv", csv_source)
    assert (tmp_path / "old.csv").read_text() == "text,label\nx,1\ny,0\n"
    with pytest.raises(LmlineError, match="header 'label,text' differs"):
        append(tmp_path / "bad.csv", csv_source)
    assert (tmp_path / "old.csv").read_text() == "text,label\nx,1\ny,0\n", "a failed add leaves the file as it was"

    pq.write_table(pa.table({"text": ["p"]}), tmp_path / "old.parquet")
    pq.write_table(pa.table({"text": ["q"]}), tmp_path / "new.parquet")
    pq.write_table(pa.table({"body": ["r"]}), tmp_path / "bad.parquet")
    pq_source = ParquetSource(name="p", type="parquet", path="old.parquet")
    append(tmp_path / "new.parquet", pq_source)
    assert pq.read_table(tmp_path / "old.parquet").column("text").to_pylist() == ["p", "q"]
    with pytest.raises(LmlineError, match="bad.parquet has no column 'text'"):
        append(tmp_path / "bad.parquet", pq_source)


def test_lmline_data_add_tracks_the_source_with_dvc_and_snapshots_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmline.cli import app
    from lmline.vcs import git

    repo = git_repo(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(tmp_path / "store")],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    monkeypatch.chdir(repo)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    new = tmp_path / "doc900.txt"
    new.write_text("A new document.\n")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "add", str(new), "--source", "docs"])
    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)
    assert added["path"] == "corpus/docs" and added["files"] == ["corpus/docs/doc900.txt"] and not added["event"]
    assert "no lmline.data.updated event" in result.stderr
    assert yaml.safe_load((repo / "corpus/docs.dvc").read_text())["outs"][0]["md5"] == added["md5"]
    assert git(repo, "ls-files", "corpus/docs") == "", "git no longer tracks what DVC now does"
    assert (tmp_path / "store").is_dir(), "pushed to the DVC remote"
    tree = git(tmp_path / "origin.git", "ls-tree", "-r", "--name-only", added["revision"])
    assert "corpus/docs.dvc" in tree and "corpus/docs/doc000.txt" not in tree

    again = runner.invoke(app, ["data", "add", str(new), "--source", "docs"])
    assert again.exit_code == 0 and json.loads(again.stdout)["changed"] is False, "re-adding the same file adds nothing"
    assert json.loads(again.stdout)["md5"] == added["md5"]
    new.write_text("Another document under the same name.\n")
    other = runner.invoke(app, ["data", "add", str(new), "--source", "docs"])
    assert other.exit_code == 1 and "corpus/docs/doc900.txt exists with other content" in other.stderr
    (tmp_path / "bad.jsonl").write_text('{"review": "fine", "verdict": "fresh"}\n{oops\n')
    bad = runner.invoke(app, ["data", "add", str(tmp_path / "bad.jsonl"), "--source", "reviews"])
    assert bad.exit_code == 1 and "bad.jsonl line 2: not valid JSON" in bad.stderr
    wrong = runner.invoke(app, ["data", "add", str(new), "--source", "nope"])
    assert wrong.exit_code == 1 and "--source 'nope' names no source" in wrong.stderr


# ---------------------------------------------------------------- tests with real servers
@pytest.mark.slow
@pytest.mark.integration
def test_distributed_retrain_routes_gpu_stages_to_the_gpu_worker(prod):
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment

    cpu, gpu = prod["clones"]["cpu"], prod["clones"]["gpu"]
    started = time.perf_counter()
    run = run_deployment("retrain/retrain", timeout=900, poll_interval=1, as_subflow=False)
    print(f"\ndistributed retrain (deployment run to completion): {time.perf_counter() - started:.1f}s")
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{dump_logs(prod)}"
    assert run.work_pool_name == "cpu"

    stage_runs = flow_runs("run-stage/run-stage")
    assert sorted(r.parameters["stage"] for r in stage_runs) == sorted(GPU_STAGES)
    assert all(r.work_pool_name == "gpu" and r.state.is_completed() for r in stage_runs)
    assert all(r.parent_task_run_id is not None for r in stage_runs), "routed stages show as subflows of the retrain"

    # PostgreSQL, S3 (moto), both servers and both workers: the four servers were seen listening, and
    # nothing of ours listens beyond loopback
    listening = listening_addresses(prod["procs"])
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert set(prod["ports"].values()) <= {port for _, port in listening}, (prod["ports"], listening)

    # the gpu stages ran in the gpu worker's clone, and only there (training checkpoints are no DVC out:
    # they stay where training ran); the cpu stages' raw data never had to go there
    for clone in (gpu, cpu):
        for out in ("models/pretrain/config.json", "models/finetune/config.json", "metrics/evaluate.json"):
            assert (clone / out).exists(), (clone, out)
    assert (gpu / "checkpoints").is_dir() and not (cpu / "checkpoints").exists()
    assert (cpu / "data/raw").is_dir() and not (gpu / "data/raw").exists()

    # the parent's dvc.lock records all six stages and matches its outputs
    lock = yaml.safe_load((cpu / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"ingest", "clean", "tokenize", "pretrain", "finetune", "evaluate"}
    status = sh([sys.executable, "-m", "dvc", "status", "--json"], cpu, prod["env"])
    assert json.loads(status) == {}

    # the model went through the MLflow server, and the stage runs nested under the flow's parent run
    client = MlflowClient(tracking_uri=prod["mlflow"])
    champion = client.get_model_version_by_alias("tiny-classification", "champion")
    parent = client.get_run(champion.run_id).data.tags["mlflow.parentRunId"]
    nested = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.info.run_name for r in nested) == sorted(["ingest", "clean", "tokenize", *GPU_STAGES])
    # each gpu stage's MLflow run was made at the snapshot its routed run checked out
    revisions = {r.parameters["stage"]: r.parameters["revision"] for r in stage_runs}
    assert {r.info.run_name: r.data.tags["git.commit"] for r in nested if r.info.run_name in GPU_STAGES} == revisions

    # the state lives in the production stores: Prefect's and MLflow's rows in PostgreSQL, the model's files
    # and the DVC cache in the object store
    assert sql(prod["pg"]["prefect"], "SELECT count(*) FROM flow_run") >= 1 + len(GPU_STAGES)
    assert sql(prod["pg"]["mlflow"], "SELECT count(*) FROM runs") == 1 + len(nested)
    assert sql(prod["pg"]["mlflow"], "SELECT count(*) FROM model_versions") >= 1
    model_files = s3_keys(prod["s3"], "mlflow/")
    assert any(k.endswith("/MLmodel") for k in model_files), model_files[:20]
    assert any(k.endswith("/model.safetensors") for k in model_files), model_files[:20]
    assert s3_keys(prod["s3"], "dvc/files/md5/"), "the stages' data went through the S3 DVC remote"


@pytest.mark.slow
@pytest.mark.integration
def test_new_data_triggers_one_retrain(prod):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    cpu, env = prod["clones"]["cpu"], prod["env"]
    with get_client(sync_client=True) as client:
        # the triggered run must be created, not executed: that would be a second full pipeline
        client.update_work_pool("cpu", WorkPoolUpdate(is_paused=True))
    before = {r.id for r in flow_runs("retrain/retrain")}

    new = prod["root"] / "new"
    new.mkdir()
    (new / "doc900.txt").write_text("The harbour was quiet before the storm.\nThe merchant spoke.\n")
    (new / "reviews.jsonl").write_text(json.dumps({"review": "A wonderful film.", "verdict": "fresh"}) + "\n")
    # two sources, two events in one burst
    added = [
        json.loads(sh([str(BIN / "lmline"), "data", "add", str(new / f), "--source", s], cpu, env))
        for f, s in (("doc900.txt", "docs"), ("reviews.jsonl", "reviews"))
    ]
    assert all(a["event"] for a in added)
    assert (cpu / "corpus/docs.dvc").exists() and (cpu / "corpus/docs/doc900.txt").exists()
    on_s3 = set(s3_keys(prod["s3"], "dvc/"))
    assert {f"dvc/files/md5/{a['md5'][:2]}/{a['md5'][2:]}" for a in added} <= on_s3, (
        "the added data is on the S3 remote"
    )

    triggered = wait_until(
        lambda: [r for r in flow_runs("retrain/retrain") if r.id not in before],
        "a retrain run created by the data trigger",
        90,
    )
    assert len(triggered) == 1, "one burst of data events starts one retrain"
    [run] = triggered
    assert run.created_by and run.created_by.type == "AUTOMATION"
    # it trains the snapshot of the last event: the data of both additions
    assert run.parameters["revision"] == added[-1]["revision"]
    assert run.parameters["git_ref"] == added[-1]["git_ref"]
