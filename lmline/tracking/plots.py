"""The plots dvc.yaml defines, drawn with matplotlib from the CSVs a stage wrote and logged as PNG
images on the stage's MLflow run (`dvc plots show` draws the same files). The stage code never sees either.
"""

from __future__ import annotations

import csv
from pathlib import Path


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _curves(ax, rows: list[dict], columns: list[str]) -> None:
    for column in columns:
        points = [(float(r["step"]), float(r[column])) for r in rows if r.get(column) not in ("", None)]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=column)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)


def plot_figures(stage: str, outputs: dict) -> dict:
    """The plots dvc.yaml defines, as matplotlib figures named like their CSV: loss curves, the per-rule
    cleaning drops, the confusion matrix. Only from files the stage wrote."""
    if not any(outputs.get(key) and Path(outputs[key]).exists() for key in ("loss", "drops", "confusion")):
        return {}  # nothing to draw (ingest, tokenize): such a stage need not import matplotlib at all
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    figures = {}
    loss = outputs.get("loss")
    if loss and Path(loss).exists():
        rows = _read_csv(Path(loss))
        columns = [c for c in rows[0] if c != "step"] if rows else []
        losses, others = [c for c in columns if c.endswith("loss")], [c for c in columns if not c.endswith("loss")]
        fig, axes = plt.subplots(1, 1 + bool(others), figsize=(6 + 5 * bool(others), 4), squeeze=False)
        _curves(axes[0][0], rows, losses)
        axes[0][0].set_title(f"{stage} loss")
        if others:
            _curves(axes[0][1], rows, others)
            axes[0][1].set_title(f"{stage} validation metrics")
        figures[Path(loss).stem] = fig
    drops = outputs.get("drops")
    if drops and Path(drops).exists():
        rows = _read_csv(Path(drops))
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
        ax.barh([r["bar"] for r in rows], [int(r["dropped"]) for r in rows])
        ax.invert_yaxis()  # first rule on top, as in the CSV
        ax.set_xlabel("documents dropped")
        ax.set_title("cleaning: documents dropped per source and rule")
        figures[Path(drops).stem] = fig
    confusion = outputs.get("confusion")
    rows = _read_csv(Path(confusion)) if confusion and Path(confusion).exists() else []
    if rows:  # causal-lm's evaluate writes the header only: no classes, no matrix
        labels = sorted({r["actual"] for r in rows} | {r["predicted"] for r in rows})
        counts = [[sum(1 for r in rows if r["actual"] == a and r["predicted"] == p) for p in labels] for a in labels]
        fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
        ax.imshow(counts, cmap="Blues")
        darkest = max(max(row) for row in counts)
        for i, row in enumerate(counts):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", color="white" if n > darkest / 2 else "black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title("test confusion matrix")
        figures[Path(confusion).stem] = fig
    return figures


def log_plot_images(stage: str, outputs: dict) -> None:
    import mlflow

    figures = plot_figures(stage, outputs)
    if not figures:
        return
    import matplotlib.pyplot as plt  # after plot_figures chose the Agg backend

    for name, fig in figures.items():
        fig.tight_layout()
        mlflow.log_figure(fig, f"plots/{name}.png")
        plt.close(fig)
