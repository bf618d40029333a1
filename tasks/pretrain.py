"""Pretrain stage: a small decoder-only transformer trained from scratch on the packed token files.

Reads `data/tokenizer/` and `data/tokens/{train,val}.bin` + `meta.json` (tokenize stage); writes
`models/pretrain/` (safetensors, config, generation config, tokenizer: loadable with
AutoModelForCausalLM / AutoTokenizer), `plots/pretrain_loss.csv` (step, train_loss, val_loss) and keeps
resumable checkpoints in `checkpoints/pretrain/` while it runs.

Training is `transformers.Trainer` with our own AdamW and LR schedule:
- Batches are random windows (nanoGPT's choice): every token position of train.bin is a window start,
  drawn without replacement by the Trainer's seeded sampler. A window costs the same either way, so
  bits per byte per CPU-minute differ only through repetition: a 150 s CPU run sees under half an
  epoch of the default corpus, where random windows and shuffled fixed blocks are equally fresh, and
  on longer runs random offsets never show the same block twice, fixed blocks do every epoch.
- LR: linear warmup, then cosine to `lr * min_lr_ratio` over whichever budget runs out first, steps
  (`max_steps`) or training time (`max_minutes`, projected from the pace so far), so a time-bound
  run still ends annealed, and a run on pace for max_steps is as deterministic as the seed makes it.
- `max_minutes` counts training time only (evaluation and checkpoint writes are excluded, so
  eval_every and checkpoint_every do not change how far the model gets), summed over resumed
  attempts: a run that crashed at minute 2 of 2.5 trains half a minute more after resuming.
- Resume: re-running with the same params and data continues from the newest complete checkpoint.
  `fingerprint.json` beside the checkpoints hashes the pretrain section, the seed, meta.json and the
  tokenizer files; any change starts fresh (tasks/resume.py). The shell deletes the checkpoints once
  the outputs are written and the run is logged: DVC caches the final model, and a finished run has
  nothing left to resume.
- Validation bits per byte: the mean next-token loss over non-overlapping `context`-token windows
  covering the whole val split (each window predicts its last context-1 tokens), in bits, divided by
  the split's bytes per token from meta.json. The CSV's periodic val_loss uses the first
  `eval_batches` batches of the same windows, so the curve is comparable from row to row.

Several devices: `pretrain.devices: N` makes `lmline stage pretrain` relaunch itself as N
processes on this machine (lmline.stage_process.launch_distributed, a file rendezvous); the Trainer runs DDP
(NCCL on GPUs, gloo on CPUs), the DistributedSampler splits each step's windows, and only rank 0
writes the model, the loss CSV, the checkpoints and the MLflow run. `batch_size` is per device: the global batch is
batch_size x grad_accum x devices, and `devices` is in the checkpoint fingerprint (another global
batch is another run).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    Trainer,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from lmline.config import PretrainConfig
from lmline.errors import LmlineError
from lmline.io import atomic_path, read_json
from tasks import resume, training
from tasks.resume import CLOCK_FILE, TrainingClock, checkpoint_step, resume_point  # noqa: F401  (this stage's API)

log = logging.getLogger("lmline.pretrain")


# ---------------------------------------------------------------- data
def read_meta(tokens_dir: Path) -> dict:
    path = tokens_dir / "meta.json"
    if not path.is_file():
        raise LmlineError(f"{path}: not found; run the tokenize stage first (dvc repro tokenize)")
    meta = read_json(path)
    for key in ("vocab_size", "dtype", "bytes_per_token"):
        if key not in meta:
            raise LmlineError(f"{path}: missing key {key!r}")
    return meta


def load_split(tokens_dir: Path, meta: dict, split: str, context: int) -> np.ndarray:
    path = tokens_dir / f"{split}.bin"
    if not path.is_file():
        raise LmlineError(f"{path}: not found; run the tokenize stage first (dvc repro tokenize)")
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(tokens) < context:
        raise LmlineError(f"{path}: {len(tokens)} tokens, fewer than one pretrain.context window ({context})")
    return tokens


class TokenWindows(torch.utils.data.Dataset):
    """Windows of `context` tokens starting every `stride` tokens: stride 1 to train (every position
    is a start; the sampler's shuffle makes them random windows), stride = context to evaluate
    (non-overlapping blocks). `limit` keeps the first windows only."""

    def __init__(self, tokens: np.ndarray, context: int, stride: int, limit: int | None = None):
        self.tokens, self.context, self.stride = tokens, context, stride
        self.length = (len(tokens) - context) // stride + 1
        if limit is not None:
            self.length = min(self.length, limit)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.stride
        return torch.from_numpy(self.tokens[start : start + self.context].astype(np.int64))


def collate_windows(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack(rows)
    return {"input_ids": ids, "labels": ids}  # the model shifts the labels itself


# ---------------------------------------------------------------- model
def default_d_ff(cfg: PretrainConfig) -> int:
    if cfg.arch == "gpt2":
        return 4 * cfg.d_model
    # SwiGLU has three matrices instead of two: 8/3 x width keeps the MLP at GPT's parameter count
    return 32 * math.ceil(8 * cfg.d_model / 3 / 32)


def model_config(cfg: PretrainConfig, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    special = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    d_ff = cfg.d_ff or default_d_ff(cfg)
    if cfg.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.context,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=d_ff,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            tie_word_embeddings=cfg.tie_embeddings,
            **special,
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=d_ff,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        max_position_embeddings=cfg.context,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        rms_norm_eps=1e-5,
        **special,
    )


def new_model(cfg: PretrainConfig, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> nn.Module:
    """A freshly initialised causal LM (seed torch first for reproducible weights)."""
    model = AutoModelForCausalLM.from_config(
        model_config(cfg, vocab_size, bos_id, eos_id, pad_id), attn_implementation="sdpa"
    )
    # Generation stops at eos and stays inside the trained window (GPT-2's positions end there).
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, max_length=cfg.context
    )
    return model


def build_model(cfg: PretrainConfig, tokenizer) -> nn.Module:
    """The model `cfg` describes, with the tokenizer's vocabulary and bos/eos/pad ids (a GPT-2 config
    would otherwise keep 50256). eos doubles as bos or pad where the tokenizer has none."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return new_model(cfg, len(tokenizer), bos, eos, pad)


def matmul_params(model: nn.Module) -> int:
    """Weights used in a matrix multiply for every token: the linear layers and the output head, even
    when tied to the embedding (the lookup itself is free). The N of the 6N FLOPs-per-token rule."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)))


def train_flops_per_token(n_matmul: int, cfg: PretrainConfig) -> float:
    # 6N for the weight matmuls (forward + backward), plus attention's QK^T and AV over the window:
    # 12 x layers x width x context, the PaLM / nanoGPT convention (no discount for the causal mask).
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * cfg.context


# ---------------------------------------------------------------- optimisation
def lr_multiplier(step: int, train_seconds: float, cfg: PretrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from 1 to min_lr_ratio over the run's horizon:
    max_steps, or fewer when the pace so far would not reach max_steps within max_minutes, so a
    time-bound run still ends annealed. A run on pace for max_steps follows the steps alone, so
    its LR (and result) does not depend on timing."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    horizon = float(cfg.max_steps)
    if train_seconds > 0 and step * cfg.max_minutes * 60 / train_seconds < horizon:
        horizon = step * cfg.max_minutes * 60 / train_seconds  # the steps the budget allows at this pace
    progress = min(1.0, (step - cfg.warmup_steps) / max(1.0, horizon - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    # Decay the matrices only, not norms and biases (the nanoGPT / Llama recipe); the fused kernel
    # is one launch per step on a GPU.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


# ---------------------------------------------------------------- checkpoints / resume
def fingerprint(cfg: PretrainConfig, seed: int, tokens_dir: Path, tokenizer_dir: Path) -> str:
    """What must match for a checkpoint to be resumed: the pretrain section, the seed, the data
    (meta.json holds each split's token and byte counts) and the tokenizer."""
    return resume.fingerprint(cfg, seed, [tokens_dir / "meta.json", *sorted(tokenizer_dir.glob("*.json"))])


# ---------------------------------------------------------------- trainer
def training_args(cfg: PretrainConfig, seed: int, output_dir: Path) -> TrainingArguments:
    """The shared arguments (tasks/training.py) plus pretrain's own: its clipping, accumulation and
    compile settings, and less per-step overhead (the NaN/inf filter syncs the device every step;
    evaluation needs the loss only)."""
    return training.training_args(
        output_dir,
        seed=seed,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        eval_every=cfg.eval_every,
        save_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        precision=cfg.precision,
        gradient_accumulation_steps=cfg.grad_accum,
        max_grad_norm=cfg.grad_clip,  # 0 = no clipping
        torch_compile=cfg.compile,
        logging_nan_inf_filter=False,
        prediction_loss_only=True,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
    )


def make_trainer(
    cfg: PretrainConfig,
    seed: int,
    model: nn.Module,
    train_set,
    eval_set,
    output_dir: Path,
    clock: TrainingClock,
    tokenizer=None,
) -> Trainer:
    """The Trainer the stage and the benchmarks share: our AdamW, the budget-aware schedule, the clock."""
    optimizer = build_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, clock.seconds(), cfg))
    return training.make_trainer(
        "pretrain",
        training_args(cfg, seed, output_dir),
        clock,
        model=model,
        data_collator=collate_windows,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        optimizers=(optimizer, schedule),
    )


def load_tokenizer(tokenizer_dir: Path, meta: dict, tokens_dir: Path):
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise LmlineError(f"{tokenizer_dir}: no tokenizer.json; run the tokenize stage first (dvc repro tokenize)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) != meta["vocab_size"]:
        raise LmlineError(
            f"{tokens_dir / 'meta.json'}: vocab_size {meta['vocab_size']} does not match the tokenizer in "
            f"{tokenizer_dir} ({len(tokenizer)} tokens): re-run the tokenize stage"
        )
    return tokenizer


def check_compile_possible(cfg: PretrainConfig) -> None:
    """On a CPU, torch.compile (inductor) builds C++ kernels at the first step; without a compiler that
    step fails deep inside torch. Say so up front, naming the key."""
    if not cfg.compile or torch.cuda.is_available():
        return
    compiler = os.environ.get("CXX") or "g++"  # what inductor looks for on Linux
    if shutil.which(compiler) is None:
        raise LmlineError(
            f"pretrain.compile: torch.compile on a CPU needs a C++ compiler and {compiler!r} is not on PATH: "
            "install g++ (or set CXX) or set pretrain.compile: false"
        )


def train(cfg: PretrainConfig, seed: int, inputs: dict[str, Path], ckpt_dir: Path) -> tuple[Trainer, dict, list[dict]]:
    """Train, resuming from `ckpt_dir` when it holds a matching checkpoint. Returns the Trainer (its
    model trained), the metrics and the loss-history rows. Writes nothing outside `ckpt_dir`."""
    check_compile_possible(cfg)
    tokens_dir, tokenizer_dir = Path(inputs["tokens"]), Path(inputs["tokenizer"])
    meta = read_meta(tokens_dir)
    train_tokens = load_split(tokens_dir, meta, "train", cfg.context)
    val_tokens = load_split(tokens_dir, meta, "val", cfg.context)
    tokenizer = load_tokenizer(tokenizer_dir, meta, tokens_dir)

    with (
        resume.processes().main_process_first()
    ):  # several processes (launch_distributed): rank 0 decides, then the rest
        resume_from = resume_point(ckpt_dir, fingerprint(cfg, seed, tokens_dir, tokenizer_dir))
    start_step = checkpoint_step(resume_from) if resume_from else 0
    clock = TrainingClock.resumed(cfg.max_minutes * 60, resume_from, logger=log)

    # Killed after its last checkpoint: nothing is left to train, so load that checkpoint as it is.
    finished = resume.finished(resume_from, cfg.max_steps, clock.budget_s)
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resume_from) if finished else build_model(cfg, tokenizer)
    val_windows = TokenWindows(val_tokens, cfg.context, stride=cfg.context)
    trainer = make_trainer(
        cfg,
        seed,
        model,
        train_set=TokenWindows(train_tokens, cfg.context, stride=1),
        eval_set=TokenWindows(val_tokens, cfg.context, stride=cfg.context, limit=cfg.eval_batches * cfg.batch_size),
        output_dir=ckpt_dir,
        clock=clock,
        tokenizer=tokenizer,
    )
    if resume_from:
        log.info("resuming from %s (%.1f s already trained)", resume_from, clock.already_s)
    if finished:
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds, total_seconds = clock.this_attempt(), clock.seconds()
    log_history = list(trainer.state.log_history)  # before evaluate() adds a row of its own
    val_loss = trainer.evaluate(eval_dataset=val_windows, metric_key_prefix="val")["val_loss"]

    steps = trainer.state.global_step
    metrics = training_metrics(
        cfg,
        meta,
        model,
        log_history,
        steps=steps,
        start_step=start_step,
        seconds=seconds,
        total_seconds=total_seconds,
        val_loss=val_loss,
        val_windows=len(val_windows),
        devices=trainer.args.world_size,
        stopped_by=training.stopped_by(steps, cfg.max_steps, clock),
    )
    return trainer, metrics, training.loss_history(log_history, final={"step": steps, "val_loss": val_loss})


def training_metrics(
    cfg: PretrainConfig,
    meta: dict,
    model: nn.Module,
    log_history: list[dict],
    *,
    steps: int,
    start_step: int,
    seconds: float,
    total_seconds: float,
    val_loss: float,
    val_windows: int,
    devices: int,
    stopped_by: str,
) -> dict:
    """The stage's metrics. Speed counts this attempt only (0 when a resumed run had nothing left)."""
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.context * devices
    tokens_per_s = (steps - start_step) * tokens_per_step / seconds if seconds > 0 else 0.0
    flops_per_token = train_flops_per_token(matmul_params(model), cfg)
    train_losses = [e["loss"] for e in log_history if "loss" in e]
    return {
        "train_loss": round(train_losses[-1], 6) if train_losses else None,  # mean of the last log_every steps
        "val_loss": round(val_loss, 6),
        "val_perplexity": round(math.exp(val_loss), 4),
        "val_bits_per_byte": round(val_loss / math.log(2) / meta["bytes_per_token"]["val"], 6),
        "val_windows": val_windows,
        "tokens_seen": steps * tokens_per_step,
        "tokens_per_second": round(tokens_per_s, 1),
        "train_seconds": round(total_seconds, 3),
        "parameters": model.num_parameters(),
        "steps": steps,
        "resumed_from_step": start_step,
        "stopped_by": stopped_by,
        "mfu": round(flops_per_token * tokens_per_s / (cfg.peak_flops * devices), 6),
        "flops_per_token": flops_per_token,
        "precision": training.pick_precision(cfg.precision),
        "devices": devices,
    }


def run(cfg: PretrainConfig, seed: int, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    hf_logging.disable_progress_bar()  # no tqdm bars in DVC / Prefect logs
    ckpt_dir = Path(outputs["checkpoints"])
    trainer, metrics, history = train(cfg, seed, inputs, ckpt_dir)
    if trainer.is_world_process_zero():
        with atomic_path(outputs["model"]) as tmp:
            trainer.model.save_pretrained(tmp)  # safetensors + config + generation config
            trainer.processing_class.save_pretrained(tmp)
        training.write_loss_csv(Path(outputs["loss"]), history)
        # The checkpoints stay until the shell has logged the run too (lmline.stage_process.run_dvc_stage deletes them).
    return metrics
