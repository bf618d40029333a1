"""Pretrain stage: a tiny model really trains on a tiny tokenized corpus (seconds per run)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SEED, sentence, stage_io
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmline import config
from lmline.errors import LmlineError
from tasks import pretrain, training

TINY = {
    "n_layer": 2,
    "n_head": 2,
    "d_model": 64,
    "context": 32,
    "batch_size": 8,
    "max_steps": 30,
    "warmup_steps": 5,
    "eval_every": 10,
    "eval_batches": 2,
    "log_every": 5,
    "checkpoint_every": 10,
    "max_minutes": 10,
}
TIMING = ("tokens_per_second", "train_seconds", "mfu")  # wall-clock dependent


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> dict[str, Path]:
    """The tokenize stage's real outputs for a tiny clean corpus: tokenizer dir, {split}.bin, meta.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks import tokenize

    root = tmp_path_factory.mktemp("tokenized")
    rng = random.Random(0)
    docs = [" ".join(sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(400)]
    (root / "clean/pretrain").mkdir(parents=True)
    for split, part in {"train": docs[:340], "val": docs[340:370], "test": docs[370:]}.items():
        pq.write_table(pa.table({"text": part}), root / f"clean/pretrain/{split}.parquet")
    cfg = config.TokenizeConfig(vocab_size=300, num_proc=1)
    cwd = os.getcwd()
    os.chdir(root)  # paths are relative to the workspace: tokenize runs in root
    try:
        tokenize.run(cfg, SEED, *stage_io("tokenize", clean="clean", tokenizer="tokenizer", tokens="tokens"))
    finally:
        os.chdir(cwd)
    return {"tokenizer": root / "tokenizer", "tokens": root / "tokens"}


@pytest.fixture
def stage(tokenized, workspace):
    """stage(seed, **pretrain_overrides) -> (cfg, seed, inputs, outputs) in the test's workspace, which
    reaches the module's tokenized data through links (paths.* lie inside the workspace)."""
    (workspace / "shared").mkdir()
    for name in ("tokenizer", "tokens"):
        (workspace / "shared" / name).symlink_to(tokenized[name], target_is_directory=True)

    def make(seed: int = 7, **overrides):
        inputs, outputs = stage_io("pretrain", tokenizer="shared/tokenizer", tokens="shared/tokens")
        return config.PretrainConfig(**{**TINY, **overrides}), seed, inputs, outputs

    return make


def test_run_trains_and_writes_a_loadable_model(stage):
    cfg, seed, inputs, outputs = stage()
    metrics = pretrain.run(cfg, seed, inputs, outputs)

    model = AutoModelForCausalLM.from_pretrained(outputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(outputs["model"])
    assert (outputs["model"] / "model.safetensors").is_file()
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    prompt = tokenizer("The king", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]

    assert metrics["steps"] == 30 and metrics["resumed_from_step"] == 0 and metrics["stopped_by"] == "max_steps"
    assert metrics["tokens_seen"] == 30 * 8 * 32
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["val_loss"] < math.log(len(tokenizer)) - 1  # learned something beyond uniform guessing
    meta = json.loads((Path(inputs["tokens"]) / "meta.json").read_text())
    bpb = metrics["val_loss"] / math.log(2) / meta["bytes_per_token"]["val"]
    assert metrics["val_bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
    assert 0 < metrics["mfu"] < 1 and metrics["tokens_per_second"] > 0
    json.dumps(metrics)  # the shell writes it as JSON

    lines = outputs["loss"].read_text().splitlines()
    assert lines[0] == "step,train_loss,val_loss"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [5, 10, 15, 20, 25, 30]
    assert all(r[1] for r in rows) and [r[0] for r in rows if r[2]] == ["10", "20", "30"]
    assert float(rows[-1][2]) == pytest.approx(metrics["val_loss"], abs=1e-6)  # the final row: whole val split
    # The stage keeps its checkpoints: the shell deletes them once the run is logged (tests/test_faults.py)
    assert complete_checkpoints(outputs["checkpoints"]) == [20, 30]


def test_same_seed_same_metrics_other_seed_differs(stage):
    def trained(seed):
        cfg, seed, inputs, outputs = stage(seed=seed, max_steps=15)
        metrics = pretrain.run(cfg, seed, inputs, outputs)
        shutil.rmtree(outputs["checkpoints"])  # as the shell does after logging: the next run starts fresh
        return {k: v for k, v in metrics.items() if k not in TIMING}

    first = trained(7)
    assert trained(7) == first
    assert trained(8)["val_loss"] != first["val_loss"]


def test_compiled_training_repeats_matches_eager_and_saves_a_plain_model(stage):
    """pretrain.compile: inductor's kernels give the same metrics for the same seed, the
    same numbers as eager PyTorch up to float rounding, and the plain transformers weights."""

    def trained(compile_: bool):
        cfg, seed, inputs, outputs = stage(max_steps=10, compile=compile_)
        metrics = pretrain.run(cfg, seed, inputs, outputs)
        shutil.rmtree(outputs["checkpoints"])
        return {k: v for k, v in metrics.items() if k not in TIMING}, outputs["model"]

    compiled, model_dir = trained(True)
    assert trained(True)[0] == compiled
    eager, _ = trained(False)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and not any("_orig_mod" in name for name in names)  # torch.compile's wrapper is not saved
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_compile_without_a_cpu_compiler_is_a_clear_error(stage, monkeypatch):
    monkeypatch.setenv("CXX", "lmline-no-such-compiler")
    cfg, seed, inputs, outputs = stage(compile=True)
    with pytest.raises(
        LmlineError,
        match=r"^pretrain.compile: torch.compile on a CPU needs a C\+\+ compiler and "
        r"'lmline-no-such-compiler' is not on PATH",
    ):
        pretrain.run(cfg, seed, inputs, outputs)
    assert not any(outputs[k].exists() for k in ("model", "loss", "checkpoints"))


def test_wall_clock_budget_stops_training_and_still_saves(stage):
    cfg, seed, inputs, outputs = stage(max_steps=100_000, max_minutes=0.03)  # 1.8 s
    metrics = pretrain.run(cfg, seed, inputs, outputs)
    assert metrics["stopped_by"] == training.TIME_BUDGET == "time_budget"
    assert 0 < metrics["steps"] < 100_000
    assert 1.8 <= metrics["train_seconds"] < 10
    assert (outputs["model"] / "model.safetensors").is_file()
    assert outputs["loss"].read_text().splitlines()[-1].split(",")[0] == str(metrics["steps"])


RUN_STAGE = (  # argv: the pretrain section as JSON, the seed
    "import json, sys; from lmline import config; from tasks import pretrain; from conftest import stage_io; "
    "pretrain.run(config.PretrainConfig(**json.loads(sys.argv[1])), int(sys.argv[2]), "
    "*stage_io('pretrain', tokenizer='shared/tokenizer', tokens='shared/tokens'))"
)


def complete_checkpoints(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in ckpt_dir.glob(f"checkpoint-*/{pretrain.CLOCK_FILE}"))


def test_rerun_after_a_crash_resumes_from_the_last_checkpoint(stage, workspace):
    cfg, seed, inputs, outputs = stage(max_steps=200)
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_STAGE, cfg.model_dump_json(), str(seed)],
        cwd=workspace,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while not complete_checkpoints(outputs["checkpoints"]) and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill:\n{err.decode()[-2000:]}"
    last = complete_checkpoints(outputs["checkpoints"])[-1]
    assert not outputs["model"].exists()

    metrics = pretrain.run(cfg, seed, inputs, outputs)
    assert metrics["resumed_from_step"] == last > 0
    assert metrics["steps"] == 200

    # the resumed run ends where an uninterrupted one does (same data order, optimizer state, schedule)
    shutil.rmtree(outputs["checkpoints"])
    fresh = pretrain.run(cfg, seed, inputs, outputs)
    assert fresh["resumed_from_step"] == 0
    assert metrics["val_loss"] == pytest.approx(fresh["val_loss"], abs=1e-4)


def test_changed_params_seed_or_data_start_fresh(stage, tokenized, workspace):
    def checkpointed(**overrides) -> dict:
        """Train like a run killed after its last checkpoint: the checkpoints stay."""
        cfg, seed, inputs, outputs = stage(**overrides)
        return pretrain.train(cfg, seed, inputs, outputs["checkpoints"])[1]

    assert checkpointed()["resumed_from_step"] == 0
    assert complete_checkpoints(workspace / "checkpoints/pretrain") == [20, 30]  # the last two are kept
    assert checkpointed(lr=1e-3)["resumed_from_step"] == 0
    assert checkpointed(lr=1e-3, seed=8)["resumed_from_step"] == 0

    other_data = workspace / "tokens"
    shutil.copytree(tokenized["tokens"], other_data)
    meta = json.loads((other_data / "meta.json").read_text())
    meta["splits"]["train"]["documents"] += 1
    (other_data / "meta.json").write_text(json.dumps(meta))
    cfg, seed, inputs, outputs = stage(lr=1e-3, seed=8)
    _, metrics, _ = pretrain.train(cfg, seed, {**inputs, "tokens": other_data}, outputs["checkpoints"])
    assert metrics["resumed_from_step"] == 0

    cfg, seed, inputs, outputs = stage(lr=1e-3, seed=8)
    metrics = pretrain.run(cfg, seed, {**inputs, "tokens": other_data}, outputs)
    assert (metrics["resumed_from_step"], metrics["steps"]) == (30, 30)  # nothing left: loaded as it was
    assert [r.split(",")[0] for r in outputs["loss"].read_text().splitlines()[1:]] == [
        "5",
        "10",
        "15",
        "20",
        "25",
        "30",
    ]


def test_heads_not_dividing_width_fail_at_load(make_params):
    with pytest.raises(
        config.ConfigError, match=r"^params.yaml: pretrain: d_model \(64\) must be divisible by n_head \(3\)"
    ):
        make_params(
            {"ingest": {"sources": [{"name": "shakespeare", "type": "sample"}]}, "pretrain": {**TINY, "n_head": 3}}
        )


def test_missing_tokens_is_a_clear_error(stage, workspace):
    cfg, seed, inputs, outputs = stage()
    inputs = {**inputs, "tokens": workspace / "data/tokens"}
    with pytest.raises(LmlineError, match=r"data/tokens/meta.json: not found; run the tokenize stage"):
        pretrain.run(cfg, seed, inputs, outputs)
    assert not outputs["model"].exists() and not outputs["loss"].exists()


def test_gpt2_takes_its_special_tokens_from_the_tokenizer(tokenized):
    tokenizer = AutoTokenizer.from_pretrained(tokenized["tokenizer"])
    model = pretrain.build_model(
        config.PretrainConfig(arch="gpt2", n_layer=1, n_head=2, d_model=32, context=16), tokenizer
    )
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id != 50256
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_lr_warms_up_then_decays_to_the_floor_on_either_budget():
    cfg = config.PretrainConfig(warmup_steps=10, max_steps=110, max_minutes=1, min_lr_ratio=0.1)
    assert pretrain.lr_multiplier(0, 0, cfg) == pytest.approx(0.1)
    assert pretrain.lr_multiplier(9, 0.5, cfg) == pytest.approx(1.0)
    assert pretrain.lr_multiplier(60, 6, cfg) == pytest.approx(0.55)  # half way by steps, on pace
    assert pretrain.lr_multiplier(60, 10, cfg) == pytest.approx(0.55)  # timing does not matter on pace
    assert pretrain.lr_multiplier(110, 20, cfg) == pytest.approx(0.1)
    assert pretrain.lr_multiplier(20, 40, cfg) == pytest.approx(0.55)  # 30 steps fit: half way by time
    assert pretrain.lr_multiplier(20, 60, cfg) == pytest.approx(0.1)


def test_gpu_bench_runs_tiny_on_cpu(workspace):
    spec = importlib.util.spec_from_file_location("gpu_pretrain", REPO / "bench" / "gpu_pretrain.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(
        [
            "--layers",
            "2",
            "--width",
            "64",
            "--heads",
            "2",
            "--context",
            "32",
            "--vocab",
            "256",
            "--batch-size",
            "4",
            "--steps",
            "6",
            "--warmup-steps",
            "2",
            "--precision",
            "fp32",
            "--no-compile",
            "--out",
            str(workspace / "gpu.json"),
        ]
    )
    assert result["steps_timed"] == 4 and result["flops_per_token"] > 0
    # mfu is rounded to 6 decimals, and a slow or loaded CPU makes it round to 0.0: check how it is
    # computed from its parts instead of comparing the rounded figure with zero.
    peak = result["peak_tflops_per_device"] * 1e12 * result["devices"]
    assert result["mfu"] == pytest.approx(result["flops_per_token"] * result["tokens_per_second"] / peak, abs=1e-6)
    assert result["mfu"] < 1
    assert json.loads((workspace / "gpu.json").read_text())["tokens_per_second"] == result["tokens_per_second"]
