"""The `lmline` script (pyproject's [project.scripts]).

`lmline stage NAME` under a run's warm stage host ($LMLINE_STAGE_HOST, lmline/stage_host.py) hands
itself to the host, which runs it in a child that has torch, transformers and MLflow imported already;
this process only waits for the exit status, having imported lmline.stage_host alone (the standard
library and psutil). Everything else, and a stage with no host to answer, is the CLI (lmline.cli),
imported only then (0.43–0.56 s for `import lmline.cli` alone, measured idle).
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
    from lmline.cli import main as cli

    cli()
