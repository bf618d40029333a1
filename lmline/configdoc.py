"""Generate docs/configuration.md from the config classes, so the reference cannot drift from the code.

Meaning comes from each field's docstring (its pydantic description: lmline.section.Section sets
use_attribute_docstrings) and each class's docstring; defaults and ranges from the fields themselves.
`python -m lmline.configdoc` rewrites the doc; tests/test_configdoc.py fails when the committed doc
differs from what this produces.
"""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel

from lmline import config

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def meaning(field) -> str:
    """A field's description (its docstring) as one table cell: one line, `|` escaped."""
    return " ".join((field.description or "").split()).replace("|", "\\|")


def type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(type_name(a) if a is not type(None) else "null" for a in args)
    if origin in (list, tuple):
        return f"list of {', '.join(type_name(a) for a in args if a is not Ellipsis)}"
    if origin is dict:
        return f"map {type_name(args[0])} → {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


BOUNDS = ((Ge, ">=", "ge"), (Gt, ">", "gt"), (Le, "<=", "le"), (Lt, "<", "lt"))


def _bounds(metadata) -> list[str]:
    out = []
    for meta in metadata:
        out += [f"{sym} {getattr(meta, attr)}" for kind, sym, attr in BOUNDS if isinstance(meta, kind)]
        if isinstance(meta, MinLen):
            out.append(f"length >= {meta.min_length}")
        if isinstance(meta, MaxLen):
            out.append(f"length <= {meta.max_length}")
        if getattr(meta, "pattern", None):
            out.append(f"matches `{meta.pattern}`")
    return out


def valid_range(field) -> str:
    bounds = _bounds(field.metadata)
    for arg in typing.get_args(field.annotation):  # Optional[Annotated[...]] keeps bounds on the inner type
        if typing.get_origin(arg) is typing.Annotated:
            bounds += _bounds(typing.get_args(arg)[1:])
    return ", ".join(bounds)


def default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{value!r}`".replace("|", "\\|")


def section_classes() -> list[tuple[str, type]]:
    """(heading, class) for every config class reachable from Params, in a stable reading order."""
    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for field in cls.model_fields.values():
            for t in _model_types(field.annotation):
                walk(t)

    walk(config.Params)
    return [(cls.__name__, cls) for cls in seen]


def _model_types(annotation) -> list[type]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in typing.get_args(annotation) for t in _model_types(arg)]


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config classes (`lmline/config.py`, `lmline/sources.py`, `lmline/clean_config.py`)",
        "by `python -m lmline.configdoc`: each key's meaning is its docstring there. A test fails if this file",
        "drifts from the code. Every key lives in `params.yaml`; unknown keys and values out of range fail",
        "before any work starts, with a message naming the key. Override one run with",
        "`lmline run --set section.key=value` (or `lmline stage NAME --set ...`).",
        "",
    ]
    for name, cls in section_classes():
        lines += [f"## {name}", ""]
        doc = cls.__dict__.get("__doc__")  # the class's own docstring, not pydantic's inherited one
        if doc:
            lines += [inspect.cleandoc(doc), ""]
        lines += ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
        for key, field in cls.model_fields.items():
            cells = (f"`{key}`", type_name(field.annotation), default_text(field), valid_range(field), meaning(field))
            lines.append(f"| {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC}", file=sys.stderr)
