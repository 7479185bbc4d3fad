"""Strict YAML into a tree of typed dataclasses, with errors that name the file and the key.

Knows nothing of any particular schema: :func:`build` fills any dataclass tree from a plain
mapping, applying ``key.sub=value`` overrides first, and checks every value against its field's
type hint (literals, unions, tuples, dicts, nested dataclasses). Refused, each in one
:class:`ConfigError` line: a key given twice in one YAML mapping, invalid YAML, an unknown key, a
wrong type. The :class:`Source` it returns records which keys the user set and which override
set them, so that checks of the values afterwards can name the right key and the right place.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------
# YAML text


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_duplicate_keys(node, "", set())
        return super().construct_document(node)


def _check_duplicate_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked (or a recursive structure)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys after it override on purpose
                _check_duplicate_keys(value_node, path, seen)
                continue
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else repr(key_node.value)
            key = f"{path}.{name}" if path else name
            line = key_node.start_mark.line + 1
            if (key_node.tag, name) in lines:
                raise _DuplicateKey(key, lines[key_node.tag, name], line)
            lines[key_node.tag, name] = line
            _check_duplicate_keys(value_node, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{path}[{i}]", seen)


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys; errors become one-line ConfigErrors
    starting with ``where`` (the file, or the override that gave the text)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ConfigError(f"{where}: '{dup.key}' is given twice (lines {dup.first} and {dup.second}); YAML would "
                          "silently keep only the second: merge them into one") from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None


# ---------------------------------------------------------------------------------------------
# Where values came from


class Source:
    """Where the values of one load came from: the file, or the ``--set`` override that set a key.

    ``overrides``: dotted key -> the override as typed. ``given``: the dotted keys the file or an
    override set; None: every key counts as set (a bare file name, nothing recorded).
    """

    def __init__(self, path: str, overrides: Mapping[str, str] | None = None, given: frozenset[str] | None = None):
        self.path = path
        self.overrides = dict(overrides or {})
        self.given = given

    def of(self, *keys: str) -> str:
        """The override that set (a part of) the first of ``keys`` that one set, else the file."""
        for key in keys:
            for set_key, item in reversed(self.overrides.items()):
                if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
                    return f"--set {item}"
        return self.path

    def set_by_user(self, key: str) -> bool:
        return self.given is None or any(k == key or k.startswith(key + ".") for k in self.given)

    def fail(self, key: str, problem: str, *related: str) -> typing.NoReturn:
        """Raise the one-line error ``<where>: <key>: <problem>``; ``related``: other keys the
        problem involves, so that an override that set one of them is named."""
        raise ConfigError(f"{self.of(key, *related)}: {key}: {problem}")


def _dotted_keys(raw: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    for key, value in raw.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")


# ---------------------------------------------------------------------------------------------
# Building the dataclass tree


def build(cls: type[T], raw: Mapping[str, Any], path: str, overrides: Iterable[str] = ()) -> tuple[T, Source]:
    """The dataclass tree ``cls`` filled from ``raw`` (not modified) with ``key.sub=value``
    overrides applied, every value type-checked; and the :class:`Source` of its values.

    Errors name ``path`` (the file) and the key, or the override when one set the value.
    """
    raw = copy.deepcopy(dict(raw))
    set_by: dict[str, str] = {}
    for item in overrides:
        set_by[_apply_override(raw, item)] = item.strip()
    source = Source(path, set_by, frozenset(_dotted_keys(raw)))
    return _build(cls, raw, prefix="", source=source), source


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Set one ``key.sub=value`` in ``raw``; returns the dotted key. Errors name the override as typed."""
    key, sep, value = item.partition("=")
    shown = f"--set {item.strip()}"
    if not sep or not key.strip():
        raise ConfigError(f"{shown}: expected key.sub=value")
    parts = [part.strip() for part in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"{shown}: expected key.sub=value, got the key {key.strip()!r}")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or an empty section (`pretrain:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{shown}: {'.'.join(parts[: i + 1])} is not a section")
    node[parts[-1]] = load_yaml(value, f"{shown}: the value") if value.strip() else None
    return ".".join(parts)


def _build(cls: type, raw: Any, prefix: str, source: Source) -> Any:
    if not isinstance(raw, dict):
        where = prefix.rstrip('.')
        raise ConfigError(f"{source.of(where)}: {where or 'top level'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(
                f"{source.of(prefix + str(key))}: unknown key '{prefix}{key}' "
                f"(valid keys {'in ' + prefix.rstrip('.') if prefix else 'here'}: {', '.join(sorted(names))})"
            )
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value if value is not None else {}, f"{prefix}{key}.", source)
        else:
            values[key] = _coerce(value, hint, f"{prefix}{key}", source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: Source) -> Any:
    """Check ``value`` against a type hint, converting lists to tuples and ints to floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{source.of(key)}: {key}: expected {_describe(hint)}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        fail()
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        return {_coerce(k, args[0], key, source): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if origin is Literal:
        if value not in args:
            fail()
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail()
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            fail()
        return tuple(_coerce(v, t, key, source) for v, t in zip(value, item_types))
    if hint is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if hint is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
            return float(value)  # PyYAML reads 5e-3 (no dot) as a string; it is meant as a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail()
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in the schema, not user input


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} numbers"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


# ---------------------------------------------------------------------------------------------
# Back to plain values


def to_plain(instance: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-safe) dict of a dataclass tree; tuples become lists."""
    return _plain(dataclasses.asdict(instance))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
