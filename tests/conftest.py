"""Shared fixtures. Tests run in a temp workspace (cwd = tmp_path) so relative params.paths land there."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

import lmline  # noqa: F401  (offline switches)
from lmline import config

REPO = Path(__file__).resolve().parent.parent


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
                {"name": "reviews", "type": "jsonl", "role": "finetune", "path": "corpus/reviews.jsonl",
                 "text_field": "review", "label_field": "verdict"},
            ]
        },
        "clean": {"min_chars": 10, "workers": 1, "split": {"val": 0.15, "test": 0.15}},
        "tokenize": {"vocab_size": 300, "num_proc": 1},
        "pretrain": {"n_layer": 1, "n_head": 2, "d_model": 32, "context": 32, "batch_size": 8, "max_steps": 12,
                     "eval_every": 6, "eval_batches": 2, "checkpoint_every": 6, "warmup_steps": 2, "log_every": 2},
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
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}
    for cmd in (["git", "init", "-q", "-b", "main"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                [sys.executable, "-m", "dvc", "config", "core.check_update", "false"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny pipeline"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root
