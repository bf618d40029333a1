"""Model cards: what a registered model version is, what it was trained on, how good it is, how it was made.

`render()` is pure: it builds the markdown from params, the stages' metrics files, the generation
samples and the version's lineage (lmline.tracking.lineage.lineage), so every number in a card is a number
from a metrics file, formatted by `num`. `read_inputs()` reads those files; lmline.tracking.registry logs the
card as an artifact and as the version's description, and the retrain flow shows it in Prefect.
A card only includes the stages that ran before its model was registered (a pretrain card written
at registration must not quote the previous run's evaluation); it is rewritten after evaluation and
again after promotion, when the comparison with the previous champion is known.
"""

from __future__ import annotations

from pathlib import Path

from lmline.config import STAGES, Params, metrics_path
from lmline.io import read_json
from lmline.stages import model_name


# ---------------------------------------------------------------- formatting
def num(value, digits: int = 4) -> str:
    """The one number format in cards: floats to `digits` places, ints with thousands separators."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    return f"{float(value):.{digits}f}"


def megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f} MB"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


# ---------------------------------------------------------------- sections
def data_section(params: Params, metrics: dict) -> list[str]:
    clean = metrics.get("clean") or {}
    per_source = clean.get("sources", {})
    rows = []
    for source in params.ingest.sources:
        m = per_source.get(source.name, {})
        rows.append(
            [
                f"`{source.name}`",
                source.type,
                source.role,
                num(m.get("docs_in")),
                num(m.get("docs_out")),
                megabytes(m["bytes_out"]) if "bytes_out" in m else "–",
            ]
        )
    lines = [
        "## Data",
        "",
        *table(["source", "type", "role", "documents in", "after cleaning", "size after cleaning"], rows),
    ]
    splits = clean.get("splits", {})
    if splits:
        shown = "; ".join(
            f"{role}: " + ", ".join(f"{split} {num(n)}" for split, n in sorted(s.items()))
            for role, s in sorted(splits.items())
        )
        lines += ["", f"Documents per split ({shown}), split by a hash of each cleaned text."]
    return lines + [""]


def tokenizer_section(params: Params, metrics: dict) -> list[str]:
    tok = metrics.get("tokenize")
    if not tok:
        return []
    bpt = {split: s.get("bytes_per_token") for split, s in tok.get("splits", {}).items()}
    return [
        "## Tokenizer",
        "",
        f"Byte-level BPE trained by lmline on a {num(tok.get('train_sample_mb'), 3)} MB sample of the train split: "
        f"{num(tok.get('vocab_size'))} tokens (`{params.tokenize.eos_token}` opens and ends documents, "
        f"`{params.tokenize.pad_token}` pads). Bytes per token: "
        + ", ".join(f"{split} {num(v, 3)}" for split, v in sorted(bpt.items()))
        + ".",
        "",
    ]


def architecture_section(params: Params, metrics: dict, is_base: bool) -> list[str]:
    cfg, pre = params.pretrain, metrics.get("pretrain") or {}
    rows = [
        ["architecture", f"{cfg.arch} (decoder-only transformer)"],
        ["parameters", num(pre.get("parameters"))],
        ["layers × heads × width", f"{cfg.n_layer} × {cfg.n_head} × {cfg.d_model}"],
        ["key/value heads", str(cfg.n_kv_head or cfg.n_head)],
        ["feed-forward width", "architecture default" if cfg.d_ff is None else str(cfg.d_ff)],
        ["context", f"{cfg.context} tokens"],
        ["tied embeddings", str(cfg.tie_embeddings).lower()],
    ]
    if not is_base:
        ft = metrics.get("finetune") or {}
        head = (
            "classification head over "
            + ", ".join(f"`{label}`" for label in ft.get("labels", []))
            + READ_OUT[params.finetune.pooling]
            if params.finetune.task == "classification"
            else "the language-model head, trained further"
        )
        rows.append(["task", f"{params.finetune.task}: {head}"])
    return ["## Architecture", "", *table(["", ""], rows), ""]


READ_OUT = {  # finetune.pooling: where the head reads the example, and how plain transformers loads it
    "mean": ", read from the mean of the final hidden states over the example's tokens "
    "(load it with `AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`: "
    "the model carries its read-out code, `pooling.py`)",
    "last": ", read at the example's last token",
}


def stopped(metrics: dict, budget) -> str:
    """Why training ended, beside the budget it had (a pretrain or finetune section)."""
    return f"{metrics.get('stopped_by')} (budget {num(budget.max_steps)} steps / {budget.max_minutes:g} min)"


def budget_section(params: Params, metrics: dict, is_base: bool) -> list[str]:
    pre = metrics.get("pretrain") or {}
    rows = []
    if pre:
        rows.append(
            [
                "pretrain",
                num(pre.get("steps")),
                f"{num(pre.get('tokens_seen'))} tokens",
                num(pre.get("train_seconds"), 1),
                stopped(pre, params.pretrain),
                f"{pre.get('precision')} × {pre.get('devices')}, {num(pre.get('tokens_per_second'), 1)} tokens/s",
            ]
        )
    ft = metrics.get("finetune") or {}
    if ft and not is_base:
        rows.append(
            [
                "finetune",
                num(ft.get("steps")),
                f"{num(ft.get('train_examples'))} examples",
                num(ft.get("train_seconds"), 1),
                stopped(ft, params.finetune),
                f"best checkpoint at step {num(ft.get('best_step'))}",
            ]
        )
    if not rows:
        return []
    return [
        "## Training budget",
        "",
        *table(["stage", "steps", "data seen", "seconds", "stopped by", "notes"], rows),
        "",
    ]


def metrics_section(params: Params, metrics: dict, is_base: bool) -> list[str]:
    pre, ev = metrics.get("pretrain") or {}, metrics.get("evaluate")
    lines = ["## Metrics", ""]
    lm = (ev or {}).get("lm", {})
    rows = [["validation (pretrain, whole split)", num(pre.get("val_bits_per_byte")), num(pre.get("val_perplexity"))]]
    if lm:
        rows.append(
            [
                f"test ({num(lm.get('test_tokens'))} tokens, {lm.get('context')}-token windows)",
                num(lm.get("test_bits_per_byte")),
                num(lm.get("test_perplexity")),
            ]
        )
    lines += ["Base language model (lower is better):", "", *table(["split", "bits per byte", "perplexity"], rows), ""]
    if ev is None:
        return lines + ["Not evaluated on the test split yet.", ""]
    if is_base:
        return lines
    task, baselines = ev.get("task", {}), ev.get("baselines", {})
    if params.finetune.task == "classification":
        rows = [["**this model**", num(task.get("accuracy")), num(task.get("macro_f1"))]]
        for name, label in (("majority", "majority class"), ("tfidf_logreg", "TF-IDF + logistic regression")):
            if name in baselines:
                rows.append(
                    [f"baseline: {label}", num(baselines[name].get("accuracy")), num(baselines[name].get("macro_f1"))]
                )
        lines += [
            f"Classification on the test split ({num(task.get('test_examples'))} examples):",
            "",
            *table(["model", "accuracy", "macro-F1"], rows),
            "",
        ]
    else:
        rows = [["**this model**", num(task.get("test_bits_per_byte")), num(task.get("test_perplexity"))]]
        base = baselines.get("base_model", {})
        rows.append(
            ["baseline: the pretrained model", num(base.get("test_bits_per_byte")), num(base.get("test_perplexity"))]
        )
        lines += [
            "Language modelling on the fine-tuning source's test text:",
            "",
            *table(["model", "bits per byte", "perplexity"], rows),
            "",
        ]
    return lines


def tag_number(value: str | None) -> float | None:
    """A decision tag's number; empty when that score was missing (the gate then refused)."""
    return float(value) if value else None


def champion_section(decision: dict, aliases: list[str], metric: str) -> list[str]:
    """From the version's `lmline.decision.*` tags, which promotion writes."""
    shown = ", ".join(f"`@{a}`" for a in aliases) or "none"
    lines = ["## Compared with the champion", "", f"Aliases when this card was written: {shown}."]
    verdict = decision.get("lmline.decision")
    if not verdict:
        return lines + [
            "",
            "Not compared yet: the retrain flow compares a candidate with the champion after evaluation.",
            "",
        ]
    if verdict == "promoted-manually":
        return lines + [
            "",
            f"Made champion by hand by {decision.get('lmline.decision.by')}: {decision.get('lmline.decision.reason')}.",
            "",
        ]
    rows = [["this version", num(tag_number(decision.get("lmline.decision.candidate_metric")))]]
    champion = decision.get("lmline.decision.champion_version")
    if champion:
        rows.append(
            [f"champion before (v{champion})", num(tag_number(decision.get("lmline.decision.champion_metric")))]
        )
    return lines + [
        "",
        f"Decision: **{verdict}**: {decision.get('lmline.decision.reason')}.",
        "",
        *table(["model", f"test {metric}"], rows),
        "",
    ]


def samples_section(samples: str | None, note: str) -> list[str]:
    if not samples:
        return []
    return ["## Sample generations", "", note, "", "```text", samples.strip(), "```", ""]


def use_section(params: Params, metrics: dict, is_base: bool) -> list[str]:
    sources = ", ".join(f"`{s.name}`" for s in params.ingest.sources)
    lines = [
        "## Intended use and limitations",
        "",
        "- Intended for experimenting with and testing the lmline pipeline: a small model trained in minutes, "
        "which shows whether data, tokenizer, training and evaluation work together.",
        f"- It knows only what its sources ({sources}) contain, with their language, era and biases; "
        "its generations are fluent at best and never reliable as facts.",
        f"- Inputs longer than the context ({params.pretrain.context} tokens) are cut"
        + (
            "." if is_base else f"; the fine-tuned model reads at most {params.finetune.max_length} tokens per example."
        ),
    ]
    if not is_base and params.finetune.task == "classification":
        labels = ", ".join(f"`{label}`" for label in (metrics.get("finetune") or {}).get("labels", []))
        lines.append(
            f"- The classifier always answers one of {labels}, even for text unlike its training data; "
            "check it beats the baselines above before relying on it."
        )
    lines.append("- Not for decisions about people, nor for anything needing safety or factual accuracy.")
    return lines + [""]


def lineage_section(lineage: dict) -> list[str]:
    prefect = lineage.get("prefect") or {}
    rows = [
        [
            "git commit",
            f"`{lineage.get('git_commit')}`" + (" (uncommitted changes)" if lineage.get("git_dirty") == "true" else ""),
        ],
        ["MLflow run", f"`{lineage.get('mlflow_run_id')}` (stage `{lineage.get('stage')}`)"],
    ]
    if lineage.get("pipeline_run_id"):
        rows.append(["pipeline run", f"`{lineage['pipeline_run_id']}`"])
    if prefect.get("flow_run_id"):
        url = prefect.get("flow_run_url", "")  # lmline.tracking.lineage.flow_run_link
        url = (
            f" {url}"
            if url.startswith("http")
            else f" (made without a Prefect server; to see it: {url})"
            if url
            else ""
        )
        rows.append(["Prefect flow run", f"`{prefect.get('flow_run_name')}` (`{prefect['flow_run_id']}`){url}"])
    base = lineage.get("base_model")
    if base:
        rows.append(["fine-tuned from", f"`{base.get('model')}`"])
    rows += [[f"DVC dep `{dep}`", f"`{md5}`"] for dep, md5 in sorted((lineage.get("dvc_deps") or {}).items())]
    return [
        "## Lineage",
        "",
        *table(["", ""], rows),
        "",
        f"Full record: `lmline lineage models:/{lineage.get('model')}`.",
        "",
    ]


# ---------------------------------------------------------------- the card
def render(params: Params, model: str, metrics: dict[str, dict], samples: str | None, lineage: dict) -> str:
    """The markdown card of registered version `model` ("name/version")."""
    name, _, version = model.partition("/")
    is_base = name == model_name(params.project.name, "base", params.finetune.task)
    pre = metrics.get("pretrain") or {}
    what = "pretrained language model" if is_base else f"{params.finetune.task} model fine-tuned from it"
    tuned_source = (metrics.get("finetune") or {}).get("source", params.finetune.source)
    intro = (
        f"A {num(pre.get('parameters'))}-parameter {params.pretrain.arch} {what}, trained by lmline "
        f"(project `{params.project.name}`)."
        if is_base
        else f"A {params.finetune.task} model: the {num(pre.get('parameters'))}-parameter {params.pretrain.arch} base "
        f"language model fine-tuned on `{tuned_source}` by lmline "
        f"(project `{params.project.name}`)."
    )
    lines = [f"# Model card: {name} v{version}", "", intro, ""]
    lines += data_section(params, metrics)
    lines += tokenizer_section(params, metrics)
    lines += architecture_section(params, metrics, is_base)
    lines += budget_section(params, metrics, is_base)
    lines += metrics_section(params, metrics, is_base)
    if not is_base:
        lines += champion_section(
            lineage.get("decision") or {},
            lineage.get("aliases") or [],
            params.promote.resolved(params.finetune.task).metric,
        )
    classifier = not is_base and params.finetune.task == "classification"
    lines += samples_section(
        samples,
        "From the evaluate stage (reports/samples.txt)"
        + (": a classifier does not generate, so these come from its base language model." if classifier else "."),
    )
    lines += use_section(params, metrics, is_base)
    lines += lineage_section(lineage)
    return "\n".join(lines).rstrip() + "\n"


def read_inputs(params: Params, root: Path, upto: str) -> tuple[dict[str, dict], str | None]:
    """The metrics files of the stages up to and including `upto`, and the samples if evaluate is in."""
    stages = STAGES[: STAGES.index(upto) + 1]
    metrics = {}
    for stage in stages:
        path = Path(root) / metrics_path(params, stage)
        if path.exists():
            metrics[stage] = read_json(path)
    samples_file = Path(root) / params.paths.reports / "samples.txt"
    samples = samples_file.read_text(encoding="utf-8") if "evaluate" in stages and samples_file.exists() else None
    return metrics, samples
