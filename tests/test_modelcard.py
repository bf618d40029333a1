"""Model cards and plots: the card quotes the metrics files exactly and has every section; a real run
registers it as each version's description and artifact and shows it in Prefect; `dvc plots show`
and MLflow get the same plots."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import tiny_params

from lmline import config, modelcard
from lmline.io import write_json

METRICS = {  # the shapes the stages write (from a tiny run), trimmed
    "clean": {
        "sources": {
            "docs": {"docs_in": 60, "docs_out": 58, "bytes_out": 53672},
            "reviews": {"docs_in": 120, "docs_out": 120, "bytes_out": 10427},
        },
        "splits": {"finetune": {"test": 20, "train": 82, "val": 18}, "pretrain": {"test": 8, "train": 37, "val": 13}},
    },
    "tokenize": {
        "vocab_size": 300,
        "train_sample_mb": 0.034,
        "splits": {
            "test": {"bytes_per_token": 1.669809},
            "train": {"bytes_per_token": 1.663835},
            "val": {"bytes_per_token": 1.652365},
        },
    },
    "pretrain": {
        "parameters": 23008,
        "steps": 12,
        "tokens_seen": 3072,
        "train_seconds": 1.21,
        "stopped_by": "max_steps",
        "precision": "fp32",
        "devices": 1,
        "tokens_per_second": 2539.6,
        "val_bits_per_byte": 4.355306,
        "val_perplexity": 146.6827,
    },
    "finetune": {
        "labels": ["fresh", "rotten"],
        "source": "reviews",
        "steps": 12,
        "best_step": 6,
        "train_examples": 82,
        "train_seconds": 2.127,
        "stopped_by": "max_steps",
    },
    "evaluate": {
        "lm": {
            "context": 32,
            "test_bits_per_byte": 4.3108374891946335,
            "test_perplexity": 146.85786495931282,
            "test_tokens": 4773,
        },
        "task": {"accuracy": 0.55, "macro_f1": 0.52, "test_examples": 20},
        "baselines": {
            "majority": {"accuracy": 0.55, "macro_f1": 0.3548387096774194},
            "tfidf_logreg": {"accuracy": 0.95, "macro_f1": 0.948849104859335},
        },
    },
}
SAMPLES = (
    "# pretrained model: temperature=0.8 top_k=40 max_new_tokens=8 seed=7\n\n## prompt: 'The king'\nThe king was\n"
)
LINEAGE = {
    "model": "tiny-classification/3",
    "aliases": ["champion"],
    "mlflow_run_id": "run3",
    "stage": "finetune",
    "git_commit": "abc123",
    "git_dirty": "false",
    "dvc_deps": {"data/clean": "d41d8.dir"},
    "pipeline_run_id": "parent3",
    "prefect": {"flow_run_id": "f-3", "flow_run_name": "neat-goldfish", "flow_run_url": ""},
    "base_model": {"model": "tiny-base/2"},
    "decision": {
        "lmline.decision": "promoted",
        "lmline.decision.reason": "macro_f1 0.5200 beats 0.4000 by +0.1200",
        "lmline.decision.candidate_metric": "0.520000",
        "lmline.decision.champion_metric": "0.400000",
        "lmline.decision.champion_version": "2",
    },
}
SECTIONS = [
    "## Data",
    "## Tokenizer",
    "## Architecture",
    "## Training budget",
    "## Metrics",
    "## Compared with the champion",
    "## Sample generations",
    "## Intended use and limitations",
    "## Lineage",
]


@pytest.fixture
def params():
    return config.Params.model_validate(tiny_params())


def test_the_task_card_has_every_section_and_quotes_the_metrics(params):
    card = modelcard.render(params, "tiny-classification/3", METRICS, SAMPLES, LINEAGE)
    assert card.startswith("# Model card: tiny-classification v3\n")
    outside_code = re.sub(r"```.*?```", "", card, flags=re.S)  # the samples have headings of their own
    assert re.findall(r"^## .+$", outside_code, flags=re.M) == SECTIONS
    for row in (
        "| `docs` | text_files | pretrain | 60 | 58 | 0.05 MB |",  # sizes after cleaning
        "| parameters | 23,008 |",
        "| layers × heads × width | 1 × 2 × 32 |",
        "| task | classification: classification head over `fresh`, `rotten`" + modelcard.READ_OUT["last"] + " |",
        "| pretrain | 12 | 3,072 tokens | 1.2 | max_steps (budget 12 steps / 2.5 min) | fp32 × 1, 2539.6 tokens/s |",
        "| validation (pretrain, whole split) | 4.3553 | 146.6827 |",
        "| test (4,773 tokens, 32-token windows) | 4.3108 | 146.8579 |",
        "| **this model** | 0.5500 | 0.5200 |",
        "| baseline: majority class | 0.5500 | 0.3548 |",
        "| baseline: TF-IDF + logistic regression | 0.9500 | 0.9488 |",
        "| this version | 0.5200 |",
        "| champion before (v2) | 0.4000 |",
        "| fine-tuned from | `tiny-base/2` |",
        "| DVC dep `data/clean` | `d41d8.dir` |",
    ):
        assert row in card, row
    assert "Byte-level BPE" in card and "300 tokens" in card and "train 1.664" in card
    assert "Decision: **promoted**: macro_f1 0.5200 beats 0.4000 by +0.1200." in card
    assert "The king was" in card and "its base language model" in card
    assert "always answers one of `fresh`, `rotten`" in card


def test_the_base_card_has_no_task_sections(params):
    card = modelcard.render(params, "tiny-base/2", METRICS, SAMPLES, {**LINEAGE, "decision": {}, "base_model": None})
    assert "Compared with the champion" not in card and "**this model**" not in card
    assert "A 23,008-parameter llama pretrained language model" in card
    assert "| test (4,773 tokens, 32-token windows) | 4.3108 | 146.8579 |" in card


def test_a_causal_lm_card_compares_with_the_pretrained_model(params):
    causal = params.model_copy(update={"finetune": params.finetune.model_copy(update={"task": "causal-lm"})})
    metrics = {
        **METRICS,
        "evaluate": {
            **METRICS["evaluate"],
            "task": {"test_bits_per_byte": 3.5, "test_perplexity": 40.0},
            "baselines": {"base_model": {"test_bits_per_byte": 4.25, "test_perplexity": 90.5}},
        },
    }
    card = modelcard.render(causal, "tiny-causal-lm/1", metrics, SAMPLES, LINEAGE)
    assert "| **this model** | 3.5000 | 40.0000 |" in card
    assert "| baseline: the pretrained model | 4.2500 | 90.5000 |" in card


def test_a_card_written_at_registration_quotes_only_the_stages_before_it(params, tmp_path):
    """metrics/ still holds the previous run's finetune and evaluate files when pretrain registers a model."""
    for stage, metrics in METRICS.items():
        write_json(tmp_path / "metrics" / f"{stage}.json", metrics)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "samples.txt").write_text(SAMPLES)
    metrics, samples = modelcard.read_inputs(params, tmp_path, upto="pretrain")
    assert set(metrics) == {"clean", "tokenize", "pretrain"} and samples is None
    card = modelcard.render(params, "tiny-base/2", metrics, samples, {**LINEAGE, "decision": {}})
    assert "Not evaluated on the test split yet." in card and "## Sample generations" not in card

    metrics, samples = modelcard.read_inputs(params, tmp_path, upto="evaluate")
    assert set(metrics) == set(METRICS) and samples == SAMPLES


# ---------------------------------------------------------------- after a real run (conftest.served_pipeline)
def read_metrics(workspace, stage: str) -> dict:
    return json.loads((workspace / "metrics" / f"{stage}.json").read_text())


@pytest.mark.slow
def test_every_registered_version_carries_a_true_card(served_pipeline, tmp_path):
    from mlflow.tracking import MlflowClient

    client, workspace = MlflowClient(tracking_uri=served_pipeline["mlflow"]), served_pipeline["workspace"]
    evaluate, pretrain = read_metrics(workspace, "evaluate"), read_metrics(workspace, "pretrain")
    for name in ("tiny-classification", "tiny-base"):
        version = client.get_model_version_by_alias(name, "champion")
        artifact = client.download_artifacts(version.run_id, "model_card.md", str(tmp_path))
        card = open(artifact, encoding="utf-8").read()
        assert version.description == card, "the description is the card"
        assert card.startswith(f"# Model card: {name} v{version.version}")
        assert f"| parameters | {pretrain['parameters']:,} |" in card
        assert (
            f"| {modelcard.num(pretrain['val_bits_per_byte'])} | {modelcard.num(pretrain['val_perplexity'])} |" in card
        )
        assert f"| {modelcard.num(evaluate['lm']['test_bits_per_byte'])} |" in card

    card = client.get_model_version_by_alias("tiny-classification", "champion").description
    task, majority = evaluate["task"], evaluate["baselines"]["majority"]
    assert f"| **this model** | {modelcard.num(task['accuracy'])} | {modelcard.num(task['macro_f1'])} |" in card
    assert (
        f"| baseline: majority class | {modelcard.num(majority['accuracy'])} | {modelcard.num(majority['macro_f1'])} |"
        in card
    )
    assert "Decision: **promoted**: first model: there was no champion." in card  # written after promotion
    assert served_pipeline["flow_run_id"] in card


@pytest.mark.slow
def test_prefect_shows_the_card_of_the_candidate(served_pipeline):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: served_pipeline["api"]}), get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmline-model-card"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[served_pipeline["flow_run_id"]])),
        )
    champion = MlflowClient(tracking_uri=served_pipeline["mlflow"]).get_model_version_by_alias(
        "tiny-classification", "champion"
    )
    assert artifact.data == champion.description


@pytest.mark.slow
def test_mlflow_has_the_plots_as_images(served_pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=served_pipeline["mlflow"])
    for stage, image in (
        ("clean", "clean_drops.png"),
        ("pretrain", "pretrain_loss.png"),
        ("finetune", "finetune_loss.png"),
        ("evaluate", "confusion.png"),
    ):
        run_id = read_metrics(served_pipeline["workspace"], stage)["mlflow_run_id"]
        files = {f.path: f.file_size for f in client.list_artifacts(run_id, "plots")}
        assert files.get(f"plots/{image}", 0) > 5_000, (stage, files)


@pytest.mark.slow
def test_dvc_plots_show_draws_every_plot(served_pipeline):
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--json"],
        cwd=served_pipeline["workspace"],
        capture_output=True,
        text=True,
        check=True,
    )
    shown = json.loads(out.stdout)
    assert not shown.get("errors"), shown["errors"]
    plots = {name: entries[0]["content"] for name, entries in shown["data"].items()}
    assert set(plots) == {
        "pretrain loss",
        "finetune loss",
        "cleaning drops per source and rule",
        "test confusion matrix",
    }
    for name in ("pretrain loss", "finetune loss"):
        values = plots[name]["data"]["values"]
        assert {v["field"] for v in values} == {"train_loss", "val_loss"}, name
        assert plots[name]["transform"][0]["filter"], "blank val_loss cells are filtered out, not drawn as 0"
    evaluate = read_metrics(served_pipeline["workspace"], "evaluate")
    assert len(plots["test confusion matrix"]["data"]["values"]) == evaluate["task"]["test_examples"]
