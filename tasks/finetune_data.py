"""The finetune-role data: the clean stage's finetune/{train,val,test}.parquet, the source a run uses,
its labels, and the classification scores. Shared by finetune (training), evaluate (test scores and
baselines) and the scoring flow, so each reads the data and counts a hit the same way.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from lmline.errors import LmlineError

ROLE = "finetune"  # the clean stage's directory for finetune-role sources


# ---------------------------------------------------------------- data
def split_path(clean_dir: Path, split: str) -> Path:
    return Path(clean_dir) / ROLE / f"{split}.parquet"


def read_rows(clean_dir: Path, split: str) -> list[dict]:
    path = split_path(clean_dir, split)
    if not path.exists():
        raise LmlineError(f"{path}: no finetune-role data (add an ingest source with role: finetune)")
    return pq.read_table(path).to_pylist()


def pick_source(rows: list[dict], wanted: str | None, path: Path) -> str:
    """The finetune source to train on: the configured one, or the only one present."""
    present = sorted({r["source"] for r in rows})
    if wanted is not None:
        if wanted not in present:
            raise LmlineError(f"{path}: no rows from finetune.source {wanted!r} (sources here: {present})")
        return wanted
    if len(present) != 1:
        raise LmlineError(f"{path}: {len(present)} finetune-role sources {present}: set finetune.source")
    return present[0]


def source_rows(clean_dir: Path, split: str, source: str) -> list[dict]:
    rows = [r for r in read_rows(clean_dir, split) if r["source"] == source]
    if not rows:
        raise LmlineError(f"{split_path(clean_dir, split)}: no rows from source {source!r}")
    return rows


def label_set(rows: list[dict], path: Path) -> list[str]:
    """Sorted labels of a training split; every row must have one and there must be two or more."""
    if not rows or "label" not in rows[0]:
        raise LmlineError(f"{path}: no `label` column (classification needs labels; or set finetune.task: causal-lm)")
    unlabelled = [r["id"] for r in rows if r["label"] in (None, "")]
    if len(unlabelled) == len(rows):
        raise LmlineError(
            f"{path}: the label column is empty (classification needs labels; or set finetune.task: causal-lm)"
        )
    if unlabelled:
        raise LmlineError(f"{path}: row {unlabelled[0]!r} has no label ({len(unlabelled)} rows without one)")
    labels = sorted({r["label"] for r in rows})
    if len(labels) < 2:
        raise LmlineError(f"{path}: only one label ({labels[0]!r}); classification needs at least two")
    return labels


def label_ids(rows: list[dict], labels: list[str], path: Path) -> list[int]:
    index = {label: i for i, label in enumerate(labels)}
    for r in rows:
        if r.get("label") not in index:
            raise LmlineError(
                f"{path}: row {r['id']!r} has label {r.get('label')!r}, not one of the training labels {labels}"
            )
    return [index[r["label"]] for r in rows]


# ---------------------------------------------------------------- metrics
def classification_metrics(actual: list[int], predicted: list[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all labels (a label never predicted counts as F1 0, not skipped)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(actual, predicted)),
        "macro_f1": float(f1_score(actual, predicted, labels=list(range(n_labels)), average="macro", zero_division=0)),
    }
