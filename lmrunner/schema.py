"""Declarative description of configuration options, and the one converter that applies it.

Each option is a dataclass field made with :func:`option`, which records its documentation,
unit, Vac name(s) and bounds. :func:`build` turns a :class:`~lmrunner.yamlsrc.Located` mapping
into a frozen dataclass, collecting one-line errors that name the file, the line, the key and what
was expected. The reference page ``docs/configuration.md`` is generated from the same fields
(``lmrunner config-reference``), so documentation and code cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lmrunner.yamlsrc import MAX_INT, Located, Where, one_line


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: Default of an option that must be given.
REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class OptionInfo:
    """What the documentation and the converter know about one option."""

    doc: str
    unit: str = ""
    vac: tuple[str, ...] = ()  # Vac's name, then its deprecated names
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None  # a regex every string value (or list item) must match
    pattern_text: str = ""  # what the pattern means, for error messages
    default_text: str = ""  # how to show a computed default in the docs
    #: Empty, or why the option is accepted but has no effect: one line starting "not
    #: supported" ("not supported by lmrunner: ..." or "not supported yet: ..."). Setting such an
    #: option to anything but its default earns a warning from `check` and `import-vac-conf`.
    unsupported: str = ""


def option(
    default: Any,
    doc: str,
    *,
    unit: str = "",
    vac: str | tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    pattern: str | None = None,
    pattern_text: str = "",
    default_text: str = "",
    unsupported: str = "",
) -> Any:
    """A dataclass field carrying an :class:`OptionInfo`."""
    if unsupported and (not unsupported.startswith("not supported") or "\n" in unsupported):
        raise ValueError(f"unsupported must be one line starting 'not supported': {unsupported!r}")
    info = OptionInfo(
        doc=doc,
        unit=unit,
        vac=(vac,) if isinstance(vac, str) else vac,
        minimum=minimum,
        maximum=maximum,
        pattern=pattern,
        pattern_text=pattern_text,
        default_text=default_text,
        unsupported=unsupported,
    )
    if isinstance(default, dict):
        return field(
            default_factory=lambda: types.MappingProxyType(dict(default)), metadata={"info": info}
        )
    return field(default=default, metadata={"info": info})


def info_of(f: dataclasses.Field[Any]) -> OptionInfo:
    info = f.metadata.get("info")
    assert isinstance(info, OptionInfo), f"{f.name} was not declared with option()"
    return info


class Problems:
    """One-line errors collected while building, each naming where it happened."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: Where, path: str, message: str) -> None:
        # Keys and file names come as written: a line break in one must not split the line.
        self.lines.append(one_line(f"{where}: {path}: {message}"))

    def __bool__(self) -> bool:
        return bool(self.lines)


T = TypeVar("T")


def build(
    cls: type[T],
    raw: Located,
    path: str,
    problems: Problems,
    *,
    extra: Mapping[str, Any] | None = None,
    skip: frozenset[str] = frozenset(),
) -> T | None:
    """Convert ``raw`` into ``cls``; return None (with problems recorded) when it is invalid.

    Args:
        cls: a frozen dataclass whose fields were made with :func:`option`.
        raw: the mapping as written.
        path: dotted name of the mapping, for messages (``machinetypes.lhcb``).
        problems: where errors go.
        extra: values for fields that are not read from ``raw`` (e.g. ``name``).
        skip: keys of ``raw`` that the caller handles itself.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = dict(extra or {})
    before = len(problems.lines)
    settable = [name for name, f in fields.items() if "info" in f.metadata and name not in given]
    for key in raw:
        if key in skip:
            continue
        if key not in settable:
            problems.add(raw.where_of(key), f"{path}.{key}", unknown_key_message(key, settable))
            continue
        f = fields[key]
        value = convert(
            raw[key], hints[key], info_of(f), raw.where_of(key), f"{path}.{key}", problems
        )
        if value is not _INVALID:
            given[key] = value
    for name in settable:
        if name not in given and name not in raw and fields[name].default is REQUIRED:
            problems.add(raw.where, f"{path}.{name}", f"required; {info_of(fields[name]).doc}")
    if len(problems.lines) > before:
        return None
    kwargs = {name: value for name, value in given.items() if name in fields}
    return cls(**kwargs)


def unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        hint = f"; did you mean '{close[0]}'?"
    elif len(valid) <= 8:
        hint = f"; valid keys: {', '.join(sorted(valid))}"
    else:
        hint = " (valid keys: docs/configuration.md or `lmrunner config-reference`)"
    return f"unknown key{hint}"


_INVALID: Any = object()


def convert(
    value: Any, hint: Any, info: OptionInfo, where: Where, path: str, problems: Problems
) -> Any:
    """Convert one YAML value to the annotated type, or record why it cannot be."""
    try:
        return _convert(value, hint, info)
    except _Bad as bad:
        problems.add(where, path, f"expected {bad.expected}, got {_show(value)}")
        return _INVALID


class _Bad(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _show(value: Any) -> str:
    if isinstance(value, Located):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and abs(value) > MAX_INT:
        return "a very large integer"  # its repr may be refused (more than 4300 digits)
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _convert(value: Any, hint: Any, info: OptionInfo) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if value is None and type(None) in args:
            return None
        if len(inner) == 1:
            return _convert(value, inner[0], info)
        for candidate in inner:  # e.g. int | str: the first that fits
            try:
                return _convert(value, candidate, info)
            except _Bad:
                continue
        raise _Bad(" or ".join(_describe(a, info) for a in inner))
    if origin is tuple:
        items = value if isinstance(value, list) else None
        if isinstance(value, str):
            items = value.split()  # Vac's space-separated lists
        if items is None:
            raise _Bad(f"a list of {_describe(args[0], info)}")
        return tuple(_convert(item, args[0], info) for item in items)
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, dict):
            raise _Bad("a mapping of names to text")
        out: dict[str, Any] = {}
        if args and args[1] is Any:  # kept as written; checked by whoever uses it
            return types.MappingProxyType(dict(value))
        for key, item in value.items():
            if not re.fullmatch(r"[a-z0-9_]+", str(key)):
                raise _Bad(f"names of [a-z0-9_] only (not {key!r})")
            out[str(key)] = _convert(item, args[1] if args else str, OptionInfo(doc=""))
        return types.MappingProxyType(out)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "yes",
            "true",
            "on",
            "1",
            "no",
            "false",
            "off",
            "0",
        ):
            return value.lower() in ("yes", "true", "on", "1")
        raise _Bad("true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise _Bad(_describe(int, info))
        try:
            number = int(value)
        except ValueError as err:
            raise _Bad(_describe(int, info)) from err
        if abs(number) > MAX_INT:
            raise _Bad(_describe(int, info))
        _check_bounds(number, info, int)
        return number
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _Bad(_describe(float, info))
        try:
            real = float(value)
        except (ValueError, OverflowError) as err:  # OverflowError: an int beyond any float
            raise _Bad(_describe(float, info)) from err
        if not math.isfinite(real):  # nan passes every bound check; inf is no amount
            raise _Bad(_describe(float, info))
        _check_bounds(real, info, float)
        return real
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Bad(_describe(str, info))
        text = str(value)
        if info.pattern and not re.fullmatch(info.pattern, text):
            raise _Bad(info.pattern_text or f"text matching {info.pattern}")
        return text
    if hint is Path:
        if not isinstance(value, str) or not value.startswith("/"):
            raise _Bad("an absolute path")
        return Path(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [member.value for member in hint]
        if value in choices:
            return hint(value)
        raise _Bad("one of " + ", ".join(repr(c) for c in choices))
    raise TypeError(f"no converter for {hint!r}")  # a schema bug, not bad input


def _check_bounds(number: float, info: OptionInfo, kind: type) -> None:
    if (info.minimum is not None and number < info.minimum) or (
        info.maximum is not None and number > info.maximum
    ):
        raise _Bad(_describe(kind, info))


def _describe(hint: Any, info: OptionInfo) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "text",
        Path: "an absolute path",
        bool: "true or false",
    }
    base = names.get(hint, getattr(hint, "__name__", str(hint)))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        base = "one of " + ", ".join(repr(m.value) for m in hint)
    if hint in (int, float):
        lo = _num(info.minimum)
        hi = _num(info.maximum)
        if lo is not None and hi is not None:
            base += f" from {lo} to {hi}"
        elif lo is not None:
            base += f" >= {lo}"
        elif hi is not None:
            base += f" <= {hi}"
    if hint is str and info.pattern_text:
        base = info.pattern_text
    return base


def _num(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else str(value)


def type_text(hint: Any) -> str:
    """How a field's type is shown in the reference documentation."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return f"list of {type_text(args[0])}"
    if origin in (Mapping, dict) or hint is Mapping:
        return "mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " \\| ".join(m.value for m in hint)
    return {int: "integer", float: "number", str: "text", Path: "path", bool: "boolean"}.get(
        hint, str(hint)
    )


def default_text(f: dataclasses.Field[Any]) -> str:
    info = info_of(f)
    if info.default_text:
        return info.default_text
    if f.default is REQUIRED:
        return "**required**"
    if f.default is dataclasses.MISSING:
        return "{}"
    value = f.default
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[]" if not value else "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def fields_of(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], Any]]:
    """The documented fields of ``cls`` with their resolved type hints."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "info" in f.metadata]


def unsupported_values(obj: Any, path: str) -> list[tuple[str, str, str]]:
    """(path, option, reason) of every option of ``obj`` marked unsupported that is set.

    "Set" means holding anything but the option's default: a value equal to the default is what
    lmrunner does anyway.

    Args:
        obj: an instance of a dataclass whose fields were made with :func:`option`.
        path: the dotted name of ``obj`` in the configuration (``machinetypes.lhcb``).
    """
    out: list[tuple[str, str, str]] = []
    for f, _hint in fields_of(type(obj)):
        reason = info_of(f).unsupported
        if reason and getattr(obj, f.name) != default_of(f):
            out.append((path, f.name, reason))
    return out


def default_of(f: dataclasses.Field[Any]) -> Any:
    """The default value of a field (a fresh one for a default factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


#: Used by callers that post-process fields: a function (value) -> error text or None.
Check = Callable[[Any], str | None]
