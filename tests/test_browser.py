"""The Prefect and MLflow UIs in a real headless Chromium, after a tiny `lmline run` against a real
`prefect server` and `mlflow server` (tests/conftest.py `served_pipeline`): the flow run is Completed
with a task run per stage and the model card among its artifacts, and the registered model shows its
version with the `champion` alias and the card as the version's description. The page
`dvc plots show` writes draws its loss curves from disk with every network request refused.

Needs Debian's chromium and the playwright package (.ci/run installs both; never `playwright install`,
which downloads a browser). Screenshots land in test-output/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-output"
STAGE_NAMES = ["ingest", "clean", "tokenize", "pretrain", "finetune", "evaluate"]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see .ci/run)")
    if not CHROMIUM.exists():
        pytest.skip("apt-get install chromium chromium-driver (see .ci/run)")
    SHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


def open_page(browser, url: str):
    # A new page per URL: both UIs are single-page apps, and waiting for network idle on a hash
    # navigation hangs; the tests wait for the text they need instead.
    page = browser.new_page()
    page.goto(url, wait_until="domcontentloaded")
    return page


def wait_for_text(page, *texts: str, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(
        "want => want.every(t => document.body.innerText.includes(t))", arg=list(texts), timeout=timeout_ms
    )


def shoot(page, name: str) -> None:
    path = SHOTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, f"{path}: this small, it is a blank page"


def test_prefect_shows_the_flow_run_its_stages_and_the_model_card(browser, served_pipeline):
    page = open_page(browser, f"{served_pipeline['ui']}/runs/flow-run/{served_pipeline['flow_run_id']}")
    wait_for_text(page, "retrain", "Completed")
    page.click("li.p-tab#task-runs")  # tabs must be clicked: a ?tab= query is reset
    wait_for_text(page, *STAGE_NAMES)
    shoot(page, "prefect-flow-run-task-runs.png")
    body = page.inner_text("body")
    assert "Completed" in body and all(stage in body for stage in STAGE_NAMES)

    page.click("li.p-tab#artifacts")
    wait_for_text(page, "lmline-model-card", "lmline-stages", "lmline-summary")
    shoot(page, "prefect-flow-run-artifacts.png")
    page.close()


def test_mlflow_shows_the_champion_version_and_its_model_card(browser, served_pipeline):
    model = served_pipeline["model"]
    page = open_page(browser, f"{served_pipeline['mlflow']}/#/models/{model}")
    wait_for_text(page, model, "Version 1", "champion")
    shoot(page, "mlflow-registered-model.png")
    page.close()

    page = open_page(browser, f"{served_pipeline['mlflow']}/#/models/{model}/versions/1")
    wait_for_text(page, "champion", f"Model card: {model} v1", "Compared with the champion", "Intended use")
    shoot(page, "mlflow-model-version-card.png")
    page.close()


# ---------------------------------------------------------------- the DVC plots page, offline
PLOT_DIVS = ["pretrain_loss", "finetune_loss", "cleaning_drops_per_source_and_rule", "test_confusion_matrix"]
LOSS_CURVES = {"pretrain_loss": "plots/pretrain_loss.csv", "finetune_loss": "plots/finetune_loss.csv"}  # div: its data


def repo_plots_template() -> Path:
    """The html template the repo's .dvc/config names, resolved as DVC does (relative to .dvc/)."""
    import subprocess
    import sys

    configured = subprocess.run(
        [sys.executable, "-m", "dvc", "config", "plots.html_template"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    template = (REPO / ".dvc" / configured).resolve()
    assert template.is_file(), f"{template}: missing; `make install` builds it (Makefile: PLOTS_TEMPLATE)"
    return template


def test_dvc_plots_page_draws_the_loss_curves_with_no_network(browser, served_pipeline):
    """`dvc plots show` with the repo's plots config, opened from disk with every non-file request
    refused: the page must need nothing from a CDN (the machines this project targets are offline)."""
    import subprocess
    import sys
    import time

    workspace = served_pipeline["workspace"]
    # config.local (git-ignored by DVC) so the shared workspace's git tree stays as other tests expect it
    subprocess.run(
        [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", str(repo_plots_template())],
        cwd=workspace,
        check=True,
        capture_output=True,
    )
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show"], cwd=workspace, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    page_url = shown.stdout.strip().splitlines()[-1]
    assert page_url.startswith("file://") and page_url.endswith("dvc_plots/index.html"), shown.stdout

    page = browser.new_page()
    refused, errors = [], []
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith("file://")
            else (refused.append(route.request.url), route.abort())
        ),
    )
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    started = time.perf_counter()
    page.goto(page_url, wait_until="load")
    # vega-embed draws each plot as an <svg> in the plot's div (DVC's page leaves these divs empty offline)
    page.wait_for_function(
        "ids => ids.every(id => document.querySelector(`#${id} svg .mark-group`))", arg=PLOT_DIVS, timeout=30_000
    )
    print(f"\nplots page drawn {time.perf_counter() - started:.2f}s after it was opened")  # reported, never asserted
    for plot, data in LOSS_CURVES.items():
        # a line per series, and a point per measured cell (blank val_loss cells are skipped, not drawn as 0)
        lines = page.eval_on_selector_all(f"#{plot} svg .mark-line path", "paths => paths.map(p => p.ariaLabel)")
        assert sorted(label.split("field: ")[1].split(";")[0] for label in lines) == ["train_loss", "val_loss"], lines
        points = page.eval_on_selector_all(f"#{plot} svg .mark-symbol.role-mark path", "paths => paths.length")
        with open(workspace / data, newline="") as fh:
            measured = sum(bool(row[field]) for row in csv.DictReader(fh) for field in ("train_loss", "val_loss"))
        assert points == measured > 0, (plot, points, measured)
    shoot(page, "dvc-plots-offline.png")
    assert not errors, errors
    assert not refused, f"the page asked the network for {refused}"
    page.close()
