"""Thread settings for CPU pretraining, idle and beside another busy process: tokens/s of the stage's
Trainer loop (bench/pretrain.py's trainer_loop: no evaluation, no checkpoints) under torch's default
OpenMP threads (they spin while waiting), `OMP_WAIT_POLICY=PASSIVE` (they sleep) and one thread.
Prints a table and writes bench/results/threads.json.

    python bench/threads.py                      # 30 s per run, 2 rounds, idle then shared
    python bench/threads.py --seconds 20 --rounds 3 --loads idle

OpenMP reads its settings when torch loads, so every run is a process of its own. Runs alternate
within a round (variant order the same each round); each ratio is to the default in the same round
and load. "shared": one pure-Python busy loop runs beside the training the whole time, as another
job on the machine would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "threads.json"
VARIANTS = {  # name -> (environment additions, torch threads or None for torch's own choice)
    "default": ({}, None),
    "omp_passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "one_thread": ({}, 1),
}
BUSY_LOOP = "while True: pass"


def child(seconds: float, threads: int | None) -> dict:
    """One timed Trainer loop in this process (the parent's environment decides OpenMP's policy)."""
    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    import pretrain as bench_pretrain  # bench/pretrain.py
    import torch

    from lmline import config

    if threads:
        torch.set_num_threads(threads)
    params = config.load(REPO / "params.yaml", [f"pretrain.max_minutes={seconds / 60}"])
    inputs = bench_pretrain.pretrain_inputs(params)
    return {"threads": torch.get_num_threads(), **bench_pretrain.trainer_loop(params, inputs)}


def run_variant(name: str, seconds: float) -> dict:
    extra_env, threads = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra_env
    cmd = [sys.executable, __file__, "--child", "--seconds", str(seconds)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"error: the {name} run failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="training time per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loads", nargs="+", default=["idle", "shared"], choices=["idle", "shared"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.seconds, args.threads)), flush=True)
        return {}

    sys.path.insert(0, str(REPO))
    from lmline.io import write_json

    runs: dict[str, dict[str, list[dict]]] = {load: {name: [] for name in VARIANTS} for load in args.loads}
    for load in args.loads:
        neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if load == "shared" else None
        try:
            for round_ in range(args.rounds):
                for name in VARIANTS:
                    result = run_variant(name, args.seconds)
                    runs[load][name].append(result)
                    print(json.dumps({"load": load, "round": round_, "variant": name, **result}), file=sys.stderr)
        finally:
            if neighbour:
                neighbour.kill()
                neighbour.wait()

    summary = {}
    print(f"{'load':7} {'variant':12} {'tokens/s (runs)':32} ratio to default, per round")
    for load, by_variant in runs.items():
        for name, results in by_variant.items():
            speeds = [r["tokens_per_second"] for r in results]
            ratios = [round(s / d["tokens_per_second"], 3) for s, d in zip(speeds, by_variant["default"])]
            summary[f"{load}/{name}"] = {"tokens_per_second": speeds, "mean": round(statistics.mean(speeds), 1)}
            summary[f"{load}/{name}"]["ratio_to_default"] = ratios
            print(f"{load:7} {name:12} {', '.join(f'{s:,.0f}' for s in speeds):32} {ratios}")
    report = {"seconds": args.seconds, "cpus": os.cpu_count(), "summary": summary, "runs": runs}
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
