"""Fine-tuning sweep: tokenize -> pretrain -> finetune -> evaluate through the stages' own run() functions,
for a few candidate settings x seeds, on the real clean data (data/clean from `dvc repro clean`). Prints the
model against both baselines (TF-IDF + logistic regression, majority class), accuracy and macro-F1, mean ± sd
over seeds, side by side; writes bench/results/finetune.json.

    python bench/finetune.py                                        # params.yaml as it is, seeds 1 2 3
    python bench/finetune.py --merge a.json b.json                  # one summary of earlier runs
    python bench/finetune.py --variant base: --variant dapt4:tokenize.mix.rotten_tomatoes=4 \\
        --steps pretrain=600,finetune=300 --seeds 1 2 3

Choose on VAL (finetune's val split: `val_macro_f1`), report TEST: the summary names the variant with the best
mean val macro-F1, and its test figures are the ones to quote. `--steps` replaces the stages' time budgets by
step budgets (max_steps, with max_minutes large), so a run's result does not depend on the machine's load;
the wall seconds each stage took are in the JSON to translate steps back into default time budgets.
Runs that share the tokenize (and pretrain) settings and seed share those stages' outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import lmline  # noqa: E402,F401  (offline switches)
from lmline import config  # noqa: E402
from lmline.io import write_json  # noqa: E402
from tasks import evaluate, finetune, pretrain, tokenize  # noqa: E402

RESULTS = REPO / "bench" / "results" / "finetune.json"
STAGES = {"tokenize": tokenize, "pretrain": pretrain, "finetune": finetune, "evaluate": evaluate}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:a.b=1,c.d=2' -> ('name', ['a.b=1', 'c.d=2']); 'name:' = params as they are."""
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def step_overrides(text: str | None) -> list[str]:
    """'pretrain=600,finetune=300' -> step budgets with a time budget that never binds."""
    out = []
    for item in (text or "").split(","):
        if item:
            stage, _, steps = item.partition("=")
            out += [f"{stage}.max_steps={int(steps)}", f"{stage}.max_minutes=1000"]
    return out


def stage_paths(params: config.Params, stage: str, work: Path) -> tuple[dict, dict]:
    """The stage's inputs/outputs with everything but the clean data moved under `work`."""
    inputs, outputs = config.stage_io(params, stage)

    def move(paths: dict) -> dict:
        return {k: (v if k == "clean" else work / k / Path(v).name) for k, v in paths.items()}

    return move(inputs), move(outputs)


def run_stage(params: config.Params, stage: str, work: Path, inputs: dict | None = None) -> tuple[dict, float, dict]:
    ins, outs = stage_paths(params, stage, work)
    ins.update(inputs or {})
    args = config.stage_args(params, stage)
    started = time.perf_counter()
    metrics = STAGES[stage].run(inputs=ins, outputs=outs, **args)
    return metrics, round(time.perf_counter() - started, 2), outs


def one_run(params: config.Params, tmp: Path, cache: dict, index: int) -> dict:
    """tokenize and pretrain come from `cache` when an earlier run had the same settings and seed."""
    seed = params.project.seed
    tok_key = (json.dumps(params.tokenize.model_dump(), sort_keys=True), seed)
    if tok_key not in cache:
        work = tmp / f"tok{len(cache)}"
        cache[tok_key] = run_stage(params, "tokenize", work) + (work,)
    tok_metrics, tok_s, tok_outs, tok_work = cache[tok_key]
    pre_key = (tok_key, json.dumps(params.pretrain.model_dump(), sort_keys=True))
    if pre_key not in cache:
        work = tmp / f"pre{len(cache)}"
        cache[pre_key] = run_stage(params, "pretrain", work, tok_outs) + (work,)
    pre_metrics, pre_s, pre_outs, _ = cache[pre_key]
    work = tmp / f"ft{index}"
    ft_metrics, ft_s, ft_outs = run_stage(params, "finetune", work, {"model": pre_outs["model"]})
    ev_metrics, ev_s, _ = run_stage(
        params, "evaluate", work, {"base": pre_outs["model"], "tuned": ft_outs["model"], "tokens": tok_outs["tokens"]}
    )
    keep = ("steps", "stopped_by", "train_seconds", "best_step")
    return {
        "seconds": {"tokenize": tok_s, "pretrain": pre_s, "finetune": ft_s, "evaluate": ev_s},
        "pretrain": {
            **{k: pre_metrics.get(k) for k in ("steps", "train_seconds", "val_bits_per_byte", "tokens_per_second")},
            "train_mb": round(tok_metrics["splits"]["train"]["bytes"] / 1e6, 3),
        },
        "finetune": {k: ft_metrics.get(k) for k in (*keep, "val_accuracy", "val_macro_f1", "val_loss")},
        "test": numbers(ev_metrics["task"]),  # classification: accuracy, macro_f1; causal-lm: test_bits_per_byte
        "baselines": {n: numbers(b) for n, b in ev_metrics["baselines"].items()},  # causal-lm: the base model
        "lm_test_bits_per_byte": next((v for k, v in ev_metrics["lm"].items() if k.endswith("bits_per_byte")), None),
    }


def numbers(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if isinstance(v, float)}


def mean_sd(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "sd": round(sd, 4)}


def summarize(runs: list[dict]) -> dict:
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)
    summary = {}
    for name, rs in by_variant.items():
        row = {"seeds": [r["seed"] for r in rs]}
        for split, key in (("val", "finetune"), ("test", "test")):
            for metric in ("accuracy", "macro_f1"):
                values = [r[key].get(f"val_{metric}" if split == "val" else metric) for r in rs]
                row[f"{split}_{metric}"] = {**mean_sd(values), "all": values}
        for base in ("tfidf_logreg", "majority", "base_model"):
            for metric in ("accuracy", "macro_f1", "test_bits_per_byte"):
                values = [r["baselines"].get(base, {}).get(metric) for r in rs]
                if any(v is not None for v in values):
                    row[f"{base}_{metric}"] = mean_sd(values)
        values = [r["test"].get("test_bits_per_byte") for r in rs]
        if any(v is not None for v in values):  # causal-lm: the tuned model on the source's test text
            row["tuned_test_bits_per_byte"] = {**mean_sd(values), "all": values}
        row["pretrain_val_bits_per_byte"] = mean_sd([r["pretrain"]["val_bits_per_byte"] for r in rs])
        for stage in STAGES:
            row[f"{stage}_seconds"] = mean_sd([r["seconds"][stage] for r in rs])
        summary[name] = row
    chosen = max(summary, key=lambda n: summary[n]["val_macro_f1"]["mean"] or -1)  # causal-lm: meaningless
    return {"chosen_on_val_macro_f1": chosen, "variants": summary}


NA = {"mean": None, "sd": None}


def fmt(ms: dict) -> str:
    return "   n/a      " if ms["mean"] is None else f"{ms['mean']:.3f}±{ms['sd']:.3f}"


def table(summary: dict) -> str:
    lines = [
        f"{'variant':<14} {'val acc':>12} {'val F1':>12} {'test acc':>12} {'test F1':>12} "
        f"{'tfidf acc':>12} {'tfidf F1':>12} {'major acc':>12} {'pre bpb':>12}"
    ]
    for name, r in summary["variants"].items():
        cols = [
            r["val_accuracy"],
            r["val_macro_f1"],
            r["test_accuracy"],
            r["test_macro_f1"],
            r.get("tfidf_logreg_accuracy", NA),
            r.get("tfidf_logreg_macro_f1", NA),
            r.get("majority_accuracy", NA),
            r["pretrain_val_bits_per_byte"],
        ]
        lines.append(f"{name:<14} " + " ".join(f"{fmt(c):>12}" for c in cols))
        if "tuned_test_bits_per_byte" in r:
            tuned, base = r["tuned_test_bits_per_byte"], r["base_model_test_bits_per_byte"]
            lines.append(f"{'':<14} causal-lm test bits/byte on the source: tuned {fmt(tuned)}, base {fmt(base)}")
    lines.append(f"chosen on val macro-F1: {summary['chosen_on_val_macro_f1']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--variant", action="append", default=[], help="name:section.key=value,...")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", help="step budgets, e.g. pretrain=600,finetune=300 (default: params' time budgets)")
    ap.add_argument("--set", action="append", default=[], help="an override for every variant")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--merge", type=Path, nargs="+", help="summarize the runs of earlier result files, run nothing")
    args = ap.parse_args(argv)
    if args.merge:
        files = [json.loads(p.read_text()) for p in args.merge]
        runs = [r for f in files for r in f["runs"]]
        report = {
            "merged": [str(p) for p in args.merge],
            "variants": {k: v for f in files for k, v in f["variants"].items()},
        }
        report.update(base_overrides=files[0]["base_overrides"], summary=summarize(runs), runs=runs)
        write_json(args.out, report)
        print(table(report["summary"]))
        return report
    variants = dict(parse_variant(v) for v in (args.variant or ["params:"]))
    base = [*args.set, *step_overrides(args.steps)]
    runs: list[dict] = []
    cache: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        for seed in args.seeds:  # seed-major: every variant sees the same stretch of machine load
            for name, overrides in variants.items():
                params = config.load(args.params, [*base, *overrides, f"project.seed={seed}"])
                run = {"variant": name, "seed": seed, **one_run(params, Path(tmp), cache, len(runs))}
                runs.append(run)
                print(json.dumps(run), flush=True)
                write_json(args.out, {"variants": variants, "base_overrides": base, "runs": runs})
    summary = summarize(runs)
    report = {"variants": variants, "base_overrides": base, "seeds": args.seeds, "summary": summary, "runs": runs}
    write_json(args.out, report)
    print(table(summary))
    return report


if __name__ == "__main__":
    main()
