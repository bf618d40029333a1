"""Model commands: the MLflow registry (`models`, `promote`, `rollback`, `lineage`) and using a model
(`generate`, `classify`, `evaluate-text`).

torch, transformers and the stage modules that import them are imported inside the commands that
load a model: together they take about ten seconds to import, which every `lmline` call would pay.
"""

from __future__ import annotations

import getpass
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows import promotion
from lmline import config
from lmline.cli.root import ParamsOpt, app
from lmline.errors import LmlineError
from lmline.stages import ModelKind, model_name
from lmline.tracking import lineage as tracking_lineage
from lmline.tracking import registry, store

KEY_METRIC_TAGS = (  # the registry tags `lmline models` shows beside each version
    "metric.val_bits_per_byte",
    "metric.val_loss",
    "metric.val_accuracy",
    "metric.val_macro_f1",
    "lmline.eval.metric",
    "lmline.decision",
)


def default_model(params: config.Params, kind: ModelKind) -> str:
    """The registered model's champion: the base LM or the fine-tuned task model."""
    return f"models:/{model_name(params.project.name, kind, params.finetune.task)}@champion"


@app.command("evaluate-text")
def evaluate_text(
    file: Annotated[Path, typer.Argument(help="a UTF-8 text file")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="model dir, or models:/NAME@ALIAS | models:/NAME/VERSION")
    ],
    batch_size: Annotated[int, typer.Option(min=1, help="windows per forward pass")] = 16,
) -> None:
    """Bits per byte and perplexity of a causal LM on a text file (non-overlapping context windows)."""
    from tasks import evaluate

    with registry.local_model(model) as model_dir:
        result = evaluate.evaluate_text(model_dir, file, batch_size)
    typer.echo(json.dumps({**result, "model": model}, indent=2, sort_keys=True))


@app.command()
def models(params: ParamsOpt = Path("params.yaml")) -> None:
    """Registered models and versions with aliases, key metrics and creation time."""
    cfg = config.load(params, None)
    store.setup(cfg)
    rows = registry.list_models(prefix=cfg.project.name)
    if not rows:
        typer.echo(f"no registered models named {cfg.project.name}-* at {store.tracking_uri()}")
        return
    for r in rows:
        when = datetime.fromtimestamp(r["created"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
        shown = [f"{k.removeprefix('metric.')}={v}" for k, v in sorted(r["tags"].items()) if k in KEY_METRIC_TAGS]
        aliases = ",".join(f"@{a}" for a in r["aliases"]) or "-"
        typer.echo(f"{r['name']:<28} v{r['version']:<4} {aliases:<22} {when}  {' '.join(shown)}")


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[int, typer.Argument(help="version to make champion")],
    why: Annotated[str, typer.Option(help="reason, recorded on the version")] = "manual promotion",
) -> None:
    """Move the champion alias to VERSION by hand (who and why are recorded as tags)."""
    # An unknown model or version fails here, in one line, before a Prefect server is needed for the slot.
    registry.version_tags(name, version)
    with promotion.promotion_slot():  # the slot the automatic gate takes: never two moves at once
        result = promotion.manual_promote(name, version, who=getpass.getuser(), why=why)  # MLflow errors: OneLineErrors
    typer.echo(json.dumps(result))


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="registered model name")]) -> None:
    """Move champion back to the version it replaced; the automatic gate never promotes that version again
    (only `lmline promote` can)."""
    with promotion.promotion_slot():  # the slot the automatic gate takes: never two moves at once
        result = promotion.rollback(name, who=getpass.getuser())
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
    """Generate a continuation of PROMPT with a causal LM (sampling settings default to params' evaluate).
    Always samples: --temperature must be above 0 (as evaluate.temperature); a small one is near-greedy."""
    cfg = config.load(params, None)
    check_sampling_options(max_new_tokens, temperature, seed)  # before loading a model
    from tasks import evaluate, models

    with registry.local_model(model or default_model(cfg, "base")) as model_dir:
        lm, tokenizer = models.load_causal_lm(model_dir)
    overrides = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    sampling = cfg.evaluate.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    [text] = evaluate.generate_samples(lm, tokenizer, [prompt], sampling, cfg.project.seed if seed is None else seed)
    typer.echo(text)


def check_sampling_options(max_new_tokens: int | None, temperature: float | None, seed: int | None) -> None:
    """The options' limits, said in one line (typer's own range errors are a multi-line box)."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise LmlineError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise LmlineError(f"--temperature must be above 0 (got {temperature}); a small one, e.g. 0.05, is near-greedy")
    if seed is not None and not 0 <= seed < 2**32:
        raise LmlineError(f"--seed must be between 0 and {2**32 - 1} (got {seed})")


@app.command()
def classify(
    text: Annotated[str, typer.Argument()],
    model: Annotated[
        Optional[str], typer.Option(help="models:/ URI or local dir (default: task model @champion)")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Classify TEXT with the fine-tuned classifier; prints the label and class probabilities."""
    import torch

    from tasks import models

    cfg = config.load(params, None)
    with registry.local_model(model or default_model(cfg, "task")) as model_dir:
        clf, tok = models.load_classifier(model_dir)
    # encoded exactly as finetune encoded its training examples (bos + text + eos, capped)
    max_length = min(cfg.finetune.max_length, models.context_length(clf.config))
    ids = torch.tensor(models.classification_ids(tok, [text], max_length), device=clf.device)
    with torch.no_grad():
        probs = clf(input_ids=ids).logits.softmax(-1)[0]
    labels = {clf.config.id2label[i]: round(float(p), 4) for i, p in enumerate(probs)}
    typer.echo(json.dumps({"label": max(labels, key=labels.get), "probabilities": labels}))


@app.command()
def lineage(model_uri: Annotated[str, typer.Argument(help="models:/name/version or models:/name@alias")]) -> None:
    """What produced a model version: git commit, DVC hashes, params, Prefect flow run, MLflow runs."""
    info = tracking_lineage.lineage(model_uri)
    typer.echo(json.dumps(info, indent=2, sort_keys=True))
