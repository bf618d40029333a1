"""`lmline status`: stages from `dvc status`, champion and challenger from MLflow, flow runs from a
Prefect server when one is configured (never an ephemeral one: status must stay fast)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml
from conftest import BIN, free_port, make_dvc_repo, tiny_params
from typer.testing import CliRunner

from lmline.cli import app
from lmline.cli.status import describe_changes


def test_describe_changes_names_what_changed():
    entries = [
        {"changed deps": {"params.yaml": {"pretrain.lr": "modified"}, "data/tokens": "modified"}},
        {"changed outs": {"models/pretrain": "deleted"}},
        "changed command",
    ]
    assert describe_changes(entries) == (
        "params pretrain.lr modified; deps data/tokens modified; outs models/pretrain deleted; changed command"
    )


@pytest.fixture
def fresh_repo(tmp_path, monkeypatch):
    root = make_dvc_repo(tmp_path / "fresh", tiny_params())
    monkeypatch.chdir(root)
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
    return root


def test_a_fresh_clone_has_nothing_run_and_says_what_to_do(fresh_repo):
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(s["stage"], s["state"]) for s in report["pipeline"]["stages"]] == [
        (stage, "never run") for stage in ("ingest", "clean", "tokenize", "pretrain", "finetune", "evaluate")
    ]
    assert report["registry"]["models"] == [] and "lmline run" in report["registry"]["note"]
    assert not (fresh_repo / "mlflow.db").exists(), "status must not create an MLflow store"
    assert "PREFECT_API_URL" in report["flow_runs"]["note"]


def test_an_unreachable_prefect_api_is_reported_quickly(fresh_repo, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")  # nothing listens there
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "does not answer" in result.stdout
    assert time.perf_counter() - started < 20, "no long client retries"


@pytest.mark.slow
def test_status_after_a_run_against_real_servers(served_pipeline):
    workspace, env = served_pipeline["workspace"], served_pipeline["env"]

    def status(*args: str) -> str:
        out = subprocess.run(
            [str(BIN / "lmline"), "status", *args], cwd=workspace, env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    report = json.loads(status("--json"))
    assert {s["state"] for s in report["pipeline"]["stages"]} == {"up to date"}
    champion = next(m for m in report["registry"]["models"] if m["model"] == "tiny-classification")
    assert (champion["alias"], champion["version"]) == ("champion", 1)
    evaluate = json.loads((workspace / "metrics" / "evaluate.json").read_text())
    assert champion["metrics"]["test macro_f1"] == f"{evaluate['task']['macro_f1']:.4f}"
    assert any(m["model"] == "tiny-base" and m["alias"] == "champion" for m in report["registry"]["models"])
    [run] = [r for r in report["flow_runs"]["runs"] if r["id"] == served_pipeline["flow_run_id"]]
    assert (run["flow"], run["state"]) == ("retrain", "Completed")

    # a changed param: its stage is changed, the ones after it may re-run; the table says so
    params_file = workspace / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["pretrain"]["lr"] = 0.001
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        table = status()
    finally:
        params_file.write_text(original)
    lines = {line.split()[0]: line for line in table.splitlines()[2:8]}
    assert (
        "changed" in lines["pretrain"] and "params pretrain modified" in lines["pretrain"]
    )  # dvc.yaml lists the section
    assert "may re-run after pretrain" in lines["evaluate"] and "up to date" in lines["tokenize"]
    assert "@champion" in table and served_pipeline["flow_run_id"] in table
