"""What orchestration costs, side by side: a no-op `lmline run` (every stage cached) in ephemeral Prefect
mode and against a running `prefect server start`, the overhead of a full run over the stages' own
compute, and the data stages' MB/s as whole stages. Prints a table and JSON, writes
bench/results/orchestration.json (orchestration-tiny.json with --tiny).

    python bench/orchestration.py --tiny                          # the tests' tiny pipeline: minutes
    python bench/orchestration.py                                 # default params and corpus: one full run
    python bench/orchestration.py --tiny --baseline /work/main    # every run alternates: that checkout, this one
    python bench/orchestration.py --baseline DIR --full-rounds 2  # two full runs a side, ABBA

Each full run has a fresh git + DVC repo (tests/conftest.py's make_dvc_repo) in a temp dir, with one
PREFECT_HOME for all and its own MLflow store: `lmline run` there runs every stage, with one side's code
(`--full-rounds` per side, the sides alternating); its wall time against the stages' own compute is the
overhead figure. The baseline's code runs under this venv's `lmline` script, lmline/entry.py: a
checkout from before that file needs a copy of it (and of lmline/stage_host.py, which it imports only
under a stage host, which such a checkout never starts). Compute is what each stage's process
spends in its run() after its imports (metrics/<stage>.json's stage_seconds); startup_seconds there is
what the process spent before (interpreter, imports); the task seconds the summary prints are the
whole stage (dvc repro, process start, MLflow run included). Overhead = run wall - sum of compute;
reported too against the flow's own wall time (the summary's `flow N s`: the `retrain` flow from its
call to its return, its Prefect run's creation and end included), the issue's definition, which
leaves out the process's start-up and exit.

No-op runs: `--rounds` rounds; in each, every code side (`--baseline DIR`, then this checkout; the order
alternates each round) runs `lmline run` once in ephemeral mode and once against the server, so both
sides see the same machine load. Wall seconds are the whole `lmline run` process, start to exit.
Reported: median, mean and sd per side and mode, and the ratio of medians. The load average is
recorded before and after: on a shared machine every figure is under that load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from lmline import OFFLINE_ENV  # noqa: E402
from lmline.io import write_json  # noqa: E402

RESULTS = REPO / "bench" / "results" / "orchestration.json"
BIN = Path(sys.executable).parent
GIT_AUTHOR = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "b@b.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "b@b.invalid",
}
STAGES = ("ingest", "clean", "tokenize", "pretrain", "finetune", "evaluate")
FLOW = re.compile(r"^lmline retrain: .*, flow ([0-9.]+) s$", re.M)
ROW = re.compile(r"^(ingest|clean|tokenize|pretrain|finetune|evaluate)\s+(ran|cached)\s+([0-9.]+)s", re.M)


def run_env(code: Path, home: Path, api: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMLINE_", "MLFLOW_TRACKING", "PREFECT_"))}
    env.update({**OFFLINE_ENV, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(code)})
    env.update({"PREFECT_HOME": str(home), "LMLINE_VERBOSITY": "normal"})
    if api:
        env["PREFECT_API_URL"] = api
    return env


def lmline_run(workspace: Path, env: dict[str, str]) -> tuple[float, dict[str, tuple[str, float]], float | None]:
    """(wall seconds of the whole `lmline run` process, {stage: (status, task seconds)}, the flow's wall
    seconds as the summary prints them: None from code that does not print them)."""
    started = time.perf_counter()
    out = subprocess.run([str(BIN / "lmline"), "run"], cwd=workspace, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode:
        raise SystemExit(f"lmline run failed ({env['PYTHONPATH']}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    flow = FLOW.search(out.stdout)
    return wall, {m[1]: (m[2], float(m[3])) for m in ROW.finditer(out.stdout)}, float(flow[1]) if flow else None


def stats(values: list[float]) -> dict:
    return {
        "seconds": [round(v, 2) for v in values],
        "median": round(statistics.median(values), 2),
        "mean": round(statistics.mean(values), 2),
        "sd": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
    }


def full_run(workspace: Path, env: dict[str, str]) -> dict:
    """The first run: every stage runs. Overhead against the stages' compute, and data-stage MB/s."""
    wall, rows, flow = lmline_run(workspace, env)
    metrics = {s: json.loads((workspace / "metrics" / f"{s}.json").read_text()) for s in STAGES}
    compute = {s: metrics[s]["stage_seconds"] for s in STAGES}
    startup = {s: metrics[s].get("startup_seconds") for s in STAGES}
    total = sum(compute.values())
    tokenize_bytes = sum(split["bytes"] for split in metrics["tokenize"]["splits"].values())
    mb = {"ingest": metrics["ingest"]["totals"]["bytes"] / 1e6, "clean": metrics["clean"]["mb_in"]}
    mb["tokenize"] = tokenize_bytes / 1e6
    return {
        "statuses": {s: rows[s][0] for s in STAGES},
        "run_wall_seconds": round(wall, 2),
        "compute_seconds": compute,
        "startup_seconds": startup,
        "task_seconds": {s: rows[s][1] for s in STAGES},
        "sum_compute_seconds": round(total, 2),
        "overhead_seconds": round(wall - total, 2),
        "overhead_percent_of_compute": round(100 * (wall - total) / total, 1),
        # the same against the flow's own wall time (the definition): the process's start-up
        # (imports, Prefect's temporary server) and exit are left out
        "flow_wall_seconds": flow,
        "flow_overhead_seconds": round(flow - total, 2) if flow else None,
        "flow_overhead_percent_of_compute": round(100 * (flow - total) / total, 1) if flow else None,
        "data_stages": {
            s: {
                "mb": round(mb[s], 3),
                "task_seconds": rows[s][1],
                "compute_seconds": compute[s],
                "mb_per_s_whole_stage": round(mb[s] / rows[s][1], 3),
                "mb_per_s_compute": round(mb[s] / compute[s], 3) if compute[s] else None,
            }
            for s in ("ingest", "clean", "tokenize")
        },
    }


def yaml_parse_ms(path: Path, repeats: int = 20) -> dict:
    """DVC's YAML parse (ruamel.yaml, typ="safe") of `path`, with the C parser of ruamel.yaml.clib (a
    dependency of ours, pyproject.toml) and in pure Python, as DVC parses it without that package."""
    from ruamel.yaml import YAML

    text = path.read_text()
    out = {}
    for name, pure in (("c", False), ("pure_python", True)):
        yaml_ = YAML(typ="safe", pure=pure)
        started = time.perf_counter()
        for _ in range(repeats):
            yaml_.load(text)
        out[name] = round((time.perf_counter() - started) / repeats * 1000, 2)
    out["pure_over_c"] = round(out["pure_python"] / out["c"], 2)
    return {"file": path.name, "bytes": len(text.encode()), **out}


def with_code(workspace: Path, code: Path) -> Path:
    """The workspace with `code`'s pipeline (its lmline, tasks, flows and dvc.yaml), committed: the
    stages run the workspace's own code (flows/stage_task.py:stage_env), not the flow's."""
    if code == REPO:
        return workspace  # make_dvc_repo copied this checkout's
    for item in ("lmline", "tasks", "flows"):
        shutil.rmtree(workspace / item)
        shutil.copytree(code / item, workspace / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(code / "dvc.yaml", workspace / "dvc.yaml")
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", f"the pipeline of {code}"]):
        subprocess.run(cmd, cwd=workspace, check=True, capture_output=True, env={**os.environ, **GIT_AUTHOR})
    return workspace


def overhead_stats(runs: list[dict]) -> dict:
    """One side's full runs: overhead (s and % of compute), wall and compute, every run and their mean."""
    keys = ("run_wall_seconds", "sum_compute_seconds", "overhead_seconds", "overhead_percent_of_compute")
    keys += ("flow_wall_seconds", "flow_overhead_seconds", "flow_overhead_percent_of_compute")
    out = {key: [run[key] for run in runs] for key in keys}
    out["mean"] = {key: round(statistics.mean(values), 2) for key, values in out.items() if None not in values}
    return out


def prepare_stores(workspace: Path, env: dict[str, str]) -> None:
    """Create the Prefect database (Prefect's temporary server, started once) and the MLflow store before
    anything is timed: a first run ever pays for both once (tens of seconds), which is set-up, not orchestration."""
    code = (
        "import mlflow; from prefect.server.api.server import SubprocessASGIServer as S; "
        "s = S(); s.start(timeout=600); s.stop(); "
        f"mlflow.tracking.MlflowClient(tracking_uri='sqlite:///{workspace / 'mlflow.db'}').search_experiments()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=workspace, env=env, check=True, capture_output=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    from conftest import answers

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = run_env(REPO, home, None)
    env["PREFECT_SERVER_UI_API_URL"] = api
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not answers(f"{api}/health"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"prefect server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)  # polling interval
    return proc, api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny pipeline instead of params.yaml's")
    parser.add_argument("--rounds", type=int, default=3, help="no-op rounds (each: every side, both modes)")
    parser.add_argument("--baseline", type=Path, help="another checkout whose code the runs alternate with")
    parser.add_argument("--full-rounds", type=int, default=1, help="full runs per side, in fresh workspaces")
    args = parser.parse_args()
    from conftest import make_dvc_repo, tiny_params

    sides = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    load_before = os.getloadavg()
    result: dict = {
        "cpus": len(os.sched_getaffinity(0)),
        "tiny": args.tiny,
        "sides": {k: str(v) for k, v in sides.items()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        tmp = Path(tmp)
        params = tiny_params() if args.tiny else yaml.safe_load((REPO / "params.yaml").read_text())
        home = tmp / "prefect-home"
        # Full runs: each in a fresh workspace (every stage runs), the sides alternating round by round.
        full: dict[str, list[dict]] = {side: [] for side in sides}
        for i in range(args.full_rounds):
            for side in list(sides) if i % 2 else list(reversed(sides)):
                workspace = with_code(make_dvc_repo(tmp / f"workspace-{side}-{i}", params), sides[side])
                prepare_stores(workspace, run_env(sides[side], home, None))
                full[side].append(full_run(workspace, run_env(sides[side], home, None)))
                print(f"full run {i} {side}: {full[side][-1]['run_wall_seconds']} s", file=sys.stderr)
        result["full_run"] = full["this"][-1]
        result["full_runs"] = {side: overhead_stats(runs) for side, runs in full.items()}
        workspace = tmp / f"workspace-this-{args.full_rounds - 1}"  # the no-op runs' workspace: all cached
        result["dvc_lock_parse_ms"] = yaml_parse_ms(workspace / "dvc.lock")
        server, api = start_prefect_server(tmp / "prefect-server-home", tmp / "prefect-server.log")
        try:
            walls: dict[str, list[float]] = {f"{side}/{mode}": [] for side in sides for mode in ("ephemeral", "server")}
            for i in range(args.rounds):
                order = list(sides) if i % 2 else list(reversed(sides))
                for side in order:
                    for mode, url in (("ephemeral", None), ("server", api)):
                        wall, rows, _ = lmline_run(workspace, run_env(sides[side], home, url))
                        if {status for status, _ in rows.values()} != {"cached"} or len(rows) != len(STAGES):
                            raise SystemExit(f"{side}/{mode}: not a no-op run: {rows}")
                        walls[f"{side}/{mode}"].append(wall)
        finally:
            os.killpg(server.pid, signal.SIGINT)
            server.wait(timeout=30)
    result["noop_runs"] = {key: stats(values) for key, values in walls.items()}
    if args.baseline:
        result["noop_ratio_this_over_baseline"] = {
            mode: round(statistics.median(walls[f"this/{mode}"]) / statistics.median(walls[f"baseline/{mode}"]), 3)
            for mode in ("ephemeral", "server")
        }
    result["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print_table(result)
    print(json.dumps(result, indent=2))
    write_json(RESULTS.with_name("orchestration-tiny.json") if args.tiny else RESULTS, result)


def print_table(result: dict) -> None:
    full = result["full_run"]
    print(f"load average before/after: {result['load_average_before_after']} on {result['cpus']} CPUs")
    print(
        f"\nfull run ({'tiny' if result['tiny'] else 'default'} params): {full['run_wall_seconds']} s wall, "
        f"{full['sum_compute_seconds']} s stage compute, overhead {full['overhead_seconds']} s "
        f"= {full['overhead_percent_of_compute']}% of compute; the flow alone {full['flow_wall_seconds']} s, "
        f"overhead {full['flow_overhead_seconds']} s = {full['flow_overhead_percent_of_compute']}%"
    )
    print(f"{'stage':<9} {'task s':>7} {'startup s':>9} {'compute s':>9}")
    for s in STAGES:
        print(f"{s:<9} {full['task_seconds'][s]:>7} {full['startup_seconds'][s]!s:>9} {full['compute_seconds'][s]:>9}")
    for side, runs in result.get("full_runs", {}).items():
        print(
            f"{side}: overhead {runs['overhead_seconds']} s = {runs['overhead_percent_of_compute']} % of compute "
            f"{runs['sum_compute_seconds']} s; wall {runs['run_wall_seconds']} s; the flow alone: overhead "
            f"{runs['flow_overhead_seconds']} s = {runs['flow_overhead_percent_of_compute']} %"
        )
    print(f"\n{'data stage':<10} {'MB':>8} {'MB/s whole':>10} {'MB/s compute':>12}")
    for s, d in full["data_stages"].items():
        print(f"{s:<10} {d['mb']:>8} {d['mb_per_s_whole_stage']:>10} {d['mb_per_s_compute']!s:>12}")
    y = result["dvc_lock_parse_ms"]
    print(f"\nDVC's parse of dvc.lock ({y['bytes']} bytes): C {y['c']} ms, pure Python {y['pure_python']} ms")
    print(f"\n{'no-op run':<20} {'median s':>8} {'mean s':>7} {'sd':>5}  runs")
    for key, s in result["noop_runs"].items():
        print(f"{key:<20} {s['median']:>8} {s['mean']:>7} {s['sd']:>5}  {s['seconds']}")
    if "noop_ratio_this_over_baseline" in result:
        print(f"ratio this/baseline (medians): {result['noop_ratio_this_over_baseline']}")


if __name__ == "__main__":
    main()
