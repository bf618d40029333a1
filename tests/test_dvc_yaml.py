"""dvc.yaml tells the truth: each stage declares the paths its run() reads and writes (from
lmline.config.stage_io), every project module the stage imports, and the metrics file the shell writes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

from lmline import config, stages, vcs


def project_imports(module_file: Path, seen: set[Path] | None = None) -> set[Path]:
    """Project modules (lmline/*, tasks/*) that `module_file` imports, transitively, as repo paths."""
    seen = set() if seen is None else seen
    tree = ast.parse(module_file.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] not in ("lmline", "tasks"):
                continue
            candidate = REPO / (name.replace(".", "/") + ".py")
            if candidate.exists() and candidate not in seen:
                seen.add(candidate)
                project_imports(candidate, seen)
    return seen


def dvc_stages() -> dict:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        out = {}
        for st in repo.index.stages:
            deps = {str(Path(d.def_path)) for d in st.deps if not isinstance(d, ParamsDependency)}
            outs = {str(Path(o.def_path)) for o in st.outs}
            out[st.name] = (st.cmd, deps, outs)
        return out


STAGES = dvc_stages()
PARAMS = config.load(REPO / "params.yaml")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_its_paths_code_and_metrics(stage):
    cmd, deps, outs = STAGES[stage]
    assert cmd == f"lmline stage {stage}"
    inputs, outputs = config.stage_io(PARAMS, stage)
    assert {str(p) for p in inputs.values()} <= deps, "every input is a dep"
    produced = {str(p) for key, p in outputs.items() if key != "checkpoints"}
    assert produced <= outs, "every output is an out (checkpoints excepted: they must survive a failure)"
    assert str(config.metrics_path(PARAMS, stage)) in outs
    module = REPO / "tasks" / f"{stage}.py"
    code = {str(p.relative_to(REPO)) for p in project_imports(module)} | {f"tasks/{stage}.py"}
    assert code <= deps, f"undeclared code deps: {sorted(code - deps)}"


def test_the_data_stages_exist_in_order():
    assert list(STAGES)[:3] == ["ingest", "clean", "tokenize"]


def dvc_params() -> dict[str, list[str]]:
    """Each stage's `params:` list in dvc.yaml, as written."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("params", []) for name, stage in stages.items()}


@pytest.mark.parametrize("stage", stages.NAMES)
def test_stage_params_are_what_its_run_reads(stage):
    """dvc.yaml's `params:` = lmline.stages' params = run()'s signature: its own section's config
    class first, `seed` exactly where the stage reads project.seed, nothing else from params.yaml."""
    import importlib
    import inspect
    import typing

    facts = stages.STAGES[stage]
    assert dvc_params()[stage] == list(facts.params)

    run = importlib.import_module(f"tasks.{stage}").run
    names = list(inspect.signature(run).parameters)
    hints = typing.get_type_hints(run)
    section_class = type(getattr(PARAMS, facts.section))
    assert names[0] == "cfg" and hints["cfg"] is section_class, f"{stage}.run takes its {facts.section} section first"
    assert names[1:] == (["seed"] if facts.uses_seed else []) + ["inputs", "outputs"]
    assert ("seed" in names) == (stages.SEED_KEY in dvc_params()[stage])
    assert config.stage_args(PARAMS, stage).keys() == set(names) - {"inputs", "outputs"}  # what the shell passes


@pytest.mark.parametrize("stage", stages.NAMES)
def test_the_lineage_tags_resolve_a_stages_deps_as_dvc_does(stage):
    # vcs.stage_deps reads dvc.yaml and params.yaml itself (DVC's resolver is slow to open)
    assert vcs.stage_deps(stage, REPO) == vcs.dvc_resolved_deps(stage, REPO)
