"""Typed, validated params: the one way every stage, the CLI, the flows and the tests read params.yaml.

`load(path, overrides)` returns a `Params`; any unknown key or bad value raises `ConfigError` with a
one-line message naming the file and the dotted key, before any stage does work, e.g.
`params.yaml: clean.min_chars must be >= 0 (got -5)`.

The ingest and clean sections live in lmline.sources and lmline.clean_config; the rest are here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from lmline.clean_config import CleanConfig
from lmline.errors import LmlineError
from lmline.section import SLUG, Section
from lmline.sources import SOURCE_TYPES, IngestConfig, SampleSource
from lmline.stages import NAMES as STAGES
from lmline.stages import STAGES as STAGE_FACTS


class ConfigError(LmlineError):
    """A params file that cannot be used; the message names the file and key."""


# ---------------------------------------------------------------- project / paths
class ProjectConfig(Section):
    name: Annotated[str, Field(pattern=SLUG)] = "lmline"
    """registered models: <name>-base, <name>-<task>"""
    experiment: str = "lmline"
    """MLflow experiment"""
    seed: int = 1337
    """seeds init, sampling and data order: same data + params + seed, same metrics"""


class PathsConfig(Section):
    """Workspace layout. dvc.yaml interpolates these (${paths.raw}), so code and DVC agree by construction.
    Each is a folder or file inside the workspace, apart from every other one and from .git and .dvc:
    stages replace their outputs whole, so an output on top of the corpus would delete it."""

    raw: str = "data/raw"
    """ingest's output: one JSONL file per source"""
    clean: str = "data/clean"
    """clean's output: <role>/{train,val,test}.parquet"""
    tokenizer: str = "data/tokenizer"
    """tokenize's Hugging Face fast tokenizer"""
    tokens: str = "data/tokens"
    """tokenize's packed token ids, {split}.bin + meta.json"""
    pretrain_model: str = "models/pretrain"
    """pretrain's model (safetensors + tokenizer)"""
    finetune_model: str = "models/finetune"
    """finetune's model"""
    corpus: str = "corpus"
    """local source files live here: ingest's DVC dep, so DVC sees them change"""
    checkpoints: str = "checkpoints"
    """not a DVC out: survives a failed run so training can resume"""
    metrics: str = "metrics"
    """one <stage>.json per stage (DVC metrics)"""
    plots: str = "plots"
    """the CSVs dvc.yaml's plots draw"""
    reports: str = "reports"
    """samples, model cards"""


# Top-level names a paths.* value must never be or lie inside: git's and DVC's own state, and the
# files and code that define the pipeline (a stage replaces its output whole).
RESERVED_PATHS = (".git", ".dvc", "params.yaml", "dvc.yaml", "dvc.lock", "lmline", "tasks", "flows")


def check_paths(paths: PathsConfig) -> None:
    """Raise ValueError, naming the key, for a paths.* value that a stage's output could lose data
    through: outside the workspace, the workspace itself, a reserved name, or overlapping another."""
    parts: dict[str, tuple[str, ...]] = {}
    for key, value in paths.model_dump().items():
        pure = PurePosixPath(value)
        if pure.is_absolute() or value.startswith("~"):
            raise ValueError(f"paths.{key} must be relative to the workspace (got {value!r})")
        if ".." in pure.parts:
            raise ValueError(f"paths.{key} must stay inside the workspace, without '..' (got {value!r})")
        norm = tuple(p for p in pure.parts if p != ".")
        if not norm:
            raise ValueError(
                f"paths.{key} must name a folder inside the workspace, not the workspace itself (got {value!r})"
            )
        if norm[0] in (".git", ".dvc"):
            raise ValueError(f"paths.{key} must not be .git or .dvc or lie inside them (got {value!r})")
        if norm[0] in RESERVED_PATHS:
            raise ValueError(
                f"paths.{key} must not be {norm[0]} or lie inside it: the pipeline needs it (got {value!r})"
            )
        parts[key] = norm
    defaults = PathsConfig().model_dump()
    keys = list(parts)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            shorter = min(len(parts[a]), len(parts[b]))
            if parts[a][:shorter] != parts[b][:shorter]:
                continue
            # Name the key the user most likely got wrong: the one changed from its default, else the
            # one that is not the corpus (it holds their data), else the later one.
            a_changed, b_changed = getattr(paths, a) != defaults[a], getattr(paths, b) != defaults[b]
            if a_changed != b_changed:
                blamed, other = (a, b) if a_changed else (b, a)
            else:
                blamed, other = (a, b) if b == "corpus" else (b, a)
            got = getattr(paths, blamed)
            if len(parts[blamed]) >= len(parts[other]):
                raise ValueError(f"paths.{blamed} must not be paths.{other} or lie inside it (got {got!r})")
            raise ValueError(f"paths.{blamed} must not contain paths.{other} ({getattr(paths, other)!r}) (got {got!r})")


# ---------------------------------------------------------------- tokenize
class TokenizeConfig(Section):
    vocab_size: Annotated[int, Field(ge=260, le=1 << 20)] = 1024
    """>= 256 bytes + special tokens"""
    min_frequency: Annotated[int, Field(ge=1)] = 2
    """a merge must occur at least this often in the sample"""
    eos_token: Annotated[str, Field(min_length=1)] = "<|endoftext|>"
    """also bos: documents are packed after one"""
    pad_token: Annotated[str, Field(min_length=1)] = "<pad>"
    """pads batches; never trained on"""
    num_proc: Annotated[int, Field(ge=0)] = 0
    """threads (Arrow, Rust); 0 = one per CPU core"""
    train_sample_mb: Annotated[float, Field(gt=0)] | None = 4.0
    """the BPE trains on a seeded sample of about this many MB of the train split; null = all of it"""
    mix: dict[str, Annotated[float, Field(ge=0, le=100)]] = {}
    """weight of each source's train-split documents in the packed train split (domain-adaptive pretraining):
    w copies of each document, the fraction w - floor(w) as a seeded subset. Pretrain-role sources default
    to 1; a finetune-role source is packed only when given a weight > 0, and only its train split (its
    labels dropped; never val/test, so pretrain's val/test stay the pretrain role's). Seeded by project.seed"""


# ---------------------------------------------------------------- pretrain
class PretrainConfig(Section):
    arch: Literal["llama", "gpt2"] = "llama"
    """llama (RoPE, RMSNorm, SwiGLU) | gpt2"""
    n_layer: Annotated[int, Field(ge=1)] = 2
    """transformer blocks"""
    n_head: Annotated[int, Field(ge=1)] = 4
    """attention heads"""
    n_kv_head: Annotated[int, Field(ge=1)] | None = None
    """None = n_head (no grouped-query attention)"""
    d_model: Annotated[int, Field(ge=8)] = 128
    """width: embedding and hidden size"""
    d_ff: Annotated[int, Field(ge=8)] | None = None
    """None = architecture default"""
    context: Annotated[int, Field(ge=8)] = 128
    """tokens per training window; the model's maximum input"""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """dropout probability (0 = none: short runs do not overfit)"""
    tie_embeddings: bool = True
    """share the input embedding and output projection weights"""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """per device: the global batch is batch_size × grad_accum × devices"""
    grad_accum: Annotated[int, Field(ge=1)] = 1
    """micro-batches per optimizer step"""
    lr: Annotated[float, Field(gt=0)] = 3e-3
    """peak learning rate (AdamW)"""
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    """cosine decay ends at lr × this"""
    warmup_steps: Annotated[int, Field(ge=0)] = 200
    """linear warm-up steps"""
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    """AdamW weight decay on matrices (not norms or biases)"""
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    """clip the gradient norm to this; 0 = no clipping"""
    max_steps: Annotated[int, Field(ge=1)] = 20000
    """step budget; training stops at this or max_minutes"""
    max_minutes: Annotated[float, Field(gt=0)] = 2.5
    """training-time budget; training stops at whichever comes first"""
    eval_every: Annotated[int, Field(ge=1)] = 200
    """steps between validation losses"""
    eval_batches: Annotated[int, Field(ge=1)] = 20
    """validation batches per evaluation during training"""
    log_every: Annotated[int, Field(ge=1)] = 20
    """train-loss rows in the loss CSV / MLflow history"""
    checkpoint_every: Annotated[int, Field(ge=1)] = 200
    """steps between resumable checkpoints"""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that has it, else fp32"""
    compile: bool = False
    """torch.compile the model (on a CPU: C++ kernels, needs g++ or $CXX; compiling counts in max_minutes)"""
    peak_flops: Annotated[float, Field(gt=0)] = 2.0e11
    """for the MFU estimate; set to your hardware's peak"""
    devices: Annotated[int, Field(ge=1)] = 1
    """processes (GPUs) the stage trains on; > 1 relaunches it as N local processes (DDP)"""

    @model_validator(mode="after")
    def _shapes(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv})")
        if self.arch == "gpt2" and kv != self.n_head:
            raise ValueError("n_kv_head (grouped-query attention) needs arch: llama")
        return self


# ---------------------------------------------------------------- finetune
class FinetuneConfig(Section):
    task: Literal["classification", "causal-lm"] = "classification"
    """classification | causal-lm (continued next-token training)"""
    source: str | None = None
    """a finetune-role source name; None = the only one"""
    mask_prompt: bool = False
    """causal-lm: no loss on text before `prompt_separator`"""
    prompt_separator: str = "\n### Response:\n"
    """causal-lm with mask_prompt: where the prompt ends"""
    max_length: Annotated[int, Field(ge=8)] = 128
    """tokens per example (capped at the model's context)"""
    batch_size: Annotated[int, Field(ge=1)] = 32
    """examples per step and device: the global batch is batch_size × devices"""
    lr: Annotated[float, Field(gt=0)] = 5e-4
    """peak learning rate (cosine schedule)"""
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    """AdamW weight decay"""
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    """linear warm-up steps"""
    max_steps: Annotated[int, Field(ge=1)] = 1200
    """step budget"""
    max_minutes: Annotated[float, Field(gt=0)] = 3.0
    """training-time budget (evaluation and checkpoints excluded), summed over resumed attempts"""
    eval_every: Annotated[int, Field(ge=1)] = 100
    """also the checkpoint interval (the best one is kept)"""
    early_stopping_patience: Annotated[int, Field(ge=1)] = 3
    """evals without a better val metric"""
    pooling: Literal["last", "mean"] = "last"
    """classification: the class read out at the example's last token (transformers' own
    *ForSequenceClassification), or from the mean of its final hidden states (tasks/pooling.py)"""
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """the Trainer's label_smoothing_factor: targets (1 - ε) on the label, ε spread over all classes"""
    group_by_length: bool = False
    """batches of examples of similar length (the Trainer's group_by_length sampler): less padding per step"""
    devices: Annotated[int, Field(ge=1)] = 1
    """processes (GPUs) the stage trains on; > 1 relaunches it as N local processes (DDP)"""

    @model_validator(mode="after")
    def _evals_happen(self):
        if self.eval_every > self.max_steps:
            raise ValueError(f"eval_every ({self.eval_every}) must be <= max_steps ({self.max_steps})")
        return self


# ---------------------------------------------------------------- evaluate
class EvaluateConfig(Section):
    prompts: list[str] = ["ROMEO:", "The president said", "This movie"]
    """prompts of the sample generations (reports/samples.txt)"""
    max_new_tokens: Annotated[int, Field(ge=1)] = 60
    """tokens generated per prompt"""
    temperature: Annotated[float, Field(gt=0)] = 0.8
    """sampling temperature"""
    top_k: Annotated[int, Field(ge=0)] = 40
    """sample among the k likeliest tokens; 0 = no cut"""
    max_eval_tokens: Annotated[int, Field(ge=1)] | None = None
    """cap the LM test tokens (None = all)"""
    batch_size: Annotated[int, Field(ge=1)] = 32
    """windows or examples per forward pass"""
    tfidf_max_ngram: Annotated[int, Field(ge=1, le=3)] = 2
    """baseline: word 1..n-grams"""
    logreg_c: Annotated[float, Field(gt=0)] = 1.0
    """baseline: inverse regularisation strength"""


# ---------------------------------------------------------------- promote
TASK_METRICS = {  # the promote.metric values that fit each finetune.task; the first is what `auto` means
    "classification": ("macro_f1", "accuracy"),
    "causal-lm": ("bits_per_byte",),
}
LOWER_IS_BETTER = {"bits_per_byte"}


class PromoteConfig(Section):
    metric: Literal["auto", "accuracy", "macro_f1", "bits_per_byte"] = "auto"
    """test-split metric a candidate must beat the champion on; auto = by finetune.task: macro_f1 for
    classification, bits_per_byte (of the fine-tuned model on the finetune source's test text; lower is
    better) for causal-lm"""
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    """by at least this much"""
    max_bpb_regression: Annotated[float, Field(ge=0)] = 0.05
    """guard on the base model's bits per byte"""

    def resolved(self, task: str) -> "PromoteConfig":
        """This config with `auto` replaced by the metric it means for `task`."""
        return self if self.metric != "auto" else self.model_copy(update={"metric": TASK_METRICS[task][0]})


# ---------------------------------------------------------------- orchestration (Prefect)
class WorkPoolsConfig(Section):
    """Prefect work pool names; `lmline deploy` creates missing ones as process pools."""

    cpu: Annotated[str, Field(min_length=1)] = "cpu"
    """runs the retrain flow (and so the stages routed to cpu)"""
    gpu: Annotated[str, Field(min_length=1)] = "gpu"
    """runs the run-stage deployment"""
    gpu_devices: Annotated[str, Field(pattern=r"^\d+(,\d+)*$")] = "0"
    """the gpu pool's CUDA_VISIBLE_DEVICES, set in its default env when `lmline deploy` creates it as a
    process pool"""


class ScheduleConfig(Section):
    cron: Annotated[str, Field(pattern=r"^\S+( \S+){4}$")] = "0 3 * * 1"
    """five cron fields; Mondays 03:00"""
    timezone: str = "UTC"
    """IANA time zone of the cron schedule"""
    active: bool = True
    """whether the schedule starts runs"""

    @model_validator(mode="after")
    def _known_timezone(self):
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not an IANA time zone (e.g. UTC, Europe/Paris)") from None
        return self


class TriggerConfig(Section):
    enabled: bool = True
    """`lmline data add` events start a retrain without waiting for the schedule"""
    quiet_seconds: Annotated[int, Field(ge=10)] = 60
    """one retrain per burst: it starts once no lmline.data.updated event has come for this long
    (at least 10: Prefect's minimum for a Proactive trigger's window)"""


class OrchestrationConfig(Section):
    retries: dict[str, Annotated[int, Field(ge=0)]] = {
        name: stage.retries for name, stage in STAGE_FACTS.items() if stage.retries
    }
    """retries per stage, for transient failures"""
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 2.0
    """wait before a retry"""
    mode: Literal["local", "distributed"] = "local"
    """local: every stage runs in this workspace. distributed: stages mapped to gpu in `pools` run as runs
    of the run-stage deployment on the gpu work pool, in that worker's clone (docs/production.md)"""
    work_pools: WorkPoolsConfig = WorkPoolsConfig()
    """Prefect work pool names"""
    pools: dict[str, Literal["cpu", "gpu"]] = {name: stage.pool for name, stage in STAGE_FACTS.items()}
    """the pool (cpu or gpu) each stage runs on in distributed mode; a stage left out runs on cpu"""
    branch: Annotated[str, Field(min_length=1)] = "main"
    """what a scheduled retrain checks out on its worker"""
    schedule: ScheduleConfig = ScheduleConfig()
    """when the retrain deployment runs"""
    trigger: TriggerConfig = TriggerConfig()
    """retrain when `lmline data add` announces new data"""

    @model_validator(mode="after")
    def _known_stages(self):
        unknown = sorted((set(self.retries) | set(self.pools)) - set(STAGES))
        if unknown:
            raise ValueError(f"retries/pools name unknown stages {unknown} (stages: {', '.join(STAGES)})")
        return self

    def pool_of(self, stage: str) -> str:
        return self.pools.get(stage, "cpu")


class Params(Section):
    """The whole params.yaml: one section per stage plus project, paths, promote and orchestration."""

    project: ProjectConfig = ProjectConfig()
    """names and the seed"""
    paths: PathsConfig = PathsConfig()
    """workspace layout"""
    ingest: IngestConfig
    """the sources"""
    clean: CleanConfig = CleanConfig()
    """normalisation, filters, de-duplication, PII, split"""
    tokenize: TokenizeConfig = TokenizeConfig()
    """the byte-level BPE tokenizer"""
    pretrain: PretrainConfig = PretrainConfig()
    """the base language model and its training budget"""
    finetune: FinetuneConfig = FinetuneConfig()
    """adapting the base model to the task"""
    evaluate: EvaluateConfig = EvaluateConfig()
    """test metrics, baselines and samples"""
    promote: PromoteConfig = PromoteConfig()
    """the promotion gate"""
    orchestration: OrchestrationConfig = OrchestrationConfig()
    """Prefect: retries, work pools, schedule, data trigger"""

    @model_validator(mode="after")
    def _cross_refs(self):
        check_paths(self.paths)  # first: every check below reads paths
        corpus = Path(self.paths.corpus).parts
        for i, source in enumerate(self.ingest.sources):
            if isinstance(source, SampleSource):
                continue
            parts = Path(os.path.normpath(source.path)).parts
            if Path(source.path).is_absolute() or ".." in parts or parts[: len(corpus)] != corpus:
                raise ValueError(
                    f"ingest.sources[{i}].path must lie inside paths.corpus ({self.paths.corpus}/), which dvc.yaml "
                    f"declares as ingest's dependency so DVC sees the files change (got {source.path!r})"
                )
        names = {s.name for s in self.ingest.sources}
        for src in self.clean.filters:
            if src not in names:
                raise ValueError(f"clean.filters.{src} names no source in ingest.sources")
        for src in self.tokenize.mix:
            if src not in names:
                raise ValueError(f"tokenize.mix.{src} names no source in ingest.sources")
        ft = [s.name for s in self.ingest.sources if s.role == "finetune"]
        if self.finetune.source is not None and self.finetune.source not in ft:
            raise ValueError(f"finetune.source {self.finetune.source!r} is not a finetune-role source ({ft})")
        orch = self.orchestration
        if orch.mode == "distributed":
            gpus = len(orch.work_pools.gpu_devices.split(","))
            for name in ("pretrain", "finetune"):
                devices = self.section(name).devices
                if orch.pool_of(name) == "gpu" and devices > gpus:
                    raise ValueError(
                        f"{name}.devices ({devices}) exceeds the GPUs the gpu pool gives a stage: "
                        f"orchestration.work_pools.gpu_devices lists {gpus} ({orch.work_pools.gpu_devices!r})"
                    )
        fits = TASK_METRICS[self.finetune.task]
        if self.promote.metric not in ("auto", *fits):
            raise ValueError(
                f"promote.metric {self.promote.metric!r} does not fit finetune.task {self.finetune.task!r} "
                f"(use auto or one of {', '.join(fits)})"
            )
        return self

    def section(self, name: str) -> BaseModel:
        return getattr(self, name)


# ---------------------------------------------------------------- loading
def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["pretrain.lr=1e-3", ...]` (like `dvc exp run -S`) -> {"pretrain.lr": 0.001}; values parsed as YAML."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {p} is not a section")
        node[leaf] = value
    return raw


def _dotted(loc: tuple) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts[-1] += f"[{item}]" if parts else f"[{item}]"
        elif item in SOURCE_TYPES and i > 0 and isinstance(loc[i - 1], int):
            continue  # the discriminator tag pydantic adds for tagged unions
        elif "[" in str(item) or "," in str(item):
            continue  # pydantic's union-member labels such as 'function-after[...]'
        else:
            parts.append(str(item))
    return ".".join(parts)


def _describe(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {bound}"
    if kind == "extra_forbidden":
        return "is not a known key"
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "union_tag_invalid":
        return f"has an unknown type (expected one of {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        return f"needs a `{ctx.get('discriminator', 'type').strip(chr(39))}` key"
    if kind == "string_pattern_mismatch":
        return "must be lowercase letters, digits, '-' or '_'"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")[:1].lower() + msg.removeprefix("Value error, ")[1:]


def format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    key = _dotted(err["loc"])
    desc = _describe(err)
    got = "" if err["type"] in ("missing", "extra_forbidden") or "input" not in err else err["input"]
    shown = f" (got {got!r})" if got != "" and not isinstance(got, dict) else ""
    more = f" [+{exc.error_count() - 1} more]" if exc.error_count() > 1 else ""
    sep = ": " if err["type"] == "value_error" else " "  # a rule about the section, not one key
    return f"{source}: {key + sep if key else ''}{desc}{shown}{more}"


def load(params_path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None) -> Params:
    path = Path(params_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    raw = apply_overrides(raw, parse_overrides(overrides))
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_error(path.name, exc)) from None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params -> {"pretrain.lr": 0.003, ...} for MLflow params and DVC-style display."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


def slug_ok(name: str) -> bool:
    return re.match(SLUG, name) is not None


def stage_io(params: Params, stage: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """What each stage reads and writes, from params.paths. dvc.yaml declares the same paths through
    ${paths.*} interpolation, and tests/test_dvc_yaml.py checks the two agree."""
    p = params.paths
    raw, clean, tok, tokens = Path(p.raw), Path(p.clean), Path(p.tokenizer), Path(p.tokens)
    base, tuned, plots, reports = Path(p.pretrain_model), Path(p.finetune_model), Path(p.plots), Path(p.reports)
    io = {
        "ingest": ({"corpus": Path(p.corpus)}, {"raw": raw}),
        "clean": ({"raw": raw}, {"clean": clean, "drops": plots / "clean_drops.csv"}),
        "tokenize": ({"clean": clean}, {"tokenizer": tok, "tokens": tokens}),
        "pretrain": (
            {"tokenizer": tok, "tokens": tokens},
            {"model": base, "loss": plots / "pretrain_loss.csv", "checkpoints": Path(p.checkpoints) / "pretrain"},
        ),
        "finetune": (
            {"model": base, "clean": clean},
            {"model": tuned, "loss": plots / "finetune_loss.csv", "checkpoints": Path(p.checkpoints) / "finetune"},
        ),
        "evaluate": (
            {"base": base, "tuned": tuned, "clean": clean, "tokens": tokens},
            {"confusion": plots / "confusion.csv", "samples": reports / "samples.txt"},
        ),
    }
    if stage not in io:
        raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    return io[stage]


def metrics_path(params: Params, stage: str) -> Path:
    return Path(params.paths.metrics) / f"{stage}.json"


def stage_args(params: Params, stage: str) -> dict[str, Any]:
    """The arguments a stage's run() takes from params: its own section as `cfg`, and `seed` where
    lmline.stages says the stage reads project.seed. Nothing else reaches a stage."""
    if stage not in STAGE_FACTS:
        raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    facts = STAGE_FACTS[stage]
    args: dict[str, Any] = {"cfg": getattr(params, facts.section)}
    if facts.uses_seed:
        args["seed"] = params.project.seed
    return args
