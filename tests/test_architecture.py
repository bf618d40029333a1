"""The layers of docs/architecture.md, checked by import-linter on the real import graph.

The contracts live in pyproject.toml ([tool.importlinter]). The tests below run `lint-imports` on this
tree, then on a copy of it with one bad import added, so a contract that could never fail is caught too.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lmline", "tasks", "flows")
MAX_CODE_LINES = 400


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: grimp finds the packages through the import system, and the copy must win
    # over the editable install of this checkout.
    env = {**os.environ, "PYTHONPATH": str(root)}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", "pyproject.toml", "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_hold_on_this_tree():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: \d+ kept, 0 broken", result.stdout), result.stdout


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def add_import(root: Path, module: str, line: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = root / module.replace(".", "/") / "__init__.py"
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # added by the test\n", encoding="utf-8")


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("tasks.tokenize", "from flows import retrain", "tasks.tokenize -> flows.retrain"),
        ("tasks.pretrain", "from lmline.tracking import runs", "tasks.pretrain -> lmline.tracking.runs"),
        ("tasks.evaluate", "import mlflow", "tasks.evaluate -> mlflow"),
        ("tasks.ingest", "import prefect", "tasks.ingest -> prefect"),
        ("lmline.tracking.registry", "from lmline import cli", "lmline.tracking.registry -> lmline.cli"),
        ("lmline.config", "from tasks import ingest", "lmline.config -> tasks.ingest"),
    ],
    ids=["stage->flow", "stage->tracking", "stage->mlflow", "stage->prefect", "tracking->cli", "base->stage"],
)
def test_an_import_against_the_arrows_breaks_a_contract(tree_copy: Path, module: str, line: str, broken: str):
    add_import(tree_copy, module, line)
    result = lint_imports(tree_copy)
    assert result.returncode == 1, result.stdout
    assert broken in result.stdout


def test_a_cycle_between_modules_of_one_layer_breaks_a_contract(tree_copy: Path):
    # progress and io sit side by side in the base layer, where imports between siblings are allowed:
    # only the no-cycles contract stands between them and a loop.
    add_import(tree_copy, "lmline.io", "from lmline import progress")
    add_import(tree_copy, "lmline.progress", "from lmline import io")
    result = lint_imports(tree_copy)
    assert result.returncode == 1, result.stdout
    assert "No cycles are allowed in lmline." in result.stdout
    assert re.search(r"- \.(progress -> \.io|io -> \.progress) ", result.stdout), result.stdout


def code_lines(path: Path) -> int:
    """Lines that are neither blank, comments nor docstrings: the size rule of docs/architecture.md."""
    source = path.read_text(encoding="utf-8")
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:
                # a docstring, or an attribute docstring under a field: a bare string expression
                if (
                    isinstance(stmt, ast.Expr)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    docstrings.update(range(stmt.lineno, stmt.end_lineno + 1))
    return sum(
        1
        for n, line in enumerate(source.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and n not in docstrings
    )


def test_no_module_is_over_400_lines_of_code():
    sizes = {
        str(p.relative_to(ROOT)): code_lines(p)
        for name in (*PACKAGES, "bench")
        for p in sorted((ROOT / name).rglob("*.py"))
    }
    assert {path: n for path, n in sizes.items() if n > MAX_CODE_LINES} == {}
