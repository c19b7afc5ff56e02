"""YAML loading that remembers where every key came from.

Configuration errors must name the file and the line, so mappings are loaded as
:class:`Located` dicts that carry the file and line of each of their keys. Duplicate keys are
errors (plain YAML silently keeps the last one).

Input that is not what it should be fails with one line naming the file: text that is not UTF-8
(a leading BOM is fine) or holds NUL (with the offset of the first bad byte), values no
configuration holds (integers beyond 64 bits, impossible dates, lone surrogates), and documents
nested too deeply or blown up by aliases, so that what walks the data later can neither run out
of stack nor run for ever.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from lmrunner.errors import ConfigError, LmrunnerError

#: Larger than any configuration file; stops a mistaken /dev/zero or log file early.
MAX_FILE_BYTES = 16 * 1024 * 1024
#: Deeper than any configuration or pipe document, and far below Python's recursion limit.
MAX_DEPTH = 32
#: Values in a document once its aliases are expanded: a "billion laughs" stops here.
MAX_NODES = 1_000_000
#: No count, size or time lmrunner knows is larger (and Python refuses to print 4300+ digits).
MAX_INT = 2**63 - 1
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Where:
    """A place in the configuration: a file and a line, or a described origin (a pipe entry)."""

    source: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source


class Located(dict[str, Any]):
    """A mapping whose keys know where they were written."""

    def __init__(self, where: Where) -> None:
        super().__init__()
        self.where = where
        self.key_where: dict[str, Where] = {}

    def put(self, key: str, value: Any, where: Where) -> None:
        self[key] = value
        self.key_where[key] = where

    def where_of(self, key: str) -> Where:
        return self.key_where.get(key, self.where)


def one_line(text: str) -> str:
    """``text`` with every unprintable character escaped (line breaks, NUL, lone surrogates).

    Errors quote file names, keys and values as written: one holding a line break must not
    split (or forge) a line of the report.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def decode_text(data: bytes, source: str, error: Callable[[str], LmrunnerError]) -> str:
    """``data`` as UTF-8 text without NUL characters; a leading BOM is dropped.

    Raises:
        the ``error`` made of one line naming ``source`` and the offset of the first bad byte.
    """
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{one_line(source)}: not UTF-8 text (byte {start + err.start})") from err
    nul = text.find("\0")
    if nul >= 0:
        offset = start + len(text[:nul].encode())
        raise error(f"{one_line(source)}: not text: NUL character (byte {offset})")
    return text


def read_bytes(path: Path) -> bytes:
    """The bytes of a configuration file, at most :data:`MAX_FILE_BYTES`.

    Raises:
        ConfigError: it is missing, unreadable (a folder, no permission) or too large.
    """
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError as err:
        raise ConfigError(f"{one_line(str(path))}: no such file") from err
    except OSError as err:
        raise ConfigError(f"{one_line(str(path))}: cannot read: {err.strerror or err}") from err
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{one_line(str(path))}: larger than {MAX_FILE_BYTES} bytes")
    return data


def read_text(path: Path) -> str:
    """The text of a configuration file (see :func:`read_bytes` and :func:`decode_text`)."""
    return decode_text(read_bytes(path), str(path), ConfigError)


def load_yaml(path: Path) -> Any:
    """Parse one YAML file into plain values and :class:`Located` mappings.

    Raises:
        ConfigError: the file cannot be read, is no UTF-8 text or no valid YAML, or holds
            values no configuration holds (one line, with the position).
    """
    data = read_bytes(path)
    text = decode_text(data, str(path), ConfigError)
    name = one_line(str(path))
    loader = None
    try:
        loader = _Loader(text, str(path))  # its reader checks for control characters here
        result = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        what = one_line(str(err.problem or err.context))
        raise ConfigError(f"{name}{line}: invalid YAML: {what}") from err
    except yaml.reader.ReaderError as err:
        # A control character YAML refuses: where it is in bytes, as for bad UTF-8.
        bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        offset = bom + len(text[: err.position].encode())
        raise ConfigError(
            f"{name}: invalid YAML: control character U+{err.character:04X} (byte {offset})"
        ) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: invalid YAML: {one_line(str(err))}") from err
    except RecursionError as err:
        raise ConfigError(f"{name}: invalid YAML: nested too deeply") from err
    except (ValueError, ArithmeticError, LookupError, TypeError) as err:
        # PyYAML's scanner has plain errors too ("\U0A010000" escapes: chr() out of range).
        line = f":{loader.line + 1}" if loader is not None else ""
        raise ConfigError(f"{name}{line}: invalid YAML: {one_line(str(err))}") from err
    finally:
        if loader is not None:
            loader.dispose()
    problem = tree_problem(result, max_nodes=MAX_NODES)
    if problem:
        raise ConfigError(f"{name}: {problem}")
    return result


def tree_problem(
    data: Any, *, max_depth: int = MAX_DEPTH, max_nodes: int | None = None
) -> str | None:
    """Why parsed data (YAML or JSON) is unfit for lmrunner to walk, or None when it is fit.

    Checks nesting depth, the count of values with aliases expanded (``max_nodes``) and every
    text for NUL characters and lone surrogates (JSON's ``"\\u0000"``, ``"\\ud800"``). Shared
    containers are counted once per use but walked once, so an alias bomb is refused quickly.
    """
    sizes: dict[int, int] = {}  # id of a container walked -> its values, aliases expanded
    if not isinstance(data, dict | list | tuple | set | frozenset):
        return _scalar_problem(data)
    stack: list[tuple[Any, list[Any], list[int]]] = [(data, _children(data), [1])]
    while stack:
        container, children, size = stack[-1]
        if not children:
            stack.pop()
            sizes[id(container)] = size[0]
            if stack:
                stack[-1][2][0] += size[0]
            if max_nodes is not None and size[0] > max_nodes:
                return f"more than {max_nodes} values once its aliases are expanded"
            continue
        child = children.pop()
        if not isinstance(child, dict | list | tuple | set | frozenset):
            problem = _scalar_problem(child)
            if problem:
                return problem
            size[0] += 1
        elif id(child) in sizes:
            size[0] += sizes[id(child)]
        elif len(stack) >= max_depth:
            return f"nested deeper than {max_depth} levels"
        else:
            stack.append((child, _children(child), [1]))
    return None


def _children(container: Any) -> list[Any]:
    if isinstance(container, dict):
        return [*container.keys(), *container.values()]
    return list(container)


def _scalar_problem(value: Any) -> str | None:
    if isinstance(value, str):
        bad = _BAD_CHARS.search(value)
        if bad is not None:
            what = "a NUL character" if bad.group() == "\0" else "a lone surrogate (no Unicode)"
            return f"a text holds {what}: {value[:40]!r}"
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return "an integer beyond 64 bits"
    return None


def located_from(data: Any, where: Where) -> Any:
    """Wrap plain JSON-like data (e.g. a pipe entry) so every key reports ``where``."""
    if isinstance(data, dict):
        out = Located(where)
        for key, value in data.items():
            out.put(str(key), located_from(value, where), where)
        return out
    if isinstance(data, list):
        return [located_from(item, where) for item in data]
    return data


class _Loader(yaml.SafeLoader):
    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, ArithmeticError, LookupError, TypeError) as err:
            # A scalar that cannot be what it is tagged or looks like: 2024-13-45, !!int abc,
            # !!bool maybe, !!int "". PyYAML's constructors raise plain errors for those.
            raise ConstructorError(
                None, None, f"cannot read this {_tag_name(node.tag)}: {err}", node.start_mark
            ) from err

    def construct_scalar(self, node: yaml.ScalarNode | yaml.MappingNode) -> Any:
        value = super().construct_scalar(node)
        # "\0" and "\ud800" escapes give text no file name, argv or environment can hold.
        bad = _BAD_CHARS.search(value) if isinstance(value, str) else None
        if bad is not None:
            what = "NUL character" if bad.group() == "\0" else "lone surrogate (no Unicode)"
            raise ConstructorError(None, None, f"a {what} in a value", node.start_mark)
        return value


def _tag_name(tag: str) -> str:
    return tag.removeprefix("tag:yaml.org,2002:") if tag else "value"


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    try:
        value: int = SafeConstructor.construct_yaml_int(loader, node)
    except ValueError as err:
        if re.fullmatch(r"[-+]?[0-9_]+", str(node.value)):  # more digits than int() takes
            raise ConstructorError(
                None, None, "an integer beyond 64 bits", node.start_mark
            ) from err
        raise
    if abs(value) > MAX_INT:
        raise ConstructorError(None, None, "an integer beyond 64 bits", node.start_mark)
    return value


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    out = Located(Where(loader.source, node.start_mark.line + 1))
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        where = Where(loader.source, key_node.start_mark.line + 1)
        if not isinstance(key, str | int | float | bool):
            raise ConfigError(
                one_line(f"{where}: mapping keys must be plain names, got {_short(key)}")
            )
        name = str(key)
        if name in out:
            first = out.where_of(name)
            raise ConfigError(
                one_line(f"{where}: {name}: duplicate key (first given at line {first.line})")
            )
        out.put(name, loader.construct_object(value_node, deep=True), where)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
