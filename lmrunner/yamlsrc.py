"""YAML loading that remembers where every key came from.

Configuration errors must name the file and the line, so mappings are loaded as
:class:`Located` dicts that carry the file and line of each of their keys. Duplicate keys are
errors (plain YAML silently keeps the last one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmrunner.errors import ConfigError


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


def load_yaml(path: Path) -> Any:
    """Parse one YAML file into plain values and :class:`Located` mappings.

    Raises:
        ConfigError: the file cannot be read or is not valid YAML (one line, with the position).
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    loader = _Loader(text, str(path))
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {err.problem or err.context}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    finally:
        loader.dispose()


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


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    out = Located(Where(loader.source, node.start_mark.line + 1))
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        where = Where(loader.source, key_node.start_mark.line + 1)
        if not isinstance(key, str | int | float | bool):
            raise ConfigError(f"{where}: mapping keys must be plain names, got {key!r}")
        name = str(key)
        if name in out:
            first = out.where_of(name)
            raise ConfigError(f"{where}: {name}: duplicate key (first given at line {first.line})")
        out.put(name, loader.construct_object(value_node, deep=True), where)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
