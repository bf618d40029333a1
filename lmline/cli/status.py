"""`lmline status`: where the workspace stands. Stages up to date or not (DVC), champion and challenger
(the MLflow registry), the last flow runs (Prefect, when a server is configured and answers).

Prefect's modules are imported inside its query: they add a second to every `lmline` call, and only
`status` (and `run`, which loads them anyway) needs them.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
import yaml

from lmline import config
from lmline.cli.root import ParamsOpt, app
from lmline.cli.summary import echo_table
from lmline.stages import model_name
from lmline.tracking import registry, store
from lmline.vcs import stage_changes

STATUS_TAGS = {  # registry tags worth a glance, and how to call them
    "lmline.eval.metric": "test {metric}",
    "lmline.eval.bits_per_byte": "base test bits/byte",
    "metric.val_macro_f1": "val macro-F1",
    "metric.val_accuracy": "val accuracy",
    "metric.val_bits_per_byte": "val bits/byte",
}


@app.command()
def status(
    params: ParamsOpt = Path("params.yaml"),
    runs: Annotated[int, typer.Option(min=0, help="how many recent flow runs to list (needs PREFECT_API_URL)")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Where the workspace stands: stages up to date (DVC), champion and challenger (MLflow), last flow runs
    (Prefect)."""
    cfg = config.load(params, None)
    report = {
        "pipeline": pipeline_status(Path.cwd()),
        "registry": registry_status(cfg),
        "flow_runs": flow_run_status(runs),
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    typer.echo("Pipeline (dvc status)")
    echo_table(
        ["  stage", "state", "detail"],
        [[f"  {r['stage']}", r["state"], r["detail"]] for r in report["pipeline"]["stages"]],
    )
    for section, title, where in (("registry", "Registry", "tracking_uri"), ("flow_runs", "Flow runs", "api")):
        part = report[section]
        typer.echo(f"\n{title} ({part[where] or 'PREFECT_API_URL not set'})")
        rows = part["models"] if section == "registry" else part["runs"]
        if section == "registry":
            shown = [
                [
                    f"  {r['model']}",
                    f"@{r['alias']}",
                    f"v{r['version']}",
                    r["created"],
                    ", ".join(f"{k} {v}" for k, v in r["metrics"].items()),
                ]
                for r in rows
            ]
        else:
            shown = [[f"  {r['started']}", r["flow"], r["name"], r["state"], r["duration"], r["url"]] for r in rows]
        echo_table(None, shown)
        if part.get("note"):
            typer.echo(f"  {part['note']}")


# ---------------------------------------------------------------- DVC
def pipeline_status(root: Path) -> dict:
    """Each dvc.yaml stage: up to date, changed (and what changed) or never run, from `dvc status`."""
    lock = root / "dvc.lock"
    locked = set((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.exists() else set()
    found = stage_changes(root)
    if found is None:
        return {"stages": [], "note": f"{root} is not a DVC workspace (run lmline from the repository root)"}
    names, changes = found
    stages, first_stale = [], None
    for name in names:
        if name not in locked:
            state, detail = "never run", ""
        elif name in changes:
            state, detail = "changed", describe_changes(changes[name])
        else:
            state, detail = "up to date", f"may re-run after {first_stale}" if first_stale else ""
        if state != "up to date" and first_stale is None:
            first_stale = name
        stages.append({"stage": name, "state": state, "detail": detail})
    return {"stages": stages}


def describe_changes(entries: list) -> str:
    """`dvc status` entries -> "params pretrain.lr modified; deps data/clean modified"."""
    parts = []
    for entry in entries:
        if isinstance(entry, str):  # e.g. "changed command"
            parts.append(entry)
            continue
        for kind, items in entry.items():
            label = kind.removeprefix("changed ")
            for path, change in items.items():
                if isinstance(change, dict):  # a params file: {key: change}
                    parts += [f"params {key} {what}" for key, what in change.items()]
                else:
                    parts.append(f"{label} {path} {change}")
    return "; ".join(parts)


# ---------------------------------------------------------------- MLflow registry
def registry_status(cfg: config.Params) -> dict:
    """Champion and challenger of the task model and the base LM, with their key metrics."""
    uri = store.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return {"tracking_uri": uri, "models": [], "note": "no MLflow store here yet: `lmline run` creates it"}
    models = []
    for name in (model_name(cfg.project.name, kind, cfg.finetune.task) for kind in ("task", "base")):
        for alias in ("champion", "challenger"):
            mv = registry.alias_version(name, alias)
            if mv is None:
                continue
            tags = dict(mv.tags)
            metric = tags.get("lmline.eval.metric_name", cfg.promote.resolved(cfg.finetune.task).metric)
            models.append(
                {
                    "model": name,
                    "alias": alias,
                    "version": int(mv.version),
                    "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).strftime(
                        "%Y-%m-%d %H:%M"
                    ),
                    "metrics": {
                        label.format(metric=metric): f"{float(tags[tag]):.4f}"
                        for tag, label in STATUS_TAGS.items()
                        if tags.get(tag)
                    },
                }
            )
    note = "" if models else f"no champion yet for {cfg.project.name}-* (run `lmline run`)"
    return {"tracking_uri": uri, "models": models, "note": note}


# ---------------------------------------------------------------- Prefect
def flow_run_status(limit: int) -> dict:
    """The last flow runs, when a Prefect server is configured and answers; never starts one."""
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not api:
        return {"api": None, "runs": [], "note": "set PREFECT_API_URL to a running `prefect server` to list flow runs"}
    # a quick probe (3 s): Prefect's own client retries for a long while before giving up
    if reason := store.health_error(api, 3):
        return {"api": api, "runs": [], "note": f"the Prefect API does not answer ({reason})"}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=limit)
        flows = {fid: client.read_flow(fid).name for fid in {r.flow_id for r in found}}
    runs = [
        {
            "started": r.start_time.strftime("%Y-%m-%d %H:%M") if r.start_time else "not started",
            "flow": flows[r.flow_id],
            "name": r.name,
            "state": r.state.name if r.state else "unknown",
            "duration": f"{r.total_run_time.total_seconds():.0f}s",
            "url": f"{api.removesuffix('/api')}/runs/flow-run/{r.id}",
            "id": str(r.id),
        }
        for r in found
    ]
    return {"api": api, "runs": runs, "note": "" if runs else "no flow runs yet"}
