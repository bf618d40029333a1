"""Shared fixtures. Tests run in a temp workspace (cwd = tmp_path) so relative params.paths land there."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import lmline  # noqa: F401  (offline switches)
from lmline import config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty workspace as cwd, with MLflow pointed at a store inside it."""
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
