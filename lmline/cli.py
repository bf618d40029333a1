"""The `lmline` command. Thin: it loads params, calls the stage's run(), and hands results to tracking.

`lmline stage NAME` is what dvc.yaml's `cmd` runs; the Prefect flow runs the DVC stages, so every
path into a stage goes through `run_stage` below.

Errors: commands just raise LmlineError. One handler, in the app's top-level group (OneLineErrors),
prints it as `error: <message>` on one line and exits 1, for every command: under the `lmline`
script (main) and under typer's CliRunner alike, which both run that group.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

import lmline  # noqa: F401  (sets the offline switches before any library import)
from lmline import config
from lmline.errors import LmlineError
from lmline.io import write_json


class OneLineErrors(TyperGroup):
    """Runs the command; the one place a user-facing error becomes `error: <one line>` and exit 1.
    MLflow's own errors (an unknown model or version) are user errors too; anything else is a bug
    and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LmlineError as exc:
            message = str(exc)
        except Exception as exc:
            mlflow_errors = sys.modules.get("mlflow.exceptions")  # loaded if MLflow could have raised it
            if mlflow_errors is None or not isinstance(exc, mlflow_errors.MlflowException):
                raise
            message = exc.message if isinstance(exc.message, str) else str(exc)
        one_line = " ".join(message.splitlines()).strip()  # a message that slipped a newline in stays one line
        typer.echo(f"error: {one_line}", err=True)
        raise typer.Exit(1)


app = typer.Typer(
    cls=OneLineErrors, add_completion=False, no_args_is_help=True, help="Train and ship small language models."
)


def main() -> None:
    """The `lmline` script (pyproject's [project.scripts]): typer in standalone mode, so usage errors,
    --help and exit codes are click's; LmlineError is handled once, in OneLineErrors."""
    app(prog_name="lmline")


ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override, e.g. pretrain.lr=1e-3")]


def load_params(params: Path, overrides: list[str] | None) -> config.Params:
    return config.load(params, overrides)


def run_stage(name: str, params: config.Params, root: Path | None = None) -> dict:
    """Run one stage's run() with tracking around it; write metrics/<stage>.json; return metrics."""
    from lmline.tracking import runs

    module = importlib.import_module(f"tasks.{name}")
    inputs, outputs = config.stage_io(params, name)
    if int(os.environ.get("RANK", "0")) != 0:
        # Under launch_distributed every rank runs this; only rank 0 writes metrics and talks to MLflow.
        return module.run(params, inputs, outputs)
    with runs.stage_run(name, params, root) as tracked:
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
    # Only now, with the outputs written and the run logged, is nothing left to resume: a failure
    # anywhere before this line re-runs from the stage's last checkpoint (tasks/resume.py).
    if "checkpoints" in outputs:
        shutil.rmtree(outputs["checkpoints"], ignore_errors=True)
    return metrics


@app.callback()
def global_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs, library logs and every stage's own output")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or logs: warnings, errors and results only")] = False,
) -> None:
    """Global options apply to the stages a command runs, too (they travel in LMLINE_VERBOSITY)."""
    from lmline import progress

    level = progress.configure(verbose, quiet)
    os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO" if verbose else "WARNING"  # MLflow sets its level at import
    # With bars on, log lines print above them (through tqdm), not through them. Prefect keeps a root
    # handler it did not install, so the filter below also applies to the flow's and tasks' lines.
    console = progress.BarSafeHandler() if progress.stream() is sys.stderr else logging.StreamHandler()
    console.setLevel(level)  # libraries' loggers (Prefect's) set their own levels: gate what reaches the terminal
    console.addFilter(progress.console_filter)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[console])
    for noisy in ("httpx", "alembic", "urllib3", "filelock", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else max(level, logging.WARNING))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(config.STAGES)}")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one pipeline stage (what dvc.yaml's cmd calls)."""
    if name not in config.STAGES:
        raise LmlineError(f"unknown stage {name!r} (stages: {', '.join(config.STAGES)})")
    cfg = load_params(params, set_)
    devices = getattr(cfg.section(name), "devices", 1)
    if devices > 1 and "WORLD_SIZE" not in os.environ:
        code = launch_distributed(name, devices, params, set_)
        if code:
            raise typer.Exit(code)
        return
    metrics = run_stage(name, cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one result, not one per process
        typer.echo(json.dumps({name: metrics}, indent=2, sort_keys=True))


def launch_distributed(name: str, devices: int, params: Path, overrides: list[str] | None) -> int:
    """Run this same `lmline stage NAME` as `devices` processes on this machine (DDP: the Trainer sees
    WORLD_SIZE and RANK; rank 0 alone writes outputs and the MLflow run, see run_stage). Returns the
    exit code: 0, or the code of the first process that failed (the others are then stopped).

    The processes are started here, not by torchrun: torchrun's rendezvous TCPStore listens on every
    interface (torch has no bind-address option), and nothing of a run may listen beyond loopback.
    They meet through a file instead (LMLINE_DIST_STORE, a FileStore: tasks/resume.join_processes),
    and gloo's own sockets stay on loopback (GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)."""
    import subprocess
    import tempfile

    from flows import guard

    guard.watch_children()  # a kill -9 of this launcher takes its workers with it
    cmd = [sys.executable, "-m", "lmline.cli", "stage", name, "--params", str(params)]
    for item in overrides or []:
        cmd += ["--set", item]
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # else gloo picks the interface the hostname resolves to
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")  # NCCL's bootstrap sockets, on GPUs
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    logging.getLogger("lmline.cli").info("%s: %d processes", name, devices)
    with tempfile.TemporaryDirectory(prefix="lmline-dist-") as rendezvous:
        store = os.path.join(rendezvous, "store")  # must not exist yet: the first process creates it
        workers = [
            subprocess.Popen(cmd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(devices),
                                       "LOCAL_WORLD_SIZE": str(devices), "LMLINE_DIST_STORE": store})
            for rank in range(devices)
        ]
        return wait_all(workers)


def wait_all(workers: list) -> int:
    """Wait for every process; when one fails, stop the others (they would wait for it forever in
    the next collective) and return its exit code."""
    import subprocess

    running = list(workers)
    try:
        while running:
            for worker in list(running):
                code = worker.poll()
                if code is None:
                    continue
                running.remove(worker)
                if code != 0:
                    return code if code > 0 else 128 - code  # killed by a signal: the shell's 128+N
            time.sleep(0.2)
        return 0
    finally:
        for worker in running:
            worker.terminate()
        for worker in running:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


@app.command()
def sources(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """List the configured sources with their sizes."""
    from tasks import ingest

    cfg = load_params(params, set_)
    rows = ingest.describe_sources(cfg)
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
    from lmline import progress

    load_params(params, set_)  # fail on bad params before Prefect or any stage starts
    from flows import guard

    guard.watch_children()  # Prefect's temporary server, dvc and the stages die with this process
    if progress.stream() is sys.stderr:
        os.environ[progress.TTY_ENV] = "1"  # stage output goes to Prefect's logs: stages draw bars on the terminal
    from flows.retrain import retrain
    from lmline.tracking import store

    # Unreachable servers fail here, in one line each, within PROBE_TIMEOUT_S: Prefect's and
    # MLflow's clients would retry for minutes and end in a traceback.
    check_prefect_api()
    store.check_server()
    summary = retrain(overrides=set_, stages=stages, promote=promote, force=force, params_file=str(params))
    print_summary(summary)


def print_summary(summary: dict) -> None:
    """The compact end-of-run table: what ran, the headline numbers, the registry, where to look."""
    from flows.retrain import StageResult, key_metrics
    from lmline.tracking import runs

    stages = summary["stages"]
    ran = sum(s["status"] == "ran" for s in stages)
    typer.echo(f"\nlmline retrain: {ran} of {len(stages)} stages ran, {len(stages) - ran} cached by DVC, "
               f"{sum(s['seconds'] for s in stages):.1f} s\n")
    rows = [[s["stage"], s["status"], f"{s['seconds']:.1f}s", key_metrics(StageResult(**s))] for s in stages]
    echo_table(["stage", "status", "time", "key numbers"], rows)

    ev = runs.numeric(next((s["metrics"] for s in stages if s["stage"] == "evaluate"), {}))
    p = summary.get("promotion") or {}
    if "task.accuracy" in ev:
        typer.echo("")
        name = f"{p['model']} v{p['candidate']}" if "model" in p else "fine-tuned model"
        echo_table(["test split", "accuracy", "macro-F1"], [
            [label, f"{ev[f'{key}.accuracy']:.4f}", f"{ev[f'{key}.macro_f1']:.4f}"]
            for label, key in ((name, "task"), ("baseline: majority class", "baselines.majority"),
                               ("baseline: TF-IDF + logistic regression", "baselines.tfidf_logreg"))
            if f"{key}.accuracy" in ev
        ])
    if "task.test_bits_per_byte" in ev:  # causal-lm: the tuned LM against the pretrained one, on the task's text
        typer.echo("")
        name = f"{p['model']} v{p['candidate']}" if "model" in p else "fine-tuned model"
        echo_table(["finetune test text", "bits/byte", "perplexity"], [
            [label, f"{ev[f'{key}.test_bits_per_byte']:.4f}", f"{ev[f'{key}.test_perplexity']:.4f}"]
            for label, key in ((name, "task"), ("baseline: the pretrained model", "baselines.base_model"))
            if f"{key}.test_bits_per_byte" in ev and f"{key}.test_perplexity" in ev
        ])
    if "lm.test_bits_per_byte" in ev:
        typer.echo(f"base LM test bits/byte: {ev['lm.test_bits_per_byte']:.4f}")

    typer.echo("")
    if "model" in p:
        verdict = ("promoted to @champion" if p["promoted"] else "already @champion"
                   if p["champion_after"] == p["candidate"] else "kept as @challenger" if p.get("challenger")
                   else "not promoted")
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

    from lmline.tracking import lineage, store

    uri, parent = store.tracking_uri(), summary["mlflow_parent_run_id"]
    if uri.startswith("http"):
        mlflow_link = f"{uri.rstrip('/')}/#/models/{model}" if model else uri
    else:
        mlflow_link = f"{tool('mlflow')} ui --backend-store-uri {uri}, then http://127.0.0.1:5000" + (f"/#/models/{model}" if model else "")
    prefect_link = lineage.flow_run_link(summary["flow_run_id"], PREFECT_UI_URL.value(), tool("prefect"))
    return [("MLflow", f"{mlflow_link}  (parent run {parent})"), ("Prefect", prefect_link),
            ("plots", f"{tool('dvc')} plots show, then open dvc_plots/index.html")]


def tool(name: str) -> str:
    """How to call a tool of this environment from here: `.venv/bin/mlflow` when not on PATH as such."""
    import shutil

    path = Path(sys.executable).parent / name
    if shutil.which(name) == str(path):
        return name
    return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)


@app.command("evaluate-text")
def evaluate_text(
    file: Annotated[Path, typer.Argument(help="a UTF-8 text file")],
    model: Annotated[str, typer.Option("--model", "-m", help="model dir, or models:/NAME@ALIAS | models:/NAME/VERSION")],
    batch_size: Annotated[int, typer.Option(min=1, help="windows per forward pass")] = 16,
) -> None:
    """Bits per byte and perplexity of a causal LM on a text file (non-overlapping context windows)."""
    from lmline.tracking import registry
    from tasks import evaluate

    result = evaluate.evaluate_text(registry.resolve_model_uri(model), file, batch_size)
    typer.echo(json.dumps({**result, "model": model}, indent=2, sort_keys=True))


# ---------------------------------------------------------------- models (MLflow registry)
def default_model(params: config.Params, kind: str) -> str:
    name = f"{params.project.name}-base" if kind == "lm" else f"{params.project.name}-{params.finetune.task}"
    return f"models:/{name}@champion"


@app.command()
def models(params: ParamsOpt = Path("params.yaml")) -> None:
    """Registered models and versions with aliases, key metrics and creation time."""
    from datetime import datetime, timezone

    from lmline.tracking import registry, store

    cfg = load_params(params, None)
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
    from lmline.tracking import registry

    # An unknown model or version fails here, in one line, before a Prefect server is needed for the slot.
    registry.version_tags(name, version)
    with promotion.promotion_slot():  # the slot the automatic gate takes: never two moves at once
        result = promotion.manual_promote(name, version, who=getpass.getuser(), why=why)  # MLflow errors: OneLineErrors
    typer.echo(json.dumps(result))


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="registered model name")]) -> None:
    """Move champion back to the version it replaced; the automatic gate never promotes that version again
    (only `lmline promote` can)."""
    import getpass

    from flows import promotion

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
    from lmline.tracking import registry
    from tasks import evaluate

    cfg = load_params(params, None)
    check_sampling_options(max_new_tokens, temperature, seed)  # before loading a model
    lm, tokenizer = evaluate.load_causal_lm(registry.resolve_model_uri(model or default_model(cfg, "lm")))
    overrides = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    sampling = cfg.evaluate.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    [text] = evaluate.generate_samples(lm, tokenizer, [prompt], sampling, cfg.project.seed if seed is None else seed)
    typer.echo(text)


def check_sampling_options(max_new_tokens: int | None, temperature: float | None, seed: int | None) -> None:
    """The options' limits, said in one line (typer's own range errors are a multi-line box)."""
    import math

    if max_new_tokens is not None and max_new_tokens < 1:
        raise LmlineError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise LmlineError(f"--temperature must be above 0 (got {temperature}); a small one, e.g. 0.05, is near-greedy")
    if seed is not None and not 0 <= seed < 2**32:
        raise LmlineError(f"--seed must be between 0 and {2**32 - 1} (got {seed})")


def load_classifier(path: Path):
    """A sequence classifier with its trained head, and its tokenizer. Refuses a causal LM (or any model
    whose saved weights lack the head): transformers would add a random head and answer at random."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from tasks.finetune import require_model

    require_model(path)
    architectures = AutoConfig.from_pretrained(path).architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise LmlineError(f"{path}: not a fine-tuned classifier (architectures: {architectures})")
    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    if info["missing_keys"]:
        raise LmlineError(f"{path}: the classifier's weights lack {', '.join(sorted(info['missing_keys']))}")
    return model.eval(), AutoTokenizer.from_pretrained(path)


@app.command()
def classify(
    text: Annotated[str, typer.Argument()],
    model: Annotated[Optional[str], typer.Option(help="models:/ URI or local dir (default: task model @champion)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Classify TEXT with the fine-tuned classifier; prints the label and class probabilities."""
    import torch

    from lmline.tracking import registry
    from tasks import finetune

    cfg = load_params(params, None)
    clf, tok = load_classifier(registry.resolve_model_uri(model or default_model(cfg, "task")))
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
    from lmline.tracking import lineage as tracking_lineage

    info = tracking_lineage.lineage(model_uri)
    typer.echo(json.dumps(info, indent=2, sort_keys=True))


# ---------------------------------------------------------------- status
@app.command()
def status(
    params: ParamsOpt = Path("params.yaml"),
    runs: Annotated[int, typer.Option(min=0, help="how many recent flow runs to list (needs PREFECT_API_URL)")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Where the workspace stands: stages up to date (DVC), champion and challenger (MLflow), last flow runs (Prefect)."""
    cfg = load_params(params, None)
    report = {"pipeline": pipeline_status(Path.cwd()), "registry": registry_status(cfg), "flow_runs": flow_run_status(runs)}
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    typer.echo("Pipeline (dvc status)")
    echo_table(["  stage", "state", "detail"], [[f"  {r['stage']}", r["state"], r["detail"]] for r in report["pipeline"]["stages"]])
    for section, title, where in (("registry", "Registry", "tracking_uri"), ("flow_runs", "Flow runs", "api")):
        part = report[section]
        typer.echo(f"\n{title} ({part[where] or 'PREFECT_API_URL not set'})")
        rows = part["models"] if section == "registry" else part["runs"]
        if section == "registry":
            shown = [[f"  {r['model']}", f"@{r['alias']}", f"v{r['version']}", r["created"],
                      ", ".join(f"{k} {v}" for k, v in r["metrics"].items())] for r in rows]
        else:
            shown = [[f"  {r['started']}", r["flow"], r["name"], r["state"], r["duration"], r["url"]] for r in rows]
        echo_table(None, shown)
        if part.get("note"):
            typer.echo(f"  {part['note']}")


def pipeline_status(root: Path) -> dict:
    """Each dvc.yaml stage: up to date, changed (and what changed) or never run, from `dvc status`."""
    import yaml
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    lock = root / "dvc.lock"
    locked = set((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.exists() else set()
    try:
        with Repo(str(root)) as repo:
            names = [s.name for s in repo.index.stages]
            changes = repo.status()
    except NotDvcRepoError:
        return {"stages": [], "note": f"{root} is not a DVC workspace (run lmline from the repository root)"}
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


STATUS_TAGS = {  # registry tags worth a glance, and how to call them
    "lmline.eval.metric": "test {metric}",
    "lmline.eval.bits_per_byte": "base test bits/byte",
    "metric.val_macro_f1": "val macro-F1",
    "metric.val_accuracy": "val accuracy",
    "metric.val_bits_per_byte": "val bits/byte",
}


def registry_status(cfg: config.Params) -> dict:
    """Champion and challenger of the task model and the base LM, with their key metrics."""
    from datetime import datetime, timezone

    from lmline.tracking import registry, store

    uri = store.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return {"tracking_uri": uri, "models": [], "note": "no MLflow store here yet: `lmline run` creates it"}
    models = []
    for name in (f"{cfg.project.name}-{cfg.finetune.task}", f"{cfg.project.name}-base"):
        for alias in ("champion", "challenger"):
            mv = registry.alias_version(name, alias)
            if mv is None:
                continue
            tags = dict(mv.tags)
            metric = tags.get("lmline.eval.metric_name", cfg.promote.resolved(cfg.finetune.task).metric)
            models.append({
                "model": name,
                "alias": alias,
                "version": int(mv.version),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "metrics": {label.format(metric=metric): f"{float(tags[tag]):.4f}" for tag, label in STATUS_TAGS.items() if tags.get(tag)},
            })
    note = "" if models else f"no champion yet for {cfg.project.name}-* (run `lmline run`)"
    return {"tracking_uri": uri, "models": models, "note": note}


def prefect_api_error(api: str, timeout_s: float = 3) -> str:
    """Why the Prefect API at `api` does not answer its /health within `timeout_s`, or '' if it does."""
    from lmline.tracking.store import health_error

    return health_error(api, timeout_s)


def check_prefect_api() -> None:
    """With PREFECT_API_URL set, the server must answer before a flow starts (without it, Prefect
    starts a temporary server of its own)."""
    from lmline.tracking.store import PROBE_TIMEOUT_S

    api = os.environ.get("PREFECT_API_URL", "")
    if api and (reason := prefect_api_error(api, PROBE_TIMEOUT_S)):
        raise LmlineError(f"the Prefect API at {api} does not answer ({reason}); "
                          "start the server or unset PREFECT_API_URL for a temporary one")


def flow_run_status(limit: int) -> dict:
    """The last flow runs, when a Prefect server is configured and answers; never starts one."""
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not api:
        return {"api": None, "runs": [], "note": "set PREFECT_API_URL to a running `prefect server` to list flow runs"}
    # a quick probe: Prefect's own client retries for a long while before giving up
    if reason := prefect_api_error(api):
        return {"api": api, "runs": [], "note": f"the Prefect API does not answer ({reason})"}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=limit)
        flows = {fid: client.read_flow(fid).name for fid in {r.flow_id for r in found}}
    runs = [{
        "started": r.start_time.strftime("%Y-%m-%d %H:%M") if r.start_time else "not started",
        "flow": flows[r.flow_id],
        "name": r.name,
        "state": r.state.name if r.state else "unknown",
        "duration": f"{r.total_run_time.total_seconds():.0f}s",
        "url": f"{api.removesuffix('/api')}/runs/flow-run/{r.id}",
        "id": str(r.id),
    } for r in found]
    return {"api": api, "runs": runs, "note": "" if runs else "no flow runs yet"}


# ---------------------------------------------------------------- production (docs/production.md)
@app.command()
def deploy(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Create the work pools if missing and register prefect.yaml's deployments (needs PREFECT_API_URL)."""
    from flows import deploy as deployment

    cfg = load_params(params, set_)
    typer.echo(json.dumps(deployment.deploy(cfg, Path.cwd()), indent=2))


data_app = typer.Typer(no_args_is_help=True, help="Add data to a source: DVC-tracked, announced to Prefect.")
app.add_typer(data_app, name="data")


@data_app.command("add")
def data_add(
    path: Annotated[Path, typer.Argument(help="a file (or a directory of text files) with the new data")],
    source: Annotated[str, typer.Option("--source", "-s", help="the ingest source it belongs to")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Add PATH to a source under corpus/, `dvc add` it, and emit lmline.data.updated (starts a retrain).
    All or nothing: a failing step puts everything back; re-running adds nothing twice."""
    from lmline import data

    cfg = load_params(params, None)
    result = data.add(cfg, Path.cwd(), path, source)
    typer.echo(json.dumps(result, indent=2))
    if not result["event"]:
        typer.echo("note: PREFECT_API_URL is not set, so no lmline.data.updated event was sent", err=True)


if __name__ == "__main__":
    main()
