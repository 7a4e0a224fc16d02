"""The spec reference, generated from the schema itself: ``dbx spec --markdown`` (docs/spec.md).

Every key of ``dbx.spec.Spec`` is listed with its type, its allowed values, its default and the
description the schema gives it, so the reference cannot fall behind the code: a key added to the
schema appears here at the next ``dbx spec --markdown --output docs/spec.md``, and a test fails
until it does. ``dbx spec`` without ``--markdown`` prints the same keys as a YAML spec with every
default filled in and each description as a comment: a starting point for a spec of one's own.

The built-in plugins' parameters come from their factories' signatures (the schema
``dbx validate`` checks them against); third-party plugins are left out, so the reference is the
same on every machine (``dbx plugins`` lists what is installed).
"""
from __future__ import annotations

import collections.abc
import inspect
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dbx.spec import Spec

__all__ = ["Key", "spec_keys", "markdown_reference", "yaml_template", "REGENERATE"]

#: The command that rewrites docs/spec.md (tests name it when the file is stale).
REGENERATE = "dbx spec --markdown --output docs/spec.md"


@dataclass(frozen=True)
class Key:
    """One key of the spec: its dotted path, what it holds, and what it means."""

    path: str
    kind: str  # "integer > 0, at most 1000000", "one of none, linear, sqrt", ...
    default: str  # YAML text, or "required"
    description: str
    block: bool  # a mapping whose keys are listed after it


def spec_keys(model: type[BaseModel] = Spec, prefix: str = "", defaults: dict[str, Any] | None = None) -> Iterator[Key]:
    """Every key of the schema, depth first, in the order the schema declares them.

    ``defaults`` is the enclosing block's default value, when it has one (``estimator``
    defaults to ``{name: exact}``): its keys' defaults come from it."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _submodel(info.annotation)
        default = _yaml(defaults[name]) if defaults is not None and name in defaults else _default(info, sub)
        yield Key(path, "mapping" if sub else _kind(info.annotation, info.metadata), default,
                  _sentence(info.description or (sub.__doc__ if sub else "") or ""), sub is not None)
        if sub is not None:
            block = None if info.is_required() else _default_value(info)
            yield from spec_keys(sub, path + ".", block if isinstance(block, dict) else None)


def _default_value(info: FieldInfo) -> Any:
    value = info.default_factory() if info.default_factory is not None else info.default
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _submodel(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _default(info: FieldInfo, sub: type[BaseModel] | None) -> str:
    if info.is_required():
        return "required"
    if sub is not None:
        return "(see its keys)"
    return _yaml(_default_value(info))


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def _kind(annotation: Any, metadata: list[Any]) -> str:
    """The annotation in words, with its bounds: ``integer > 0, at most 2147483647 (or null)``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _kind(args[0], [*metadata, *_flat_metadata(args[1:])])
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(_kind(a, metadata) for a in options)
        return f"{text} (or null)" if len(options) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"list of {_plural(_kind(args[0], []))}" + _bounds(metadata)
    if origin is dict:
        if args and typing.get_origin(args[1]) is typing.Annotated:
            return "mapping: dotted key path -> list of values"
        return "mapping of parameters"
    words = {str: "string", int: "integer", float: "number", bool: "true or false"}.get(annotation, str(annotation))
    return words + _bounds(metadata)


def _flat_metadata(items: tuple[Any, ...]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        out.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return out


def _bounds(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            parts.append(f"> {_number(item.gt)}")
        elif isinstance(item, annotated_types.Ge):
            parts.append(f">= {_number(item.ge)}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {_number(item.lt)}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"<= {_number(item.le)}")
        elif isinstance(item, annotated_types.MinLen) and item.min_length:
            parts.append(f"at least {item.min_length} long")
        elif getattr(item, "pattern", None):
            parts.append(f"matching {item.pattern}")
        elif getattr(item, "allow_inf_nan", None) is False:
            parts.append("finite")
    return (" " + ", ".join(parts)) if parts else ""


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _plural(kind: str) -> str:
    head, _, rest = kind.partition(" ")
    return (head + "s " + rest).strip()


def _sentence(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Built-in plugins
# --------------------------------------------------------------------------------------------

def builtin_plugins() -> Iterator[tuple[str, str, str, list[tuple[str, str, str]]]]:
    """(kind, name, first docstring line, [(param, type, default)]) for each plugin dbx ships."""
    from dbx import registry

    for kind in registry.GROUPS:
        for name, info in registry.available(kind).items():
            if info.distribution != "dbx":
                continue
            factory = registry.load(kind, name)
            schema, _ = registry.params_of(kind, factory)
            rows = [(p.name, _type_text(p.annotation), "required" if p.required else _yaml(_plain(p.default)))
                    for p in schema.values()]
            doc = inspect.getdoc(factory) or inspect.getdoc(inspect.getmodule(factory)) or ""
            yield kind, name, _sentence(doc.split("\n\n")[0]).replace("``", "`"), rows


def _type_text(annotation: Any) -> str:
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any"
    return _kind(annotation, [])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------------------
# Renderings
# --------------------------------------------------------------------------------------------

def markdown_reference() -> str:
    """docs/spec.md: every key of the schema, then the built-in plugins' parameters."""
    lines = [
        "# Spec reference",
        "",
        f"<!-- Generated from the schema in dbx/spec.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every key a spec may hold, with its type, its default and what it means. Unknown keys are",
        "errors (with a did-you-mean); `dbx validate SPEC` checks a spec against exactly this schema,",
        "and `dbx spec` prints a spec with every default filled in. A plugin's `params` are checked",
        "against the plugin's own signature: the built-ins' are listed at the end, a third-party",
        "plugin's in its documentation (`dbx plugins` lists what is installed).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key in spec_keys():
        lines.append(f"| `{key.path}` | {_cell(key.kind)} | {_cell(key.default, code=True)} | {_cell(key.description)} |")
    lines += ["", "## Built-in plugins and their params", "",
              "What `name:` may say in each section, and the keys its `params:` may hold.", ""]
    sections = {"policy": "policy", "estimator": "estimator", "model": "model", "dataset": "data"}
    for kind, name, summary, rows in builtin_plugins():
        lines += [f"### `{sections[kind]}: {{name: {name}}}`", "", summary, ""]
        if rows:
            lines += ["| param | type | default |", "|---|---|---|"]
            lines += [f"| `{param}` | {_cell(kind_)} | {_cell(default, code=True)} |" for param, kind_, default in rows]
        else:
            lines.append("No params.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if code and text not in ("required", "(see its keys)") else text


def yaml_template() -> str:
    """A spec with every key at its default (required ones marked), each described in a comment."""
    lines = ["# Every key of a dbx spec at its default; `required` keys must be filled in.",
             f"# The reference with types and bounds: docs/spec.md ({REGENERATE})."]
    for key in spec_keys():
        depth = key.path.count(".")
        name = key.path.rsplit(".", 1)[-1]
        indent = "  " * depth
        comment = f"  # {key.description}" if key.description else ""
        if key.block:
            lines.append(f"{indent}{name}:{comment}")
        elif key.default == "required":
            lines.append(f"{indent}{name}:  # (required) {key.description}")
        else:
            lines.append(f"{indent}{name}: {key.default}{comment}")
    return "\n".join(lines) + "\n"
