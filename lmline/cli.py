"""The `lmline` command. Thin: it loads params, calls the stage's run(), and hands results to tracking.

`lmline stage NAME` is what dvc.yaml's `cmd` runs; the Prefect flow runs the DVC stages, so every
path into a stage goes through `run_stage` below.
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import lmline  # noqa: F401  (sets the offline switches before any library import)
from lmline import config
from lmline.errors import LmlineError
from lmline.io import write_json

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and ship small language models.")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override, e.g. pretrain.lr=1e-3")]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def load_params(params: Path, overrides: list[str] | None) -> config.Params:
    try:
        return config.load(params, overrides)
    except LmlineError as exc:
        fail(str(exc))


def run_stage(name: str, params: config.Params, root: Path | None = None) -> dict:
    """Run one stage's run() with tracking around it; write metrics/<stage>.json; return metrics."""
    from lmline import tracking

    module = importlib.import_module(f"tasks.{name}")
    inputs, outputs = config.stage_io(params, name)
    with tracking.stage_run(name, params, root) as tracked:
        started = time.perf_counter()
        metrics = module.run(params, inputs, outputs)
        metrics["stage_seconds"] = round(time.perf_counter() - started, 3)
        # Which MLflow run produced these numbers: a later cached run of the stage links back to it.
        metrics["mlflow_run_id"] = tracked.run_id
        write_json(config.metrics_path(params, name), metrics)
        tracked.log_metrics(metrics)
        tracked.log_artifact(config.metrics_path(params, name), "metrics")
        for key, path in outputs.items():
            # small outputs go to MLflow as artifacts; big data and models are DVC's job
            if path.is_file() and path.stat().st_size < 5_000_000:
                tracked.log_artifact(path, key)
        tracked.log_stage_outputs(name, params, inputs, outputs, metrics)
    return metrics


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="warnings and errors only")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic", "urllib3", "filelock", "mlflow"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(config.STAGES)}")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one pipeline stage (what dvc.yaml's cmd calls)."""
    if name not in config.STAGES:
        fail(f"unknown stage {name!r} (stages: {', '.join(config.STAGES)})")
    cfg = load_params(params, set_)
    try:
        metrics = run_stage(name, cfg)
    except LmlineError as exc:
        fail(str(exc))
    typer.echo(json.dumps({name: metrics}, indent=2, sort_keys=True))


@app.command()
def sources(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """List the configured sources with their sizes."""
    from tasks import ingest

    cfg = load_params(params, set_)
    try:
        rows = ingest.describe_sources(cfg)
    except LmlineError as exc:
        fail(str(exc))
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['type']:<10} {r['role']:<8} {r['size']:>12}  {r['where']}")


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    stages: Annotated[Optional[list[str]], typer.Option("--stage", help="run only these stages")] = None,
    force: Annotated[bool, typer.Option(help="re-run stages even if DVC has them cached")] = False,
    promote: Annotated[bool, typer.Option(help="promote the candidate if it beats the champion")] = True,
) -> None:
    """Run the pipeline as the Prefect `retrain` flow (ephemeral Prefect unless PREFECT_API_URL is set)."""
    load_params(params, set_)  # fail on bad params before Prefect or any stage starts
    from flows.retrain import retrain

    try:
        summary = retrain(overrides=set_, stages=stages, promote=promote, force=force, params_file=str(params))
    except LmlineError as exc:
        fail(str(exc))
    print_summary(summary)


def print_summary(summary: dict) -> None:
    """The compact end-of-run table: what ran, the headline numbers, the registry, where to look."""
    from lmline import tracking

    typer.echo("\nlmline retrain summary")
    for s in summary["stages"]:
        typer.echo(f"  {s['stage']:<9} {s['status']:<7} {s['seconds']:>7.1f}s")
    by_stage = {s["stage"]: s["metrics"] for s in summary["stages"]}
    flat = {k: tracking.numeric(v) for k, v in by_stage.items()}
    pre, ev = flat.get("pretrain", {}), flat.get("evaluate", {})
    if "val_bits_per_byte" in pre:
        typer.echo(f"  val bits/byte (pretrain): {pre['val_bits_per_byte']:.4f}")
    if ev:
        acc = ev.get("task.accuracy")
        maj = ev.get("baselines.majority.accuracy")
        tfidf = ev.get("baselines.tfidf_logreg.accuracy")
        if acc is not None:
            typer.echo(f"  test accuracy: model {acc:.4f} | majority {maj or float('nan'):.4f} | tf-idf+logreg {tfidf or float('nan'):.4f}")
        if "lm.test_bits_per_byte" in ev:
            typer.echo(f"  test bits/byte (base LM): {ev['lm.test_bits_per_byte']:.4f}")
    p = summary.get("promotion") or {}
    if "model" in p:
        verdict = "promoted to @champion" if p["promoted"] else "kept as @challenger" if p["champion_after"] != p["candidate"] else "already @champion"
        typer.echo(f"  registry: {p['model']} v{p['candidate']} {verdict} ({p['reason']})")
    elif p:
        typer.echo(f"  registry: {p.get('reason')}")
    typer.echo(f"  MLflow UI:  mlflow ui --backend-store-uri {tracking.tracking_uri()}  (parent run {summary['mlflow_parent_run_id']})")
    typer.echo("  Prefect UI: prefect server start, then open http://127.0.0.1:4200/runs")


@app.command("evaluate-text")
def evaluate_text(
    file: Annotated[Path, typer.Argument(help="a UTF-8 text file")],
    model: Annotated[str, typer.Option("--model", "-m", help="model dir, or models:/NAME@ALIAS | models:/NAME/VERSION")],
    batch_size: Annotated[int, typer.Option(min=1, help="windows per forward pass")] = 16,
) -> None:
    """Bits per byte and perplexity of a causal LM on a text file (non-overlapping context windows)."""
    from lmline import tracking
    from tasks import evaluate

    try:
        result = evaluate.evaluate_text(tracking.resolve_model_uri(model), file, batch_size)
    except LmlineError as exc:
        fail(str(exc))
    typer.echo(json.dumps({**result, "model": model}, indent=2, sort_keys=True))


# ---------------------------------------------------------------- models (MLflow registry)
def default_model(params: config.Params, kind: str) -> str:
    name = f"{params.project.name}-base" if kind == "lm" else f"{params.project.name}-{params.finetune.task}"
    return f"models:/{name}@champion"


@app.command()
def models(params: ParamsOpt = Path("params.yaml")) -> None:
    """Registered models and versions with aliases, key metrics and creation time."""
    from datetime import datetime, timezone

    from lmline import tracking

    cfg = load_params(params, None)
    tracking.setup(cfg)
    rows = tracking.list_models(prefix=cfg.project.name)
    if not rows:
        typer.echo(f"no registered models named {cfg.project.name}-* at {tracking.tracking_uri()}")
        return
    for r in rows:
        when = datetime.fromtimestamp(r["created"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
        shown = [f"{k.removeprefix('metric.')}={v}" for k, v in sorted(r["tags"].items()) if k in KEY_METRIC_TAGS]
        aliases = ",".join(f"@{a}" for a in r["aliases"]) or "-"
        typer.echo(f"{r['name']:<28} v{r['version']:<4} {aliases:<22} {when}  {' '.join(shown)}")


KEY_METRIC_TAGS = (
    "metric.val_bits_per_byte",
    "metric.val_loss",
    "metric.val_accuracy",
    "metric.val_macro_f1",
    "lmline.eval.metric",
    "lmline.decision",
)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[int, typer.Argument(help="version to make champion")],
    why: Annotated[str, typer.Option(help="reason, recorded on the version")] = "manual promotion",
) -> None:
    """Move the champion alias to VERSION by hand (who and why are recorded as tags)."""
    import getpass

    from flows import promotion

    try:
        result = promotion.manual_promote(name, version, who=getpass.getuser(), why=why)
    except LmlineError as exc:
        fail(str(exc))
    except Exception as exc:  # MLflow's own errors: unknown model or version
        fail(f"{name} v{version}: {str(exc).splitlines()[0]}")
    typer.echo(json.dumps(result))


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="registered model name")]) -> None:
    """Move champion back to the version it replaced."""
    import getpass

    from flows import promotion

    try:
        result = promotion.rollback(name, who=getpass.getuser())
    except LmlineError as exc:
        fail(str(exc))
    typer.echo(json.dumps(result))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument()],
    model: Annotated[Optional[str], typer.Option(help="models:/ URI or local dir (default: base @champion)")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option()] = None,
    temperature: Annotated[Optional[float], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Generate a continuation of PROMPT with a causal LM (sampling settings default to params' evaluate)."""
    from lmline import tracking
    from tasks import evaluate

    cfg = load_params(params, None)
    try:
        lm, tokenizer = evaluate.load_causal_lm(tracking.resolve_model_uri(model or default_model(cfg, "lm")))
    except LmlineError as exc:
        fail(str(exc))
    overrides = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    sampling = cfg.evaluate.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    [text] = evaluate.generate_samples(lm, tokenizer, [prompt], sampling, cfg.project.seed if seed is None else seed)
    typer.echo(text)


@app.command()
def classify(
    text: Annotated[str, typer.Argument()],
    model: Annotated[Optional[str], typer.Option(help="models:/ URI or local dir (default: task model @champion)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Classify TEXT with the fine-tuned classifier; prints the label and class probabilities."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmline import tracking
    from tasks import finetune

    cfg = load_params(params, None)
    try:
        local = tracking.resolve_model_uri(model or default_model(cfg, "task"))
    except LmlineError as exc:
        fail(str(exc))
    tok = AutoTokenizer.from_pretrained(local)
    clf = AutoModelForSequenceClassification.from_pretrained(local).eval()
    # encoded exactly as finetune encoded its training examples (bos + text + eos, capped)
    max_length = min(cfg.finetune.max_length, finetune.context_length(clf.config))
    ids = torch.tensor(finetune.classification_ids(tok, [text], max_length))
    with torch.no_grad():
        probs = clf(input_ids=ids).logits.softmax(-1)[0]
    labels = {clf.config.id2label[i]: round(float(p), 4) for i, p in enumerate(probs)}
    typer.echo(json.dumps({"label": max(labels, key=labels.get), "probabilities": labels}))


@app.command()
def lineage(model_uri: Annotated[str, typer.Argument(help="models:/name/version or models:/name@alias")]) -> None:
    """What produced a model version: git commit, DVC hashes, params, Prefect flow run, MLflow runs."""
    from lmline import tracking

    try:
        info = tracking.lineage(model_uri)
    except LmlineError as exc:
        fail(str(exc))
    typer.echo(json.dumps(info, indent=2, sort_keys=True))


if __name__ == "__main__":
    app()
