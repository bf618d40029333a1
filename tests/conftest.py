"""Shared fixtures. Tests run in a temp workspace (cwd = tmp_path) so relative params.paths land there."""
from __future__ import annotations

import os
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
