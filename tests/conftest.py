"""Shared fixtures. Tests run in a temp workspace (cwd = tmp_path) so relative params.paths land there."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from lmline import OFFLINE_ENV, config  # importing lmline sets the offline switches

REPO = Path(__file__).resolve().parent.parent
# Two test workers, servers and training share two cores: Prefect's temporary server once took more than
# Prefect's default 20 s to answer in CI on a slow day (`lmline run` failed on it). Every `lmline run`
# of the tests (in-process or a subprocess copying this environment) waits up to 120 s instead.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


# The modules whose tests look at the one served run (`served_pipeline`: two servers and a whole
# `lmline run`, ~100 s to build), kept on one pytest-xdist worker so that it is built once.
SERVED_RUN_MODULES = ("tests/test_browser.py", "tests/test_modelcard.py", "tests/test_status.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (make test) keeps each module on one worker, in order; this scheduler also keeps
    SERVED_RUN_MODULES together, where they would otherwise land on both workers and each build the
    served run. (xdist's `--dist loadgroup` would say it with marks, but pytest 9.2 ignores the test
    ids it rewrites for them.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ServedRunTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "served_pipeline" if module in SERVED_RUN_MODULES else module

    return ServedRunTogether(config, log)


def pytest_collection_modifyitems(config, items):
    outside = sorted(
        {i.nodeid.split("::")[0] for i in items if "served_pipeline" in i.fixturenames} - set(SERVED_RUN_MODULES)
    )
    if outside:
        raise pytest.UsageError(f"{outside} use served_pipeline: add them to SERVED_RUN_MODULES (tests/conftest.py)")


@pytest.fixture(autouse=True)
def _isolated_verbosity(monkeypatch):
    """The CLI's --quiet/--verbose travel to stage processes in LMLINE_VERBOSITY; a CLI invoked
    in-process by one test must not leave it set for the next."""
    monkeypatch.setenv("LMLINE_VERBOSITY", "normal")


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite store: creating one takes seconds, copying it none."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def workspace(tmp_path, monkeypatch, mlflow_template):
    """An empty workspace as cwd, with MLflow's embedded default store (./mlflow.db) ready in it."""
    import shutil

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LMLINE_PARENT_RUN_ID", raising=False)
    return tmp_path


SEED = config.ProjectConfig().seed  # params.yaml's project.seed when a test sets none


def stage_io(stage: str, **paths) -> tuple[dict[str, Path], dict[str, Path]]:
    """A stage's inputs and outputs under the default paths (or `paths` overrides), relative to the
    workspace: what a stage test passes to run() beside its own tiny section, no whole Params needed."""
    from types import SimpleNamespace

    return config.stage_io(SimpleNamespace(paths=config.PathsConfig(**paths)), stage)


def write_params(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def make_params(workspace):
    """make_params({...sections...}) -> (Params, params.yaml path) in the workspace."""

    def make(sections: dict, name: str = "params.yaml"):
        path = write_params(workspace / name, sections)
        return config.load(path), path

    return make


# ---------------------------------------------------------------- a tiny corpus for pipeline tests
WORDS = (
    "the a river mountain city people walked slowly quickly over under bright dark morning evening "
    "king queen soldier merchant ship harbour market bread wine letter spoke answered laughed wept "
    "because although when while after before never always gold silver storm quiet loud old young"
).split()
POSITIVE = "wonderful moving brilliant funny charming delightful superb".split()
NEGATIVE = "dull boring clumsy tedious awful bland lifeless".split()


def sentence(rng) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
    return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?"])


def write_tiny_corpus(root: Path, n_docs: int = 60, n_reviews: int = 120, seed: int = 0) -> None:
    """Pretraining text files (one document per file) and a labelled review set (JSONL) whose labels
    a classifier can learn: positive reviews use positive words, negative reviews negative ones."""
    import json
    import random

    rng = random.Random(seed)
    docs = root / "corpus" / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        paragraphs = ["\n".join(sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(rng.randint(2, 4))]
        (docs / f"doc{i:03d}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    with open(root / "corpus" / "reviews.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n_reviews):
            label = "fresh" if i % 2 else "rotten"
            cue = rng.choice(POSITIVE if label == "fresh" else NEGATIVE)
            text = f"{sentence(rng)[:-1]}, a {cue} film number {i}."
            fh.write(json.dumps({"review": text, "verdict": label}) + "\n")


def tiny_params(**sections) -> dict:
    """Params for a seconds-long pipeline on write_tiny_corpus's files; `sections` override whole keys."""
    base = {
        "project": {"name": "tiny", "experiment": "tiny", "seed": 7},
        "paths": config.PathsConfig().model_dump(),  # dvc.yaml interpolates ${paths.*} from the params file
        "ingest": {
            "sources": [
                {"name": "docs", "type": "text_files", "role": "pretrain", "path": "corpus/docs/*.txt"},
                {
                    "name": "reviews",
                    "type": "jsonl",
                    "role": "finetune",
                    "path": "corpus/reviews.jsonl",
                    "text_field": "review",
                    "label_field": "verdict",
                },
            ]
        },
        "clean": {"min_chars": 10, "workers": 1, "split": {"val": 0.15, "test": 0.15}},
        "tokenize": {"vocab_size": 300, "num_proc": 1},
        "pretrain": {
            "n_layer": 1,
            "n_head": 2,
            "d_model": 32,
            "context": 32,
            "batch_size": 8,
            "max_steps": 12,
            "eval_every": 6,
            "eval_batches": 2,
            "checkpoint_every": 6,
            "warmup_steps": 2,
            "log_every": 2,
        },
        "finetune": {"max_steps": 12, "eval_every": 6, "batch_size": 16, "max_length": 32, "warmup_steps": 2},
        "evaluate": {"prompts": ["The king"], "max_new_tokens": 8, "batch_size": 16},
        "orchestration": {"retries": {}},
    }
    base.update(sections)
    return base


def make_dvc_repo(root: Path, params: dict) -> Path:
    """A fresh git + DVC repo holding the project's pipeline definition and code, the tiny corpus
    and `params`: what a user's clone looks like, minus the virtualenv."""
    import shutil
    import subprocess

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in ("lmline", "tasks", "flows"):
        shutil.copytree(REPO / item, root / item, ignore=ignore)
    for item in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / item, root / item)
    write_tiny_corpus(root)
    write_params(root / "params.yaml", params)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t.invalid",
    }
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
        [sys.executable, "-m", "dvc", "config", "core.check_update", "false"],
        ["cp", "-r", str(REPO / ".dvc" / "plots"), ".dvc/plots"],  # dvc.yaml's plot templates
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "tiny pipeline"],
    ):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


# ---------------------------------------------------------------- real servers on loopback ports
BIN = Path(sys.executable).parent


def lmline_cli(root: Path, *args: str):
    """The real `lmline` command in workspace `root` (this checkout's code), ephemeral Prefect with its own
    home (root/prefect-home), the embedded MLflow store, output not a terminal."""
    import subprocess

    env = {
        k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "LMLINE_VERBOSITY")
    }
    env.update(PYTHONPATH=str(root), PREFECT_HOME=str(root / "prefect-home"))
    cmd = [sys.executable, "-c", "from lmline.cli import main; main()", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def mlflow_server(port: int, backend_store_uri: str, artifacts: str | Path) -> list[str]:
    """`mlflow server` on loopback with one worker, artifacts proxied by the server."""
    return [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        str(artifacts),
        "--workers",
        "1",
    ]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(check, what: str, timeout: float, procs=()) -> None:
    """Poll `check` until true; fail early, with its log, if a process it depends on exits."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{what}: {proc.args[:3]} exited {proc.returncode}\n{proc.log_path.read_text()[-3000:]}"
                )
        if check():
            return
        time.sleep(0.25)  # polling interval, not a wait for something to happen
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop_group(proc) -> None:
    """SIGINT the process group started for `proc`, then SIGKILL whatever is left."""
    import signal
    import subprocess

    for sig, grace in ((signal.SIGINT, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="session")
def served_pipeline(tmp_path_factory, mlflow_template):
    """A real `prefect server` and `mlflow server` on free loopback ports (SQLite stores in a temp dir)
    and one tiny `lmline run` against them, run as a newcomer runs it. The UI, status and model-card
    tests look at the result. Both servers are stopped by process group, whatever happens."""
    import re
    import shutil
    import subprocess
    import time

    root = tmp_path_factory.mktemp("served")
    prefect_port, mlflow_port = free_port(), free_port()
    api, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMLINE_", "MLFLOW_TRACKING", "PREFECT_API"))}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_UI_API_URL": api,  # else the UI calls port 4200
            **OFFLINE_ENV,
            "MLFLOW_TRACKING_URI": mlflow_url,
        }
    )
    shutil.copy(mlflow_template, root / "mlflow.db")  # migrated already: the server starts sooner
    procs = []

    def start(name: str, cmd: list[str]):
        log = root / f"{name}.log"
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        proc.log_path = log
        procs.append(proc)
        return proc

    try:
        servers = [
            start(
                "prefect-server",
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            ),
            start("mlflow-server", mlflow_server(mlflow_port, f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts")),
        ]
        wait_for(lambda: answers(f"{api}/health"), "the Prefect server", 180, servers)
        wait_for(lambda: answers(f"{mlflow_url}/health"), "the MLflow server", 180, servers)

        workspace = make_dvc_repo(root / "workspace", tiny_params())
        started = time.perf_counter()
        run = subprocess.run(
            [str(BIN / "lmline"), "run"], cwd=workspace, env=env, capture_output=True, text=True, timeout=900
        )
        seconds = time.perf_counter() - started
        assert run.returncode == 0, f"lmline run failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
        flow_run = re.search(r"/runs/flow-run/([0-9a-f-]{36})", run.stdout)
        assert flow_run, f"the summary names no flow run:\n{run.stdout}"
        yield {
            "root": root,
            "workspace": workspace,
            "env": env,
            "api": api,
            "ui": api.removesuffix("/api"),
            "mlflow": mlflow_url,
            "flow_run_id": flow_run.group(1),
            "stdout": run.stdout,
            "stderr": run.stderr,
            "seconds": seconds,
            "model": "tiny-classification",
        }
    finally:
        for proc in reversed(procs):
            stop_group(proc)
