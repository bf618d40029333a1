"""The run summary `lmline run` prints: what ran, the headline numbers, the registry, where to look.

Prefect is imported inside the functions that need it: it adds about a second to every `lmline`
call, and by the time a summary prints, the flow has loaded it anyway.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import typer

from lmline.stages import GATE_STAGE
from lmline.tracking import lineage, runs, store


def print_summary(summary: dict) -> None:
    """The compact end-of-run table: what ran, the headline numbers, the registry, where to look."""
    from flows.retrain import StageResult, key_metrics

    stages = summary["stages"]
    ran = sum(s["status"] == "ran" for s in stages)
    flow = f", flow {summary['flow_seconds']:.1f} s" if "flow_seconds" in summary else ""
    typer.echo(
        f"\nlmline retrain: {ran} of {len(stages)} stages ran, {len(stages) - ran} cached by DVC; "
        f"stages {sum(s['seconds'] for s in stages):.1f} s{flow}\n"
    )
    rows = [[s["stage"], s["status"], f"{s['seconds']:.1f}s", key_metrics(StageResult(**s))] for s in stages]
    echo_table(["stage", "status", "time", "key numbers"], rows)

    ev = runs.numeric(next((s["metrics"] for s in stages if s["stage"] == GATE_STAGE), {}))
    p = summary.get("promotion") or {}
    if "task.accuracy" in ev:
        typer.echo("")
        name = f"{p['model']} v{p['candidate']}" if "model" in p else "fine-tuned model"
        echo_table(
            ["test split", "accuracy", "macro-F1"],
            [
                [label, f"{ev[f'{key}.accuracy']:.4f}", f"{ev[f'{key}.macro_f1']:.4f}"]
                for label, key in (
                    (name, "task"),
                    ("baseline: majority class", "baselines.majority"),
                    ("baseline: TF-IDF + logistic regression", "baselines.tfidf_logreg"),
                )
                if f"{key}.accuracy" in ev
            ],
        )
    if "task.test_bits_per_byte" in ev:  # causal-lm: the tuned LM against the pretrained one, on the task's text
        typer.echo("")
        name = f"{p['model']} v{p['candidate']}" if "model" in p else "fine-tuned model"
        echo_table(
            ["finetune test text", "bits/byte", "perplexity"],
            [
                [label, f"{ev[f'{key}.test_bits_per_byte']:.4f}", f"{ev[f'{key}.test_perplexity']:.4f}"]
                for label, key in ((name, "task"), ("baseline: the pretrained model", "baselines.base_model"))
                if f"{key}.test_bits_per_byte" in ev and f"{key}.test_perplexity" in ev
            ],
        )
    if "lm.test_bits_per_byte" in ev:
        typer.echo(f"base LM test bits/byte: {ev['lm.test_bits_per_byte']:.4f}")

    typer.echo("")
    if "model" in p:
        verdict = (
            "promoted to @champion"
            if p["promoted"]
            else "already @champion"
            if p["champion_after"] == p["candidate"]
            else "kept as @challenger"
            if p.get("challenger")
            else "not promoted"
        )
        typer.echo(f"registry: {p['model']} v{p['candidate']} {verdict} ({p['reason']})")
    elif p:
        typer.echo(f"registry: {p.get('reason')}")
    for what, where in ui_links(summary, p.get("model")):
        typer.echo(f"{what:<8} {where}")


def echo_table(header: list[str] | None, rows: list[list[str]]) -> None:
    """Left-aligned columns two spaces apart: readable in a terminal and in a CI log alike."""
    lines = [header, *rows] if header else rows
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(lines[0]))] if lines else []
    for r in lines:
        typer.echo("  ".join(str(cell).ljust(w) for cell, w in zip(r, widths)).rstrip())


def ui_links(summary: dict, model: str | None) -> list[tuple[str, str]]:
    """Where to see this run: direct links when servers are configured, else the commands that start them."""
    from prefect.settings import PREFECT_UI_URL

    uri, parent = store.tracking_uri(), summary["mlflow_parent_run_id"]
    if uri.startswith("http"):
        mlflow_link = f"{uri.rstrip('/')}/#/models/{model}" if model else uri
    else:
        mlflow_link = f"{tool('mlflow')} ui --backend-store-uri {uri}, then http://127.0.0.1:5000" + (
            f"/#/models/{model}" if model else ""
        )
    prefect_link = lineage.flow_run_link(summary["flow_run_id"], PREFECT_UI_URL.value(), tool("prefect"))
    return [
        ("MLflow", f"{mlflow_link}  (parent run {parent})"),
        ("Prefect", prefect_link),
        ("plots", f"{tool('dvc')} plots show, then open dvc_plots/index.html"),
    ]


def tool(name: str) -> str:
    """How to call a tool of this environment from here: `.venv/bin/mlflow` when not on PATH as such."""
    path = Path(sys.executable).parent / name
    if shutil.which(name) == str(path):
        return name
    return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)
