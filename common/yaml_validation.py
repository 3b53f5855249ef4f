"""Reading a YAML file with line numbers and turning pydantic errors into YAML paths.

Generic: nothing here knows the pipeline schema. :func:`read_document` parses a YAML text with
a safe loader (``1e-4`` read as a float), maps every key and item to its line and collects
duplicate keys; :func:`validate` runs ``model_validate`` and turns EVERY problem (unknown key
with a close match, wrong type with the expected form, missing key, union mismatch, the
cross-field problems of a model) into ``(yaml path, message)`` pairs, raised together as one
:class:`~genrecal.common.errors.ConfigError` that names each path and its line.
"""

from __future__ import annotations

import difflib
import re
import types
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from genrecal.common.errors import ConfigError
from genrecal.common.vocabulary import STAGE_ORDER  # the tags of the schema's one tagged union

FILE = "<file>"  # yaml path of problems that concern the file itself, not a key in it


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 (an exponent without a dot) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Context:
    """Where a validated mapping sits: file label, line map and path prefix."""

    source: str
    lines: dict[tuple, int] | None = None
    prefix: tuple = ()
    extra: tuple[tuple[tuple, str], ...] = ()  # problems found while reading (duplicate keys)


@dataclass(frozen=True)
class Document:
    source: str
    data: Any
    lines: dict[tuple, int]
    duplicates: tuple[tuple[tuple, str], ...]

    def context(self, prefix: tuple = ()) -> Context:
        extra = tuple(d for d in self.duplicates if d[0][:len(prefix)] == prefix)
        return Context(self.source, self.lines, prefix, extra)


def read_document(where: Path | Traversable, source: str) -> Document:
    """Parse the YAML file at ``where`` (named ``source`` in messages), with its line map."""
    text = _read_text(where, source)
    loader = _Loader(text)
    lines: dict[tuple, int] = {}
    duplicates: tuple[tuple[tuple, str], ...] = ()
    try:
        node = loader.get_single_node()
        if node is not None:  # before construction, which rewrites merges ('<<') in place
            lines, duplicates = _line_map(node, ()), tuple(_duplicate_keys(node, ()))
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(source, [(FILE, _yaml_error_message(exc))]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [(FILE, f"cannot parse YAML: {exc}")]) from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(source, [(FILE, "the file is empty; it needs a top-level "
                                    "'pipelines:' mapping of name -> pipeline")])
    return Document(source, data, lines, duplicates)


def _read_text(where: Path | Traversable, source: str) -> str:
    try:
        return where.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [(FILE, f"file not found (working directory {Path.cwd()}); "
                                    "pass an existing file with --file PATH")]) from None
    except IsADirectoryError:
        raise ConfigError(source, [(FILE, "is a directory; pass the YAML file itself")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [(FILE, f"cannot read the file: {exc}")]) from None


def _yaml_error_message(exc: yaml.MarkedYAMLError) -> str:
    message = f"YAML syntax error{_mark_text(exc.problem_mark)}: {exc.problem}"
    if exc.context:
        message += f" ({exc.context}{_mark_text(exc.context_mark, ' started')})"
    return message


def _mark_text(mark: yaml.Mark | None, verb: str = "") -> str:
    return f"{verb} at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _line_map(node: yaml.Node, path: tuple) -> dict[tuple, int]:
    """1-based line of every key (mappings) and item (sequences) under ``node``; keys merged
    in with ``<<`` are left out, so they report the line of the mapping that merges them."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                lines.update(_line_map(value, path + (key.value,)))
                lines[path + (key.value,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, path + (i,)))
    return lines


def _duplicate_keys(node: yaml.Node, path: tuple) -> list[tuple[tuple, str]]:
    """Keys given twice in one mapping (YAML would silently keep the last one)."""
    found: list[tuple[tuple, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if key.tag == _MERGE_TAG or not isinstance(key, yaml.ScalarNode):
                continue
            line = key.start_mark.line + 1
            if key.value in seen:
                found.append((path + (key.value,), f"duplicate key {key.value!r} (first at line "
                              f"{seen[key.value]}); YAML keeps only the last value (line {line})"))
            seen.setdefault(key.value, line)
            found += _duplicate_keys(value, path + (key.value,))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, path + (i,))
    return found


# --------------------------------------------------------------------------------------------
# Validation errors -> (yaml path, message)
# --------------------------------------------------------------------------------------------

def validate(cls: type[BaseModel], data: Any, ctx: Context):
    """``cls.model_validate(data)``, turning every problem into one ConfigError."""
    try:
        model = cls.model_validate(data)
        problems: list[tuple[tuple, str]] = []
    except ValidationError as exc:
        model, problems = None, [p for err in exc.errors() for p in _explain(err, cls, data)]
    found = [*((loc[len(ctx.prefix):], msg) for loc, msg in ctx.extra), *problems]
    if found:
        raise ConfigError(ctx.source, render(found, ctx))
    return model


def _explain(err: dict, root: type[BaseModel], data: Any) -> list[tuple[tuple, str]]:
    """One pydantic error as ``(location in the data, message)`` problems."""
    kind = err["type"]
    loc = _data_loc(err["loc"], data, missing_key=kind == "missing")
    if kind == "config":
        return [(loc + tuple(sub), msg) for sub, msg in err["ctx"]["problems"]]
    if kind == "extra_forbidden":
        return [(loc, _unknown_key_message(loc[-1], _model_at(root, err["loc"][:-1])))]
    if kind == "missing":
        return [(loc, _missing_message(_model_at(root, err["loc"][:-1]), loc[-1]))]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = err["ctx"]["discriminator"].strip("'")
        return [(loc + (key,), _tag_message(err, key))]
    if err["loc"][-1:] == ("[key]",):
        return [(loc, f"keys here must be strings; got {_got(err['input'])}")]
    if len(err["loc"]) > len(loc) and loc and err["loc"][-1] != loc[-1]:
        return [(loc, _union_message(root, err, loc))]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return [(loc, f"expected a mapping (key: value), got {_got(err['input'])}")]
    message = err["msg"].removeprefix("Value error, ")
    return [(loc, f"{message}; got {_got(err['input'])}")]


def _union_message(root: type[BaseModel], err: dict, loc: tuple) -> str:
    """A value that matches no member of a union field: name every accepted form once."""
    raw = err["loc"]
    field_at = max(i for i, element in enumerate(raw) if element == loc[-1])
    model = _model_at(root, raw[:field_at])
    field = model.model_fields.get(loc[-1]) if model is not None else None
    expected = _describe(field.annotation) if field is not None else err["msg"]
    return f"expected {expected}; got {_got(err['input'])}"


def _data_loc(loc: tuple, data: Any, *, missing_key: bool = False) -> tuple:
    """Pydantic's location minus the labels it adds (union tags, member types, '[key]');
    with ``missing_key`` the last element is kept although the data lacks it."""
    out: list = []
    node = data
    for i, element in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and element in node:
            out.append(element)
            node = node[element]
        elif isinstance(node, list) and isinstance(element, int) and 0 <= element < len(node):
            out.append(element)
            node = node[element]
        elif isinstance(node, dict) and last and missing_key:
            out.append(element)
    return tuple(out)


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that pydantic's location ``loc`` (tags included) points into."""
    current: Any = root
    for element in loc:
        current = _child_type(current, element)
        if current is None:
            return None
    models = [t for t in _members(current) if _is_model(t)]
    return models[0] if len(models) == 1 else None


def _child_type(tp: Any, element: Any) -> Any:
    for member in _members(tp):
        if _is_model(member):
            if element in member.model_fields:
                return member.model_fields[element].annotation
            name = member.model_fields.get("name")
            if name is not None and element in get_args(name.annotation):
                return member  # a discriminated-union tag
        elif get_origin(member) is list and isinstance(element, int):
            return get_args(member)[0]
        elif get_origin(member) is dict:
            return get_args(member)[1]
    return None


def _members(tp: Any) -> list[Any]:
    """``tp`` without Annotated and None, unions flattened."""
    if get_origin(tp) is Annotated:
        return _members(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return [m for arg in get_args(tp) for m in _members(arg)]
    return [] if tp is type(None) else [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unknown_key_message(key: Any, model: type[BaseModel] | None) -> str:
    if model is None:
        return f"unknown key {key!r}"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}"


def _missing_message(model: type[BaseModel] | None, key: Any) -> str:
    field = model.model_fields.get(key) if model is not None else None
    expected = f"; expected {_describe(field.annotation)}" if field is not None else ""
    return f"required key {key!r} is missing{expected}"


def _tag_message(err: dict, key: str) -> str:
    if err["type"] == "union_tag_not_found":
        return f"required key {key!r} is missing; expected one of {choices(STAGE_ORDER)}"
    return f"unknown stage {err['ctx']['tag']!r}; expected one of {err['ctx']['expected_tags']}"


def _describe(tp: Any) -> str:
    """Short English form of an annotation, for messages."""
    members = _members(tp)
    tags = [get_args(m.model_fields["name"].annotation) for m in members
            if _is_model(m) and "name" in m.model_fields]
    if len(members) > 1 and len(tags) == len(members):
        return f"a mapping whose 'name' is one of {choices(t for group in tags for t in group)}"
    if len(members) != 1:
        return " or ".join(_describe(m) for m in members)
    tp = members[0]
    if get_origin(tp) is Literal:
        return f"one of {choices(get_args(tp))}"
    if _is_model(tp):
        return f"a mapping with keys {', '.join(tp.model_fields)}"
    if get_origin(tp) is list:
        return f"a list; each item {_describe(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def render(found: list[tuple[tuple, str]], ctx: Context) -> list[tuple[str, str]]:
    """Absolute YAML paths, line notes, same-path messages merged, in file order."""
    merged: dict[tuple, list[str]] = {}
    for loc, msg in found:
        messages = merged.setdefault(ctx.prefix + tuple(loc), [])
        if msg not in messages:
            messages.append(msg)
    order = sorted(merged, key=lambda loc: _line_of(ctx.lines, loc) or 0)
    return [(format_path(loc), "; ".join(merged[loc]) + _line_note(ctx.lines, loc))
            for loc in order]


def _line_of(lines: dict[tuple, int] | None, loc: tuple) -> int | None:
    """Line of ``loc``, or of its nearest ancestor present in the file."""
    if not lines:
        return None
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _line_note(lines: dict[tuple, int] | None, loc: tuple) -> str:
    line = _line_of(lines, loc)
    return f" (line {line})" if line else ""


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def format_path(loc: tuple) -> str:
    """``('pipelines', 'demo', 'stages', 1, 'lr_start')`` -> ``pipelines.demo.stages[1].lr_start``."""
    parts: list[str] = []
    for element in loc:
        if isinstance(element, int):
            parts.append(f"[{element}]")
        elif _PLAIN_KEY.fullmatch(str(element)):
            parts.append(("." if parts else "") + str(element))
        else:
            parts.append(f"[{str(element)!r}]")
    return "".join(parts) or "<top level>"


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def choices(values: Any) -> str:
    return ", ".join(repr(v) for v in values) or "(none)"
