"""The docs tell the truth: docs/configuration.md is what lmline.configdoc renders from the code, every
params key has a meaning, and every `lmline` command, option and params key the README and docs/
mention exists."""

from __future__ import annotations

import re
import shlex
import typing

import pytest
import typer.main
from conftest import REPO
from pydantic import BaseModel

from lmline import config, configdoc
from lmline.cli import app
from lmline.section import Section

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CLI = typer.main.get_command(app)


def test_the_committed_reference_is_what_the_code_renders():
    assert configdoc.DOC.read_text(encoding="utf-8") == configdoc.render(), (
        "docs/configuration.md is stale: run `python -m lmline.configdoc`"
    )


@pytest.mark.parametrize("name,cls", configdoc.section_classes())
def test_every_key_has_a_meaning(name, cls):
    missing = [key for key, field in cls.model_fields.items() if not configdoc.meaning(field)]
    assert not missing, f"give these fields of {name} a docstring (the line after the field), their meaning: {missing}"


def test_a_meaning_is_the_field_docstring_as_one_table_cell():
    """The docstring, not the default (`prompt_separator` holds a `#`), on one line with `|` escaped."""
    fields = config.FinetuneConfig.model_fields
    assert configdoc.meaning(fields["prompt_separator"]) == "causal-lm with mask_prompt: where the prompt ends"
    assert configdoc.meaning(config.PretrainConfig.model_fields["arch"]) == "llama (RoPE, RMSNorm, SwiGLU) \\| gpt2"
    assert "\n" not in configdoc.meaning(config.OrchestrationConfig.model_fields["mode"])


def test_the_meaning_check_can_fail():
    class Undocumented(Section):
        plain: int = 1  # a comment is not a description

    assert configdoc.meaning(Undocumented.model_fields["plain"]) == ""


# ---------------------------------------------------------------- commands and options
def invocations(text: str) -> list[list[str]]:
    """`lmline ...` command lines (in shell code blocks and code spans), as argument lists after `lmline`."""
    shell_blocks = re.findall(r"```(?:bash|sh|console|shell)?\n(.*?)```", text, flags=re.S)  # not ```text output
    found = []
    for code in shell_blocks + re.findall(r"`([^`\n]+)`", text):
        for line in code.splitlines():
            line = line.split("  #")[0].split(" | ")[0].strip()  # trailing comments, pipes
            m = re.match(r"^(?:\$\s*)?(?:\S*/)?lmline(\s.*)?$", line)
            if m:
                try:
                    found.append(shlex.split(m.group(1) or ""))
                except ValueError:  # an unbalanced quote in prose
                    continue
    return found


def resolve(args: list[str]) -> tuple[list[str], list[str]]:
    """Walk `args` through the click command tree; return (command path, unknown commands/options)."""
    command, path, unknown = CLI, [], []
    for arg in args:
        if arg.startswith("-"):
            name = arg.split("=")[0]
            known = {opt for p in command.params for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
            if name not in known | {"--help"}:
                unknown.append(f"{' '.join(['lmline', *path])} {name}")
        elif hasattr(command, "commands") and not arg.isupper() and not arg.startswith(("<", "[")):
            if arg not in command.commands:
                unknown.append(f"{' '.join(['lmline', *path])} {arg}")
                break
            command, path = command.commands[arg], [*path, arg]
    return path, unknown


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_and_option_a_doc_mentions_exists(doc):
    unknown = [u for args in invocations(doc.read_text(encoding="utf-8")) for u in resolve(args)[1]]
    assert not unknown, f"{doc.name} mentions what the CLI does not have: {sorted(set(unknown))}"


def test_the_cli_reference_covers_every_command():
    documented = {" ".join(resolve(args)[0]) for args in invocations((REPO / "docs" / "cli.md").read_text())}
    commands = {name for name, c in CLI.commands.items() if not hasattr(c, "commands")}
    commands |= {f"{name} {sub}" for name, c in CLI.commands.items() for sub in getattr(c, "commands", {})}
    assert commands <= documented, f"docs/cli.md lacks {sorted(commands - documented)}"


def test_the_checks_can_fail():
    assert resolve(["frobnicate"])[1] == ["lmline frobnicate"]
    assert resolve(["run", "--fast"])[1] == ["lmline run --fast"]
    assert resolve(["--quiet", "data", "add", "x.txt", "--source", "docs"]) == (["data", "add"], [])
    assert invocations("run `.venv/bin/lmline status --json` then `lmline-base`") == [["status", "--json"]]
    assert invocations("```text\nlmline retrain: 6 stages ran\n```") == []


# ---------------------------------------------------------------- params keys
SECTIONS = "|".join(config.Params.model_fields)
KEY = re.compile(
    rf"(?<![\w/.-])((?:{SECTIONS})\.[a-z_]+(?:\.[a-z_]+)*)"  # section.key(.key...)
    r"(?![\w.-]*\.(?:py|json|csv|md|txt|yaml|parquet|bin|jsonl)\b)"  # not a file name such as metrics/pretrain.json
)


def key_exists(dotted: str) -> bool:
    node: typing.Any = config.Params
    for part in dotted.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return True  # inside a free-form map (clean.filters.<source>, orchestration.pools.<stage>)
        if part not in node.model_fields:
            return False
        node = model_of(node.model_fields[part].annotation)
    return True


def model_of(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is dict:
        return dict
    for arg in typing.get_args(annotation):
        found = model_of(arg)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("doc", [*DOCS, REPO / "params.yaml"], ids=lambda p: p.name)
def test_every_params_key_a_doc_mentions_exists(doc):
    text = doc.read_text(encoding="utf-8")
    mentioned = set(KEY.findall(text))
    unknown = sorted(k for k in mentioned if not key_exists(k))
    assert not unknown, f"{doc.name}: unknown keys {unknown}"


def test_the_key_check_can_fail():
    text = "set `pretrain.max_minutes=5`; see metrics/pretrain.json and tasks/pretrain.py"
    assert KEY.findall(text) == ["pretrain.max_minutes"]
    assert key_exists("pretrain.max_minutes") and key_exists("clean.filters.news.gopher_quality")
    assert not key_exists("pretrain.max_minute") and not key_exists("promote.metrics")
