"""The typer app every command registers on, its global options, main() and the one error handler.

Errors: commands just raise LmlineError. One handler, in the app's top-level group (OneLineErrors),
prints it as `error: <message>` on one line and exits 1, for every command: under the `lmline`
script (main) and under typer's CliRunner alike, which both run that group.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

import lmline  # noqa: F401  (sets the offline switches before any library import)
from lmline import progress
from lmline.errors import LmlineError


class OneLineErrors(TyperGroup):
    """Runs the command; the one place a user-facing error becomes `error: <one line>` and exit 1.
    MLflow's own errors (an unknown model or version) are user errors too; anything else is a bug
    and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LmlineError as exc:
            message = str(exc)
        except Exception as exc:
            mlflow_errors = sys.modules.get("mlflow.exceptions")  # loaded if MLflow could have raised it
            if mlflow_errors is None or not isinstance(exc, mlflow_errors.MlflowException):
                raise
            message = exc.message if isinstance(exc.message, str) else str(exc)
        one_line = " ".join(message.splitlines()).strip()  # a message that slipped a newline in stays one line
        typer.echo(f"error: {one_line}", err=True)
        raise typer.Exit(1)


app = typer.Typer(
    cls=OneLineErrors, add_completion=False, no_args_is_help=True, help="Train and ship small language models."
)


def main() -> None:
    """The `lmline` script (pyproject's [project.scripts]): typer in standalone mode, so usage errors,
    --help and exit codes are click's; LmlineError is handled once, in OneLineErrors."""
    app(prog_name="lmline")


ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override, e.g. pretrain.lr=1e-3")]


@app.callback()
def global_options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="lmline's debug logs and every stage's own output (libraries: INFO at the lowest)"
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no progress bars or logs: warnings, errors and results only")
    ] = False,
) -> None:
    """Global options apply to the stages a command runs, too (they travel in LMLINE_VERBOSITY)."""
    level = progress.configure(verbose, quiet)
    os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO" if verbose else "WARNING"  # MLflow sets its level at import
    # With bars on, log lines print above them (through tqdm), not through them. Prefect keeps a root
    # handler it did not install, so the filter below also applies to the flow's and tasks' lines.
    console = progress.BarSafeHandler() if progress.stream() is sys.stderr else logging.StreamHandler()
    console.setLevel(level)  # libraries' loggers (Prefect's) set their own levels: gate what reaches the terminal
    console.addFilter(progress.console_filter)
    # --verbose adds lmline's own DEBUG lines and the stages' output (console_filter lets it through);
    # the root logger, which every library inherits from, never goes below INFO: at DEBUG it printed
    # hundreds of httpcore, websockets, graphviz, pydot and GitPython lines per run.
    logging.basicConfig(
        level=max(level, logging.INFO), format="%(levelname)s %(name)s: %(message)s", handlers=[console]
    )
    for own in progress.OWN_LOGGERS:
        logging.getLogger(own).setLevel(level)
    for noisy in progress.NOISY_LOGGERS:  # their INFO is per request or per table: noise even with --verbose
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else max(level, logging.WARNING))
