"""The six stages and the facts about each that the rest of lmline reads: one table, one place.

Names here are the DVC stage names, the Prefect task names and the MLflow run names alike.
Anything that differs by stage (which params it reads, where it runs, what it registers, which of
its metrics a person looks at first) is a column of this table, not an `if stage == ...` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pool = Literal["cpu", "gpu"]
ModelKind = Literal["base", "task"]


@dataclass(frozen=True)
class Stage:
    name: str
    # The params.yaml keys its run() reads, exactly dvc.yaml's `params:` for the stage (a test keeps
    # the three in step): the section of the same name, and the project seed where the stage's training is random (clean
    # has a seed of its own, clean.seed: the splits must not move when the training seed does).
    params: tuple[str, ...]
    pool: Pool  # where it runs in distributed mode unless orchestration.pools says otherwise
    key_metrics: tuple[str, ...]  # the figures the run summary and the Prefect artifacts show first
    model: ModelKind | None = None  # the registered model its output is: <project>-base or <project>-<task>
    retries: int = 0  # default retries for transient failures (orchestration.retries overrides)

    @property
    def section(self) -> str:
        return self.params[0]

    @property
    def uses_seed(self) -> bool:
        return SEED_KEY in self.params


SEED_KEY = "project.seed"

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        # mb_per_s: input MB over the whole stage process (lmline.stage_process.throughput), one definition
        Stage("ingest", ("ingest",), "cpu", ("documents", "mb_per_s")),
        Stage("clean", ("clean",), "cpu", ("docs_out", "mb_per_s")),
        Stage("tokenize", ("tokenize", SEED_KEY), "cpu", ("vocab_size", "splits.train.bytes_per_token", "mb_per_s")),
        Stage(
            "pretrain",
            ("pretrain", SEED_KEY),
            "gpu",
            ("val_bits_per_byte", "tokens_per_second"),
            model="base",
            retries=1,
        ),
        Stage(
            "finetune",
            ("finetune", SEED_KEY),
            "gpu",
            ("val_accuracy", "val_macro_f1", "val_perplexity"),
            model="task",
            retries=1,
        ),
        Stage(
            "evaluate",
            ("evaluate", SEED_KEY),
            "gpu",
            ("task.accuracy", "task.macro_f1", "task.test_bits_per_byte", "lm.test_bits_per_byte"),
        ),
    )
}
NAMES = tuple(STAGES)  # pipeline order
REGISTERED = tuple(name for name, stage in STAGES.items() if stage.model)  # stages whose model goes to the registry

# The transformers pipeline a registered model serves, by finetune.task (the base model generates text).
PIPELINE_TASK = {"causal-lm": "text-generation", "classification": "text-classification"}


def model_name(project: str, kind: ModelKind, task: str) -> str:
    """Registry name of the base model or the fine-tuned task model."""
    return f"{project}-base" if kind == "base" else f"{project}-{task}"


def pipeline_task(kind: ModelKind, task: str) -> str:
    return PIPELINE_TASK["causal-lm" if kind == "base" else task]


# The stage whose test-split metrics the promotion gate reads: the flow promotes only when it ran.
GATE_STAGE = "evaluate"
# The stage whose output each registered model is (Stage.model, the other way round).
MODEL_STAGE: dict[ModelKind, str] = {stage.model: name for name, stage in STAGES.items() if stage.model}
# In distributed mode the stages mapped to this pool run on its worker (the run-stage deployment).
ROUTED_POOL: Pool = "gpu"
