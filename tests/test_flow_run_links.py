"""Where to see a pipeline's Prefect flow run, in every mode: a run made in ephemeral mode (no Prefect
server) has no UI address, and Prefect's own `flow_run.ui_url` is then "None/flow-runs/...". Lineage,
the model card and the end-of-run summary must give a real link or the way to get one, never that.
Real MLflow store (SQLite in the workspace) and real Prefect settings; the flow itself writes the tag
with the same function (tests/test_flow.py checks the served case end to end)."""

from __future__ import annotations

import json

import mlflow
import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
from typer.testing import CliRunner

from lmline import modelcard
from lmline.cli import app
from lmline.cli.summary import ui_links
from lmline.tracking import lineage
from lmline.tracking import store as tracking_store

FLOW_RUN = "0b7d3c1e-5f0a-4f55-9a61-2d3f0c8e9a10"


def url_fields(info: dict) -> dict[str, str]:
    """Every field of a lineage record that names where to see something, at any depth."""
    found = {}
    for key, value in info.items():
        if isinstance(value, dict):
            found.update({f"{key}.{k}": v for k, v in url_fields(value).items()})
        elif "url" in key.lower():
            found[key] = value
    return found


def ephemeral_ui_url() -> str | None:
    """PREFECT_UI_URL as a flow made without a server sees it (no PREFECT_API_URL anywhere)."""
    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}):
        return PREFECT_UI_URL.value()


def register_pipeline_version(model: str, flow_run_url: str) -> str:
    """A registered version produced by a stage run nested in a pipeline parent run carrying the
    Prefect tags flows/retrain.py writes: the shape `lmline lineage` reads."""
    client = mlflow.MlflowClient()
    experiment = mlflow.set_experiment("links").experiment_id
    parent = client.create_run(
        experiment,
        tags={
            "prefect.flow_run_id": FLOW_RUN,
            "prefect.flow_run_name": "neat-goldfish",
            "prefect.flow_run_url": flow_run_url,
        },
    ).info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "lmline.stage": "finetune"}).info.run_id
    if not client.search_registered_models(f"name = '{model}'"):
        client.create_registered_model(model)
    return client.create_model_version(model, f"runs:/{child}/model", run_id=child).version


@pytest.fixture
def store(workspace):
    mlflow.set_tracking_uri(tracking_store.tracking_uri(workspace))
    return workspace


def test_ephemeral_runs_point_at_prefect_server_start_never_at_none(store):
    assert ephemeral_ui_url() is None, "setup: without a server Prefect has no UI address"
    versions = {
        "as retrain tags it now": register_pipeline_version(
            "links", lineage.flow_run_link(FLOW_RUN, ephemeral_ui_url())
        ),
        "as retrain tagged it before": register_pipeline_version("links", f"None/flow-runs/flow-run/{FLOW_RUN}"),
    }
    for how, version in versions.items():
        shown = CliRunner().invoke(app, ["lineage", f"models:/links/{version}"])
        assert shown.exit_code == 0, shown.output
        info = json.loads(shown.stdout)
        links = url_fields(info)
        assert links == {
            "prefect.flow_run_url": f"prefect server start, then http://127.0.0.1:4200/runs/flow-run/{FLOW_RUN}"
        }, how
        card_row = next(row for row in modelcard.lineage_section(info) if row.startswith("| Prefect flow run"))
        assert (
            "None" not in card_row
            and f"prefect server start, then http://127.0.0.1:4200/runs/flow-run/{FLOW_RUN}" in card_row
        ), how

    # the end-of-run summary says the same, through the same function
    summary = {"flow_run_id": FLOW_RUN, "mlflow_parent_run_id": "p"}
    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}):
        prefect = dict(ui_links(summary, "links"))["Prefect"]
    assert (
        prefect.endswith(f"server start, then http://127.0.0.1:4200/runs/flow-run/{FLOW_RUN}") and "None" not in prefect
    )


def test_served_runs_link_to_their_page_on_the_server(store):
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4321/api"}):
        served = lineage.flow_run_link(FLOW_RUN, PREFECT_UI_URL.value())
        prefect = dict(ui_links({"flow_run_id": FLOW_RUN, "mlflow_parent_run_id": "p"}, "links"))["Prefect"]
    assert served == prefect == f"http://127.0.0.1:4321/runs/flow-run/{FLOW_RUN}"
    version = register_pipeline_version("links", served)
    info = lineage.lineage(f"models:/links/{version}")
    assert url_fields(info) == {"prefect.flow_run_url": served}
    assert f"(`{FLOW_RUN}`) {served}" in "\n".join(modelcard.lineage_section(info))
