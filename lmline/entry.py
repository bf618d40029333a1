"""The `lmline` script (pyproject's [project.scripts]).

`lmline stage NAME` under a run's warm stage host ($LMLINE_STAGE_HOST, lmline/stage_host.py) hands
itself to the host, which runs it in a child that has torch, transformers and MLflow imported already;
this process only waits for the exit status, having imported lmline.stage_host alone (the standard
library and psutil). Everything else, and a stage with no host to answer, is the CLI (lmline.cli),
imported only then (0.43–0.56 s for `import lmline.cli` alone, measured idle). `lmline run` without a
Prefect server of the user's launches Prefect's temporary server first (lmline/temporary_prefect.py).
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    if sys.argv[1:2] == ["stage"]:
        from lmline import stage_host

        address = os.environ.get(stage_host.ADDRESS_ENV)
        # `lmline stage NAME` runs tasks/NAME.py (dvc.yaml): the module by which the host picks its forker
        needs = f"tasks.{sys.argv[2]}" if len(sys.argv) > 2 else None
        code = stage_host.hand_over(sys.argv, address, "lmline.cli:main", needs) if address else None
        if code is not None:
            sys.exit(code)
    if runs_the_pipeline(sys.argv[1:]):
        from lmline import guard, temporary_prefect

        guard.watch_children()  # the server dies with this process, as `lmline run` makes sure again
        temporary_prefect.launch_early()  # ~0.5 s before `lmline run` itself could (lmline.cli's imports)
    from lmline.cli import main as cli

    cli()


def runs_the_pipeline(args: list[str]) -> bool:
    """`lmline [global flags] run ...` without --help, and no Prefect server of the user's named in the
    environment (a profile's is found later, by `lmline run`, which then stops this one unused)."""
    command = next((a for a in args if not a.startswith("-")), None)
    return command == "run" and "--help" not in args and not os.environ.get("PREFECT_API_URL")
