"""The config's JSON Schema and its Markdown reference, both generated from the msgspec structs.

`busway schema` prints the JSON Schema, so editors (Even Better TOML / taplo) validate and
complete busway.toml; `busway schema --markdown` prints the reference page of the docs site and
`--update-docs docs/reference/config.md` rewrites it (a test checks it is current, and another
that every key has a description). Field descriptions are the attribute docstrings of the
structs (the string right below a field), so the docs live next to the code they describe.
Adapters are documented from their config structs alone: the database adapters' structs import
no driver, so an installation without psycopg still documents `type = "postgres"`.

msgspec's own `json.schema` cannot encode `Duration` defaults, and knows nothing of adapters
registered at run time, so this walks `msgspec.inspect.type_info` itself.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import textwrap
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi

from busway._config.model import Config, SinkConfig, SourceConfig
from busway._registry import AdapterRegistry
from busway.routers.durations import Duration

__all__ = ["config_reference", "config_schema", "undocumented_keys"]

_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$"},
    ],
    "description": 'A duration: "500ms", "5s", "2m", "1h", "1d" or a number of seconds.',
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of `cls` and its bases: `{field: first paragraph}`."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not issubclass(klass, msgspec.Struct):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split("\n\n")[0].split())
    return docs


def _adapter_configs(registry: AdapterRegistry, role: str) -> list[type[Any]]:
    configs = []
    for name in registry.types:
        try:
            config = (
                registry.source_config(name) if role == "source" else registry.sink_config(name)
            )
        except Exception:
            continue
        if config is not None:
            configs.append(config)
    return configs


class _SchemaWriter:
    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}

    def type(self, t: mi.Type) -> dict[str, Any]:
        if isinstance(t, mi.CustomType) and t.cls is Duration:
            return dict(_DURATION_SCHEMA)
        if isinstance(t, mi.StructType):
            return self.struct(t)
        if isinstance(t, mi.UnionType):
            options = [
                self.type(option) for option in t.types if not isinstance(option, mi.NoneType)
            ]
            return options[0] if len(options) == 1 else {"anyOf": options}
        if isinstance(t, mi.ListType | mi.VarTupleType):
            return {"type": "array", "items": self.type(t.item_type)}
        if isinstance(t, mi.DictType):
            return {"type": "object", "additionalProperties": self.type(t.value_type)}
        if isinstance(t, mi.LiteralType):
            return {"enum": list(t.values)}
        simple = {
            mi.StrType: "string",
            mi.IntType: "integer",
            mi.FloatType: "number",
            mi.BoolType: "boolean",
        }
        name = next((name for kind, name in simple.items() if isinstance(t, kind)), None)
        return {"type": name} if name else {}

    def struct(self, t: mi.StructType) -> dict[str, Any]:
        name = t.cls.__name__
        if name not in self.defs:
            self.defs[name] = {}  # placeholder: stops recursion
            docs = field_docs(t.cls)
            properties: dict[str, Any] = {}
            for field in t.fields:
                schema = self.type(field.type)
                if field.name in docs:
                    schema = {**schema, "description": docs[field.name]}
                default = _default(field)
                if default is not msgspec.NODEFAULT:
                    schema = {**schema, "default": default}
                properties[field.encode_name] = schema
            if t.tag_field is not None and t.tag is not None:
                properties[t.tag_field] = {"const": t.tag}
            definition: dict[str, Any] = {
                "type": "object",
                "properties": properties,
                "additionalProperties": not t.forbid_unknown_fields,
            }
            required = [f.encode_name for f in t.fields if f.required]
            if t.tag_field is not None and t.tag is not None:
                required.append(t.tag_field)
            if required:
                definition["required"] = required
            if t.cls.__doc__:
                definition["description"] = " ".join(t.cls.__doc__.split("\n\n")[0].split())
            self.defs[name] = definition
        return {"$ref": f"#/$defs/{name}"}


def _default(field: mi.Field) -> Any:
    if field.default_factory is not msgspec.NODEFAULT:
        return msgspec.to_builtins(field.default_factory())
    if field.default is msgspec.NODEFAULT:
        return msgspec.NODEFAULT
    return msgspec.to_builtins(field.default, enc_hook=float)


def config_schema(registry: AdapterRegistry) -> dict[str, Any]:
    """The JSON Schema of busway.toml, with every adapter the registry can load."""
    writer = _SchemaWriter()
    root = writer.struct(mi.type_info(Config))  # type: ignore[arg-type]
    config = writer.defs["Config"]
    for key, role in (("sources", "source"), ("sinks", "sink")):
        options = [writer.type(mi.type_info(c)) for c in _adapter_configs(registry, role)]
        config["properties"][key] = {
            "type": "array",
            "items": {"oneOf": options} if options else {"type": "object"},
            "description": f"{key.capitalize()}: one table per adapter, chosen by `type`.",
        }
    config["properties"].pop("base_dir", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "busway.toml",
        **root,
        "$defs": writer.defs,
    }


def config_reference(registry: AdapterRegistry) -> str:
    """The config reference page (docs/reference/config.md): one table of keys per TOML table.

    Sources and sinks list the keys every type shares once, then each adapter's own keys, so
    a type's section is what that adapter adds. Every table has a stable anchor (`#nats`,
    `#routes-retry`, `#sink-http-timeout`) the other pages link to.
    """
    return "\n\n".join(section.markdown for section in _sections(registry)) + "\n"


def undocumented_keys(registry: AdapterRegistry) -> list[str]:
    """Every table and key of the reference without a description, as `title: key`."""
    missing = []
    for section in _sections(registry):
        if not section.summary:
            missing.append(f"{section.title}: (the table itself: a class docstring)")
        missing += [f"{section.title}: {key}" for key in section.undocumented]
    return missing


@dataclass(frozen=True)
class _Section:
    title: str
    summary: str
    markdown: str
    undocumented: list[str]


_INTRO = """# Configuration reference

<!-- Generated from the config structs by `busway schema --update-docs \
docs/reference/config.md`; do not edit by hand (a test fails when it is stale). -->

One TOML file configures a deployment (see [Configuration](../configuration.md) for how it is
read and checked). Durations are `"500ms"`, `"5s"`, `"2m"`, `"1h"`, `"1d"` or a number of
seconds; relative paths start at the config file's directory; strings may use `${ENV_VAR}` and
`${file:/path}`. `busway schema` prints the same keys as a JSON Schema for editors."""


def _sections(registry: AdapterRegistry) -> list[_Section]:
    seen: dict[type, tuple[str, str]] = {}
    config_type: mi.StructType = mi.type_info(Config)  # type: ignore[assignment]
    top = [f for f in config_type.fields if _struct_of(f.type) is None and f.name != "base_dir"]
    sections = [_section("top level", "top-level", Config, top, {}, intro=_INTRO)]
    for field in config_type.fields:
        struct = _struct_of(field.type)
        if struct is None or struct.cls in (SourceConfig, SinkConfig):
            continue
        is_array = isinstance(field.type, mi.ListType | mi.VarTupleType)
        title = f"[[{field.encode_name}]]" if is_array else f"[{field.encode_name}]"
        sections += _with_nested(title, field.encode_name, struct, list(struct.fields), seen)
    for key, role, base in (("sources", "source", SourceConfig), ("sinks", "sink", SinkConfig)):
        base_info: mi.StructType = mi.type_info(base)  # type: ignore[assignment]
        shared = {f.name for f in base_info.fields}
        sections += _with_nested(
            f"[[{key}]] (every type)", key, base_info, list(base_info.fields), seen
        )
        for cls in _adapter_configs(registry, role):
            info: mi.StructType = mi.type_info(cls)  # type: ignore[assignment]
            own = [f for f in info.fields if f.name not in shared]
            title = f'[[{key}]] type = "{info.tag}"'
            sections += _with_nested(title, f"{role}-{info.tag}", info, own, seen)
    return sections


def _with_nested(
    title: str,
    anchor: str,
    struct: mi.StructType,
    fields: list[mi.Field],
    seen: dict[type, tuple[str, str]],
    *,
    table: str | None = None,
    path: str = "",
) -> list[_Section]:
    """The section of a table, then one per struct-valued key inside it (retry, stages...).

    Nested sections are titled by the table and the dotted key (`[[routes]] stages.python`).
    A struct already shown elsewhere (a sink's `retry` is a route's) is linked, not repeated.
    """
    table = (table or title).replace(" (every type)", "")
    links: dict[str, str] = {}
    nested: list[_Section] = []
    for field in fields:
        inner = _struct_of(field.type)
        if inner is None:
            continue
        if inner.cls in seen:
            other_title, other_anchor = seen[inner.cls]
            links[field.name] = f"[as `{other_title}`](#{other_anchor})"
            continue
        inner_path = f"{path}.{field.encode_name}" if path else field.encode_name
        inner_title = f"{table} {inner_path}"
        inner_anchor = f"{anchor}-{field.encode_name}"
        seen[inner.cls] = (inner_title, inner_anchor)
        links[field.name] = f"[see below](#{inner_anchor})"
        nested += _with_nested(
            inner_title, inner_anchor, inner, list(inner.fields), seen, table=table, path=inner_path
        )
    return [_section(title, anchor, struct.cls, fields, links), *nested]


def _struct_of(t: mi.Type) -> mi.StructType | None:
    if isinstance(t, mi.StructType):
        return t
    if isinstance(t, mi.ListType | mi.VarTupleType):
        return _struct_of(t.item_type)
    if isinstance(t, mi.UnionType):
        structs = [s for s in (_struct_of(o) for o in t.types) if s is not None]
        return structs[0] if len(structs) == 1 else None
    return None


def _section(
    title: str,
    anchor: str,
    cls: type,
    fields: list[mi.Field],
    links: dict[str, str],
    *,
    intro: str | None = None,
) -> _Section:
    docs = field_docs(cls)
    summary = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
    lines = [intro, ""] if intro else []
    lines += [f"## `{title}` {{#{anchor}}}", "", summary, ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for field in fields:
        kind = _show_type(field.type)
        link = links.get(field.name)
        if field.required:
            default = "required"
        elif link and isinstance(field.type, mi.StructType):
            default, link = link, None  # a table with its own defaults: they are below
        else:
            default = _show_default(field)
        if link:  # a list of tables, or a string or a table: the table's keys are elsewhere
            kind = f"{kind} ({link})"
        meaning = docs.get(field.name, "").replace("|", "\\|")
        lines.append(f"| `{field.encode_name}` | {kind} | {default} | {meaning} |")
    markdown = "\n".join(lines).replace("\n\n\n", "\n\n")
    undocumented = [f.encode_name for f in fields if not docs.get(f.name)]
    return _Section(title, summary, markdown, undocumented)


def _show_type(t: mi.Type) -> str:
    if isinstance(t, mi.CustomType) and t.cls is Duration:
        return "duration"
    if isinstance(t, mi.UnionType):
        return " or ".join(_show_type(o) for o in t.types if not isinstance(o, mi.NoneType))
    if isinstance(t, mi.ListType | mi.VarTupleType):
        return f"list of {_show_type(t.item_type)}"
    if isinstance(t, mi.DictType):
        return f"table of {_show_type(t.value_type)}"
    if isinstance(t, mi.StructType):
        return "table"
    if isinstance(t, mi.LiteralType):
        return " / ".join(f'`"{v}"`' if isinstance(v, str) else f"`{v}`" for v in t.values)
    names = {mi.StrType: "string", mi.IntType: "integer", mi.FloatType: "number"}
    names[mi.BoolType] = "boolean"
    return next((name for kind, name in names.items() if isinstance(t, kind)), "any")


def _show_default(field: mi.Field) -> str:
    value = _default(field)
    if value is msgspec.NODEFAULT or value is None:
        return "none"
    if isinstance(field.type, mi.StructType):
        return "see below"
    if isinstance(field.default, Duration):
        return f"`{_duration(float(field.default))}`"
    return f"`{msgspec.json.encode(value).decode()}`"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f'"{int(seconds // size)}{unit}"'
    return f'"{round(seconds * 1000)}ms"'
