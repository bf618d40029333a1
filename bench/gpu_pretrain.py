"""GPU throughput of the pretrain stage's training path (tasks.pretrain: new_model, make_trainer, our
AdamW and schedule) at GPT-2-small scale on synthetic tokens: tokens/s and MFU.

    python bench/gpu_pretrain.py                                  # 12 x 768, context 1024, bf16, compiled
    python bench/gpu_pretrain.py --batch-size 32 --steps 60
    python bench/gpu_pretrain.py --layers 2 --width 64 --heads 2 --context 32 --vocab 256 \\
        --batch-size 4 --steps 6 --warmup-steps 2 --precision fp32 --no-compile   # CPU smoke size

The model is Llama-style (RoPE, RMSNorm, SwiGLU at 8/3 width: 124M parameters with the padded GPT-2
vocabulary of 50304, tied), with SDPA attention (flash kernels in bf16), fused AdamW, TF32 for any
fp32 matmul and torch.compile through the Trainer. Nothing syncs the GPU per step: the loss stays on
the device until a log step, and logging is off here. The first --warmup-steps steps (compilation,
autotuning, allocator growth) are not timed; the timer syncs the device only where it starts and stops.

MFU = FLOPs per token (6 x matmul weights + 12 x layers x width x context: the PaLM / nanoGPT count)
x tokens/s / peak. Peak: the H200 SXM datasheet's dense bf16 figure, 989 TFLOP/s (--peak-tflops);
about 790 TFLOP/s was measured for bf16 matmuls on random data on the lent H200s, which would put
the same run's MFU about 25% higher. Prints JSON; writes bench/results/gpu_pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import lmline  # noqa: E402,F401  (offline switches)
from lmline.config import PretrainConfig  # noqa: E402
from lmline.io import write_json  # noqa: E402
from tasks import pretrain  # noqa: E402

RESULTS = REPO / "bench" / "results" / "gpu_pretrain.json"
H200_BF16_DENSE_TFLOPS = 989.0


class StepTimer(TrainerCallback):
    """Times optimizer steps warmup+1 .. last, syncing the device only at those two points."""

    def __init__(self, warmup_steps: int, last_step: int):
        self.warmup_steps, self.last_step = warmup_steps, last_step
        self.started = self.stopped = None

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            self.started = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last_step:
            self.stopped = self._now()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304, help="GPT-2's 50257 padded to a multiple of 64")
    ap.add_argument("--batch-size", type=int, default=16, help="per device")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps in all, warmup included")
    ap.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first (compilation)")
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.steps <= args.warmup_steps:
        ap.error("--steps must be larger than --warmup-steps")
    hf_logging.disable_progress_bar()

    never = 10**9  # no evaluation, checkpoints or log lines inside the timed steps
    cfg = PretrainConfig(
        arch=args.arch,
        n_layer=args.layers,
        n_head=args.heads,
        d_model=args.width,
        context=args.context,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.steps,
        warmup_steps=args.warmup_steps,
        max_minutes=10**6,
        eval_every=never,
        checkpoint_every=never,
        log_every=never,
        precision=args.precision,
        compile=args.compile,
        peak_flops=args.peak_tflops * 1e12,
    )
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.context
    rng = np.random.default_rng(args.seed)
    synthetic = rng.integers(0, args.vocab, size=max(tokens_per_step * 64, 1 << 22), dtype=np.uint16)

    set_seed(args.seed)
    model = pretrain.new_model(cfg, args.vocab, bos_id=0, eos_id=0, pad_id=1)
    timer = StepTimer(args.warmup_steps, args.steps)
    with tempfile.TemporaryDirectory(prefix="gpu-pretrain-") as tmp:
        trainer = pretrain.make_trainer(
            cfg,
            args.seed,
            model,
            train_set=pretrain.TokenWindows(synthetic, cfg.context, stride=1),
            eval_set=pretrain.TokenWindows(synthetic, cfg.context, stride=cfg.context, limit=cfg.batch_size),
            output_dir=Path(tmp),
            clock=pretrain.TrainingClock(budget_s=float("inf")),
        )
        trainer.add_callback(timer)
        trainer.train()

    devices = trainer.args.world_size
    timed_steps = args.steps - args.warmup_steps
    tokens_per_s = timed_steps * tokens_per_step * devices / (timer.stopped - timer.started)
    flops_per_token = pretrain.train_flops_per_token(pretrain.matmul_params(model), cfg)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "devices": devices,
        "parameters": model.num_parameters(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "steps_timed": timed_steps,
        "seconds_timed": round(timer.stopped - timer.started, 4),
        "tokens_per_second": round(tokens_per_s, 1),
        "flops_per_token": flops_per_token,
        "peak_tflops_per_device": args.peak_tflops,
        "mfu": round(flops_per_token * tokens_per_s / (args.peak_tflops * 1e12 * devices), 6),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    if trainer.is_world_process_zero():
        write_json(args.out, result)
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
