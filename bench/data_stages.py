"""Data stage throughput: clean and tokenize MB/s on the full default corpus, through the stages' own
run() (tasks.ingest, tasks.clean, tasks.tokenize) in a temp workspace built from params.yaml.
Prints JSON and writes bench/results/data_stages.json.

    python bench/data_stages.py                       # ingest once, then clean and tokenize, 3 rounds
    python bench/data_stages.py --rounds 5 --set tokenize.num_proc=1
    python bench/data_stages.py --only-tokenize --rounds 5    # clean once, untimed
    python bench/data_stages.py --baselines           # also time other ways to encode the train split

MB are 10^6 bytes of UTF-8 document text: what the stage reads (clean: the raw documents; tokenize:
the clean pretraining documents, all splits). Seconds are wall-clock around run(), so module imports
are excluded. CPU timings drift on shared machines: rounds alternate the stages (and the baselines),
the summary gives the median, with the CPU seconds (all threads) beside it and the load average.

--whole BASELINE_TREE times whole stages, the issue's measure: `lmline stage NAME` (ingest, clean,
tokenize) as a process, from its start to its exit, imports and MLflow included, in this tree and in
BASELINE_TREE (a checkout of main, say), each in its own workspace (the tree itself: data/, metrics/,
mlflow.db), alternating which tree goes first each round so both see the same load. It reports each
side's median ± sd, the ratios, mb_per_s as the stages define it (lmline.stage_process.throughput:
input MB / whole-process seconds, here the subprocess's wall) and whether the two trees' data/ outputs
are byte-identical. Results go to bench/results/data_stages_whole.json.

    python bench/data_stages.py --whole /work/wt/main-checkout --rounds 3

--baselines answers "why not plain Hugging Face": the train split encoded by tokenizers'
encode_batch_fast with its Rust threads on, by datasets.map(num_proc=N) around the same call, and by
the stage's encoder with 1 and N threads (N = tokenize.num_proc, 0 = cores), alternately, with
ratios to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import lmline  # noqa: E402,F401  (offline switches)
from lmline import config  # noqa: E402
from lmline.io import read_jsonl, write_json  # noqa: E402

RESULTS = REPO / "bench" / "results" / "data_stages.json"


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(stage: str, params: config.Params) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, metrics) of one run() of the stage."""
    from importlib import import_module

    module = import_module(f"tasks.{stage}")  # imported before the clock starts
    inputs, outputs = config.stage_io(params, stage)
    cpu, started = cpu_seconds(), time.perf_counter()
    metrics = module.run(**config.stage_args(params, stage), inputs=inputs, outputs=outputs)
    return time.perf_counter() - started, cpu_seconds() - cpu, metrics


def raw_text_bytes(raw_dir: Path) -> int:
    paths = sorted(raw_dir.glob("*.jsonl"))
    return sum(len(record["text"].encode("utf-8")) for path in paths for record in read_jsonl(path))


def clean_pretrain_bytes(clean_dir: Path) -> int:
    from tasks.tokenize import read_texts, utf8_bytes

    return sum(utf8_bytes(read_texts(path)) for path in sorted((clean_dir / "pretrain").glob("*.parquet")))


def summary(seconds: list[float], mb: float, cpu: list[float] | None = None) -> dict:
    median = statistics.median(seconds)
    out = {
        "mb": round(mb, 3),
        "seconds": [round(s, 3) for s in seconds],
        "median_seconds": round(median, 3),
        "mb_per_s": round(mb / median, 2),
        "best_mb_per_s": round(mb / min(seconds), 2),
    }
    if cpu:  # what the stage costs regardless of what else runs: MB per CPU-second, all threads summed
        out["cpu_seconds"] = [round(c, 3) for c in cpu]
        out["mb_per_cpu_s"] = round(mb / statistics.median(cpu), 2)
    return out


def baselines(params: config.Params, rounds: int) -> dict:
    """Ways to encode the train split, timed alternately; ratios are to the first (plain Hugging Face)."""
    import datasets
    import pyarrow as pa
    from tokenizers import Tokenizer

    from tasks import tokenize

    datasets.disable_progress_bars()
    texts = tokenize.read_texts(Path(params.paths.clean) / "pretrain" / "train.parquet")
    mb = tokenize.utf8_bytes(texts) / 1e6
    tokenizer = Tokenizer.from_file(str(Path(params.paths.tokenizer) / "tokenizer.json"))
    eos = tokenizer.token_to_id(params.tokenize.eos_token)
    threads = tokenize.worker_count(params.tokenize.num_proc)
    strings = texts.to_pylist()

    def hf_rust_threads():
        with tokenize.rust_threads():
            tokenizer.encode_batch_fast(strings, add_special_tokens=False)

    def hf_datasets_map():  # the same call in datasets.map worker processes (Rust threads off: they fork)
        def encode(batch):
            return {"ids": [e.ids for e in tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)]}

        datasets.Dataset(pa.table({"text": texts})).map(
            encode, batched=True, batch_size=1000, num_proc=threads, remove_columns=["text"]
        )

    ways = {
        f"hf_encode_batch_{threads}_rust_threads": hf_rust_threads,
        f"hf_datasets_map_{threads}_processes": hf_datasets_map,
        "segments_1_thread": lambda: tokenize.encode_documents(texts, tokenizer, eos, threads=1),
        f"segments_{threads}_threads": lambda: tokenize.encode_documents(texts, tokenizer, eos, threads=threads),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            seconds[name].append(time.perf_counter() - started)
    first = statistics.median(seconds[next(iter(ways))])
    return {name: {**summary(s, mb), "speedup": round(first / statistics.median(s), 2)} for name, s in seconds.items()}


WHOLE_RESULTS = REPO / "bench" / "results" / "data_stages_whole.json"
WHOLE_STAGES = ("ingest", "clean", "tokenize")
OUTPUTS = ("raw", "clean", "tokenizer", "tokens")  # params.paths keys of the data stages' outputs


def stage_wall(tree: Path, stage: str) -> float:
    """Wall seconds of one `lmline stage STAGE` process run from `tree`, on `tree`'s own code and workspace."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(tree), "LMLINE_VERBOSITY": "quiet"}
    env.pop("LMLINE_PARENT_RUN_ID", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lmline.cli", "stage", stage], cwd=tree, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{tree}: lmline stage {stage} failed:\n{proc.stderr[-2000:]}")
    return seconds


def tree_digests(tree: Path, params: config.Params) -> dict[str, str]:
    """sha256 of every file of the data stages' outputs, by path relative to the tree."""
    import hashlib

    digests = {}
    for key in OUTPUTS:
        for path in sorted((tree / getattr(params.paths, key)).rglob("*")):
            if path.is_file():
                digests[str(path.relative_to(tree))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def whole_stages(baseline: Path, params: config.Params, rounds: int) -> dict:
    """Whole `lmline stage` processes, this tree against `baseline`, alternating; see the docstring."""
    trees = {"baseline": baseline.resolve(), "this": REPO}
    load_before = os.getloadavg()
    for tree in trees.values():  # untimed: creates each tree's mlflow.db and warms the sample cache
        stage_wall(tree, "ingest")
    seconds: dict[str, dict[str, list[float]]] = {side: {s: [] for s in WHOLE_STAGES} for side in trees}
    for i in range(rounds):
        order = list(trees) if i % 2 == 0 else list(reversed(trees))
        for stage in WHOLE_STAGES:  # a stage reads what the one before wrote, in the same tree
            for side in order:
                seconds[side][stage].append(stage_wall(trees[side], stage))
    mb = {
        stage: json.loads((REPO / params.paths.metrics / f"{stage}.json").read_text())["mb_in"]
        for stage in WHOLE_STAGES
    }
    digests = {side: tree_digests(tree, params) for side, tree in trees.items()}
    result = {
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "rounds": rounds,
        "trees": {side: str(tree) for side, tree in trees.items()},
        "mb_in": mb,
        "outputs_byte_identical": digests["baseline"] == digests["this"],
        "output_files": len(digests["this"]),
    }
    for stage in WHOLE_STAGES:
        per = {}
        for side in trees:
            s = seconds[side][stage]
            per[side] = {
                "seconds": [round(x, 3) for x in s],
                "median_seconds": round(statistics.median(s), 3),
                "mean_seconds": round(statistics.mean(s), 3),
                "sd_seconds": round(statistics.stdev(s), 3) if len(s) > 1 else 0.0,
                "mb_per_s": round(mb[stage] / statistics.median(s), 3),
            }
        per["baseline_over_this"] = round(per["baseline"]["median_seconds"] / per["this"]["median_seconds"], 3)
        result[stage] = per
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="e.g. tokenize.num_proc=1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only-tokenize", action="store_true", help="run clean once, untimed; time tokenize")
    parser.add_argument("--baselines", action="store_true", help="also time other ways to encode the train split")
    parser.add_argument("--whole", type=Path, metavar="BASELINE_TREE", help="time whole stages against this tree")
    args = parser.parse_args()

    params = config.load(args.params, args.overrides)
    if args.whole:
        result = whole_stages(args.whole, params, args.rounds)
        print(json.dumps(result, indent=2))
        write_json(WHOLE_RESULTS, result)
        return
    stages = ["tokenize"] if args.only_tokenize else ["clean", "tokenize"]
    load_before, home = os.getloadavg(), Path.cwd()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        os.chdir(tmp)  # params.paths are relative to the workspace
        try:
            ingest_seconds, _, _ = timed("ingest", params)
            if args.only_tokenize:
                timed("clean", params)
            wall: dict[str, list[float]] = {stage: [] for stage in stages}
            cpu: dict[str, list[float]] = {stage: [] for stage in stages}
            metrics: dict[str, dict] = {}
            for _ in range(args.rounds):
                for stage in stages:
                    seconds, cpu_used, metrics[stage] = timed(stage, params)
                    wall[stage].append(seconds)
                    cpu[stage].append(cpu_used)
            mb = {
                "clean": raw_text_bytes(Path(params.paths.raw)) / 1e6,
                "tokenize": clean_pretrain_bytes(Path(params.paths.clean)) / 1e6,
            }
            result = {
                "cpus": len(os.sched_getaffinity(0)),
                "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "overrides": args.overrides,
                "ingest_seconds": round(ingest_seconds, 3),
                **{stage: summary(wall[stage], mb[stage], cpu[stage]) for stage in stages},
                "tokenize_metrics": metrics["tokenize"],
                "target_tokenize_mb_per_s": 10,
            }
            if args.baselines:
                result["encode_train_split"] = baselines(params, args.rounds)
        finally:
            os.chdir(home)
    print(json.dumps(result, indent=2))
    write_json(RESULTS, result)


if __name__ == "__main__":
    main()
