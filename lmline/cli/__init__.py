"""The `lmline` command (`main`, called by the script lmline.entry:main): thin commands over the modules that work.

  root.py        the typer app, main(), the global options and the one error handler (OneLineErrors)
  pipeline.py    stage (what dvc.yaml's cmd runs: lmline.stage_process), sources, run
  models.py      evaluate-text, models, promote, rollback, generate, classify, lineage
  status.py      status, and the report it prints (DVC, the MLflow registry, Prefect flow runs)
  summary.py     the end-of-run table `lmline run` prints, with links to the UIs
  production.py  deploy, data add

Commands just raise LmlineError; OneLineErrors prints it as one `error:` line and exits 1.
"""

# The command modules register their commands on `app` as they are imported: in this order, --help's.
from lmline.cli import pipeline, models, status, production  # noqa: F401,I001
from lmline.cli.root import app, main

__all__ = ["app", "main"]
