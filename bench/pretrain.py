"""Pretraining benchmark: tokens/s and val bits per byte after a fixed training-time budget, on the
real default data (data/tokens and data/tokenizer from `dvc repro tokenize`), through the stage's
own training code (tasks.pretrain.train). Prints JSON and writes bench/results/pretrain.json.

    python bench/pretrain.py                                   # params.yaml's config, 150 s
    python bench/pretrain.py --seconds 60 --set pretrain.lr=2e-3
    python bench/pretrain.py --variant base: --variant wide:pretrain.d_model=192 --rounds 2
    python bench/pretrain.py --loop-gap --seconds 30 --rounds 3   # Trainer vs a plain PyTorch loop

CPU timings drift (other processes, clocks): variants run alternately, round after round, and the
summary gives each one's ratio to the first variant within the same round. Beside other busy
processes torch's spinning threads lose most of their speed (bench/threads.py): measure on an idle
machine.
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

import torch  # noqa: E402
from transformers import TrainerCallback, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import lmline  # noqa: E402,F401  (offline switches)
from lmline import config  # noqa: E402
from lmline.errors import LmlineError  # noqa: E402
from lmline.io import write_json  # noqa: E402
from tasks import pretrain  # noqa: E402

RESULTS = REPO / "bench" / "results" / "pretrain.json"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:pretrain.a=1,pretrain.b=2' -> ('name', ['pretrain.a=1', 'pretrain.b=2']); 'name:' = no change."""
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def pretrain_inputs(params: config.Params) -> dict[str, Path]:
    """The pretrain stage's inputs in this checkout (data/tokens, data/tokenizer); exits with one line
    when tokenize has not run yet."""
    inputs, _ = config.stage_io(params, "pretrain")
    inputs = {k: (REPO / v if not v.is_absolute() else v) for k, v in inputs.items()}
    if not (inputs["tokens"] / "meta.json").is_file():
        sys.exit(f"error: {inputs['tokens']} has no tokens yet: run `dvc repro tokenize` first")
    return inputs


def stage_run(params: config.Params, inputs: dict) -> dict:
    """One training run of the stage's code; checkpoints go to a temp folder, nothing else is written."""
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        _, metrics, _ = pretrain.train(params.pretrain, params.project.seed, inputs, Path(tmp) / "checkpoints")
    return metrics


def step_stats(durations: list[float], tokens_per_step: int) -> dict:
    """Throughput from per-step wall times. The 10th percentile step is the one least slowed by other
    processes on the cores: comparing those compares the code, not the neighbours."""
    ordered = sorted(durations[1:])  # the first step pays one-off set-up
    p10, median = ordered[len(ordered) // 10], ordered[len(ordered) // 2]
    return {
        "steps": len(durations),
        "tokens_per_second": round(len(durations) * tokens_per_step / sum(durations), 1),
        "step_ms_median": round(median * 1e3, 2),
        "step_ms_p10": round(p10 * 1e3, 2),
        "tokens_per_second_p10": round(tokens_per_step / p10, 1),
    }


class StepTimes(TrainerCallback):
    """Wall time of every optimizer step, the Trainer's own work between steps included."""

    def __init__(self):
        self.durations: list[float] = []
        self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.durations.append(now - self.last)
        self.last = now


def loop_inputs(params: config.Params, inputs: dict):
    cfg = params.pretrain
    meta = pretrain.read_meta(inputs["tokens"])
    windows = pretrain.TokenWindows(
        pretrain.load_split(inputs["tokens"], meta, "train", cfg.context), cfg.context, stride=1
    )
    set_seed(params.project.seed)
    model = pretrain.build_model(cfg, pretrain.load_tokenizer(inputs["tokenizer"], meta, inputs["tokens"]))
    return cfg, windows, model


def trainer_loop(params: config.Params, inputs: dict) -> dict:
    """The stage's Trainer set-up (make_trainer), timed per step, without evaluation or checkpoints."""
    cfg, windows, model = loop_inputs(params, inputs)
    cfg = cfg.model_copy(update={"eval_every": 10**9, "checkpoint_every": 10**9})
    times = StepTimes()
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        never_evaluated = pretrain.TokenWindows(windows.tokens, cfg.context, stride=cfg.context, limit=cfg.batch_size)
        trainer = pretrain.make_trainer(
            cfg,
            params.project.seed,
            model,
            windows,
            eval_set=never_evaluated,
            output_dir=Path(tmp),
            clock=pretrain.TrainingClock(cfg.max_minutes * 60),
        )
        trainer.add_callback(times)
        trainer.train()
    return step_stats(times.durations, cfg.batch_size * cfg.grad_accum * cfg.context)


def plain_loop(params: config.Params, inputs: dict) -> dict:
    """The same model, data, optimizer and schedule in a bare PyTorch loop: the Trainer's reference."""
    cfg, windows, model = loop_inputs(params, inputs)
    model.train()
    optimizer = pretrain.build_optimizer(model, cfg)
    started = time.perf_counter()
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: pretrain.lr_multiplier(step, time.perf_counter() - started, cfg)
    )
    sampler = torch.utils.data.RandomSampler(windows, generator=torch.Generator().manual_seed(params.project.seed))
    loader = iter(
        torch.utils.data.DataLoader(
            windows, batch_size=cfg.batch_size, sampler=sampler, collate_fn=pretrain.collate_windows, drop_last=True
        )
    )
    durations, last = [], started
    while len(durations) < cfg.max_steps and last - started < cfg.max_minutes * 60:
        for _ in range(cfg.grad_accum):
            (model(**next(loader)).loss / cfg.grad_accum).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        durations.append(now - last)
        last = now
    return step_stats(durations, cfg.batch_size * cfg.grad_accum * cfg.context)


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of the best square matmul timing on this machine, now, with torch's threads: the peak
    MFU is measured against, taken in the same run as the training it judges (not a constant)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: thread pool, kernel selection
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def measure_peaks() -> dict[str, float]:
    """fp32 is what the CPU trains in (pretrain.precision auto); bf16 beside it: a bf16 run is judged against it."""
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(json.dumps({"matmul_peak_flops": peaks}), file=sys.stderr, flush=True)
    return peaks


def with_measured_mfu(result: dict, peaks: dict[str, float]) -> dict:
    """The stage's mfu is against params' pretrain.peak_flops; add it against the peak measured here for
    the precision the run trained in (a bf16 run against the bf16 peak: against fp32's it would flatter)."""
    if "flops_per_token" in result and "tokens_per_second" in result:
        peak = peaks[result.get("precision", "fp32")]
        result["mfu_measured_peak"] = round(result["flops_per_token"] * result["tokens_per_second"] / peak, 4)
    return result


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per variant: the mean of each number over rounds, the runs' bits per byte, and per round the
    throughput ratio to the first variant (runs of one round are close in time: drift cancels)."""
    first = next(iter(runs.values()))
    out = {}
    for name, results in runs.items():
        keys = [k for k, v in results[0].items() if isinstance(v, (int, float))]
        row = {k: round(statistics.mean(r[k] for r in results), 4) for k in keys}
        if "val_bits_per_byte" in row:
            row["val_bits_per_byte_runs"] = [r["val_bits_per_byte"] for r in results]
        for key in ("tokens_per_second", "tokens_per_second_p10"):
            if key in row:
                row[f"{key}_ratio"] = [round(r[key] / f[key], 3) for r, f in zip(results, first)]
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--seconds", type=float, default=150.0, help="training-time budget per run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="e.g. pretrain.lr=2e-3")
    ap.add_argument("--variant", action="append", default=[], help="name:key=value,key=value (repeatable)")
    ap.add_argument("--loop-gap", action="store_true", help="Trainer vs plain loop tokens/s (no evaluation)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = [*args.overrides, f"pretrain.max_minutes={args.seconds / 60}"]
    try:
        params = config.load(args.params, base)
    except LmlineError as exc:
        sys.exit(f"error: {exc}")
    inputs = pretrain_inputs(params)

    if args.loop_gap:
        variants = {"trainer": ([], trainer_loop), "plain_loop": ([], plain_loop)}
    else:
        variants = {name: (overrides, stage_run) for name, overrides in map(parse_variant, args.variant or ["config:"])}

    # The peak is measured before the first run and after the last, and the higher one kept: a peak is
    # a best case, so a reading taken while something else ran is only ever low, and would flatter
    # every MFU judged against it. MFU against it is added once both readings are in.
    peaks = measure_peaks()
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, (overrides, fn) in variants.items():
            p = config.load(args.params, [*base, *overrides])
            result = fn(p, inputs)
            runs[name].append(result)
            print(json.dumps({"round": round_, "variant": name, **result}), file=sys.stderr, flush=True)
    after = measure_peaks()
    peaks = {dtype: max(peaks[dtype], after[dtype]) for dtype in peaks}
    runs = {name: [with_measured_mfu(r, peaks) for r in results] for name, results in runs.items()}

    report = {
        "seconds": args.seconds,
        "threads": torch.get_num_threads(),
        "matmul_peak_flops": peaks,
        "variants": {name: overrides for name, (overrides, _) in variants.items()},
        "summary": summarize(runs),
        "runs": runs,
    }
    write_json(args.out, report)
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()
