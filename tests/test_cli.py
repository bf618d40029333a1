"""The CLI's own checks: options validated and models refused with one line and exit 1, before any work."""

from __future__ import annotations

import json
import shutil

import pytest
from test_finetune import save_tiny_lm
from typer.testing import CliRunner

from lmline.cli import app


@pytest.fixture
def tiny_models(workspace, make_params):
    """models/pretrain (a causal LM) and models/finetune (a 2-label classifier built on it), and params."""
    from transformers import AutoModelForSequenceClassification

    save_tiny_lm(workspace / "models/pretrain", ["a wonderful film", "a dull film", "the king spoke"])
    clf = AutoModelForSequenceClassification.from_pretrained(
        workspace / "models/pretrain", num_labels=2, id2label={0: "rotten", 1: "fresh"}
    )
    clf.save_pretrained(workspace / "models/finetune")
    shutil.copy(workspace / "models/pretrain/tokenizer.json", workspace / "models/finetune")
    shutil.copy(workspace / "models/pretrain/tokenizer_config.json", workspace / "models/finetune")
    make_params({"ingest": {"sources": [{"name": "shakespeare", "type": "sample"}]}})
    return workspace / "models"


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--temperature", "0"],
            "error: --temperature must be above 0 (got 0.0); a small one, e.g. 0.05, is near-greedy",
        ),
        (
            ["--temperature", "-1"],
            "error: --temperature must be above 0 (got -1.0); a small one, e.g. 0.05, is near-greedy",
        ),
        (
            ["--temperature", "nan"],
            "error: --temperature must be above 0 (got nan); a small one, e.g. 0.05, is near-greedy",
        ),
        (["--max-new-tokens", "0"], "error: --max-new-tokens must be at least 1 (got 0)"),
        (["--seed", "-3"], "error: --seed must be between 0 and 4294967295 (got -3)"),
    ],
)
def test_generate_refuses_bad_options_in_one_line(tiny_models, args, message):
    result = CliRunner().invoke(app, ["generate", "The king", "--model", str(tiny_models / "pretrain"), *args])
    assert one_line_error(result) == message


def test_generate_refuses_a_classifier(tiny_models):
    result = CliRunner().invoke(app, ["generate", "The king", "--model", str(tiny_models / "finetune")])
    assert one_line_error(result).startswith(f"error: {tiny_models / 'finetune'}: not a causal language model")


def test_classify_refuses_a_causal_lm_whose_head_would_be_random_and_answers_with_a_trained_one(tiny_models):
    result = CliRunner().invoke(app, ["classify", "a wonderful film", "--model", str(tiny_models / "pretrain")])
    assert one_line_error(result) == (
        f"error: {tiny_models / 'pretrain'}: not a fine-tuned classifier (architectures: ['LlamaForCausalLM'])"
    )
    runs = [
        CliRunner().invoke(app, ["classify", "a wonderful film", "--model", str(tiny_models / "finetune")])
        for _ in range(2)
    ]
    assert [r.exit_code for r in runs] == [0, 0], runs[0].output
    answers = [json.loads(r.stdout) for r in runs]
    assert answers[0] == answers[1] and set(answers[0]["probabilities"]) == {"rotten", "fresh"}


def test_classify_refuses_a_classifier_config_without_head_weights(tiny_models):
    headless = tiny_models / "headless"
    shutil.copytree(tiny_models / "pretrain", headless)
    config = json.loads((headless / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    result = CliRunner().invoke(app, ["classify", "a wonderful film", "--model", str(headless)])
    assert one_line_error(result) == f"error: {headless}: the classifier's weights lack score.weight"


# ---------------------------------------------------------------- the one error handler
def test_the_lmline_script_is_main_and_every_user_error_is_one_line(workspace):
    import os
    import subprocess
    import sys
    import tomllib

    from conftest import REPO

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lmline"] == "lmline.entry:main"
    # what the installed script does: import main and call it (no stage host here: the CLI runs the command)
    proc = subprocess.run(
        [sys.executable, "-c", "from lmline.entry import main; main()", "stage", "nosuch"],
        capture_output=True,
        text=True,
        cwd=workspace,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: unknown stage 'nosuch' (stages: ingest, clean, tokenize, pretrain, finetune, evaluate)"
    ]
    # MLflow's own errors (promote caught them itself before the handler) are one line too
    result = CliRunner().invoke(app, ["promote", "no-such-model", "3"])
    line = one_line_error(result)
    assert line.startswith("error: ") and "no-such-model" in line and "Traceback" not in result.output


def test_the_script_launches_prefects_temporary_server_only_for_a_run_that_needs_it(monkeypatch):
    from lmline.entry import runs_the_pipeline

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert runs_the_pipeline(["run"]) and runs_the_pipeline(["-v", "run", "--stage", "ingest"])
    assert not runs_the_pipeline(["run", "--help"])
    assert not runs_the_pipeline(["status"]) and not runs_the_pipeline(["stage", "ingest"])
    assert not runs_the_pipeline([])
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # the user's server: nothing to launch
    assert not runs_the_pipeline(["run"])
