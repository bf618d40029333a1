"""Real `dvc repro` in a temporary git repo: the first run runs, the second skips, and a param
change re-runs only the stage that lists it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import make_dvc_repo, tiny_params

from flows.stage_task import stage_env

pytestmark = pytest.mark.slow


def repro(root, *targets) -> list[str]:
    """Run dvc repro; return the stages it executed (DVC prints "Running stage 'x'" only for those)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", *targets], cwd=root, env=stage_env(None), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.findall(r"Running stage '(\w+)'", proc.stdout)


def test_repro_runs_then_skips_then_reruns_only_the_changed_stage(workspace):
    root = make_dvc_repo(workspace, tiny_params())
    assert repro(root, "tokenize") == ["ingest", "clean", "tokenize"]
    for out in (
        "data/raw/docs.jsonl",
        "data/clean/pretrain/train.parquet",
        "data/clean/finetune/test.parquet",
        "data/tokenizer/tokenizer.json",
        "data/tokens/train.bin",
        "metrics/tokenize.json",
    ):
        assert (root / out).exists(), out
    # `dvc repro` by hand: no run, no stage host, each stage a process of its own
    assert json.loads((root / "metrics" / "tokenize.json").read_text())["forked_from_stage_host"] is False

    assert repro(root, "tokenize") == []

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenize"]["vocab_size"] = 320
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert repro(root, "tokenize") == ["tokenize"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["tokenize"]["params"]["params.yaml"]["tokenize"]["vocab_size"] == 320
