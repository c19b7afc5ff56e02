"""Convert Vac's INI configuration (``/etc/vac.d/*.conf``, ``/etc/vac.conf``) to lmrunner's YAML.

Every option is mapped through the schema's ``vac`` names (so deprecated spellings work too) and
validated with the schema's own converter, so the YAML produced passes ``load_config``. What has
no home in lmrunner is listed in :attr:`Conversion.dropped` with a reason, never silently lost.
"""

from __future__ import annotations

import configparser
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from lmrunner.config import (
    NAME_PATTERN,
    STANDARD_MACHINEFEATURES,
    FactoryConfig,
    MachinetypeConfig,
    PipeConfig,
)
from lmrunner.errors import ConfigError
from lmrunner.schema import Problems, convert, fields_of, info_of
from lmrunner.vactables import VAC_MODELS, VAC_NOT_CARRIED, vac_names
from lmrunner.yamlsrc import Where, one_line, read_text

VAC_DIR = "/var/lib/vac/machinetypes"
FAMILIES = {
    "user_data_option_": "user_data_options",
    "user_data_file_": "user_data_files",
    "machinefeatures_option_": "machinefeatures_options",
}
# Shared with the reference documentation; version_logger is carried over only by choice.
NO_HOME = {
    **VAC_NOT_CARRIED,
    "version_logger": "lmrunner's version logging is opt-in (default 0); set "
    "factory.version_logger again if wanted",
}
REJECTED_SECTIONS = {
    "factories": "section rejected by Vac too (use [settings] factories)",
    "targetshares": "section rejected by Vac too (use machinetype target_share)",
}
UNKNOWN = "unknown to Vac and lmrunner"

# (value, file, section header as written) of one option; sections keyed by (kind, name).
_Opt = tuple[str, str, str]
_Sections = dict[tuple[str, str], dict[str, _Opt]]


@dataclass(frozen=True)
class Conversion:
    """The result of :func:`convert_vac_conf`."""

    yaml_text: str  # lmrunner YAML, with a header comment naming the source files
    dropped: tuple[str, ...]  # "FILE: [section] option: reason", one per option not carried over


def default_vac_files(etc: Path = Path("/etc")) -> list[Path]:
    """Vac's files in Vac's reading order (later ones override earlier ones).

    Args:
        etc: the ``/etc`` directory; ``/var/run/vac.conf`` is looked up beside it
            (``etc.parent / "var/run/vac.conf"``), so tests can use a scratch tree.

    Returns:
        Sorted ``vac.d/*.conf``, then ``vac.conf``, then ``/var/run/vac.conf``, those present.
    """
    confd = sorted((etc / "vac.d").glob("*.conf"))
    return [
        *confd,
        *(p for p in (etc / "vac.conf", etc.parent / "var/run/vac.conf") if p.is_file()),
    ]


def convert_vac_conf(files: Sequence[Path]) -> Conversion:
    """Convert Vac's configuration files, read in the given order, to lmrunner YAML.

    Args:
        files: INI files in Vac's order (see :func:`default_vac_files`); later values win.

    Raises:
        ConfigError: a file is missing or not valid INI (naming file and line), or a value Vac
            would have rejected too; ``.errors`` holds one line per problem.
    """
    sections = _read(files)
    run = _Run()
    settings = sections.get(("settings", ""), {})
    if "vac_space" not in settings:
        names = one_line(", ".join(map(str, files)))
        raise ConfigError(f"{names}: [settings] vac_space: required by Vac")
    factory = _options(FactoryConfig, settings, "", run)
    factory["state_dir"] = "/var/lib/lmrunner"
    run.notes[("factory", "state_dir")] = ["lmrunner does not share Vac's /var/lib/vac"]
    # A relative [settings] user_data_file_X was looked up per machinetype: give each its own.
    shared = factory.get("user_data_files", {})
    relative = {k: v for k, v in shared.items() if not _is_absolute(v)}
    factory["user_data_files"] = {k: v for k, v in shared.items() if k not in relative}
    machinetypes: dict[str, dict[str, Any]] = {}
    pipes: dict[str, dict[str, Any]] = {}
    # Pipes first: a local machinetype overriding a pipe's type builds on the pipe's options.
    for (kind, name), options in sorted(sections.items(), key=lambda s: s[0][0] != "vacuum_pipe"):
        if kind in ("machinetype", "vacuum_pipe") and not re.fullmatch(NAME_PATTERN, name):
            run.problems.lines.append(f"{_where(options)}: [{kind} {name}]: expected [a-z0-9-]")
        elif kind == "vacuum_pipe":
            pipes[name] = _pipe(name, options, relative, run)
        elif kind == "machinetype":
            owner = next((p for p in pipes if name.startswith(f"{p}-")), None)
            overrides = pipes[owner].get("overrides", {}) if owner else None
            mt = _machinetype(name, options, owner, overrides, relative, run)
            if mt is not None:
                machinetypes[name] = mt
        elif kind != "settings":
            reason = REJECTED_SECTIONS.get(kind.lower(), f"section {UNKNOWN}")
            run.dropped += [f"{f}: [{h}] {o}: {reason}" for o, (_, f, h) in options.items()]
    if run.problems:
        problems = tuple(one_line(line) for line in run.problems.lines)  # names as written
        raise ConfigError("\n".join(problems), errors=problems)
    # Option and section names as written; a line break would also end a YAML comment below.
    run.dropped = [one_line(line) for line in run.dropped]
    data = {
        "factory": _ordered(FactoryConfig, factory),
        "machinetypes": machinetypes,
        "vacuum_pipes": pipes,
    }
    header = ["lmrunner configuration converted from Vac's (later files override earlier):"]
    header += [f"  {one_line(str(f))}" for f in files]
    header += ["Not carried over:", *(f"  {line}" for line in run.dropped)] if run.dropped else []
    lines = [f"# {line}".rstrip() for line in header] + _emit(data, run.notes, (), 0)
    return Conversion("\n".join(lines) + "\n", tuple(run.dropped))


@dataclass
class _Run:
    """What one conversion collects besides the YAML data."""

    problems: Problems = field(default_factory=Problems)
    dropped: list[str] = field(default_factory=list)
    notes: dict[tuple[str, ...], list[str]] = field(default_factory=dict)  # YAML comments


def _pipe(
    name: str, options: dict[str, _Opt], relative: Mapping[str, str], run: _Run
) -> dict[str, Any]:
    """A ``[vacuum_pipe NAME]`` section: url, target_share, and overrides for its types."""
    where = f"{_where(options)}: [vacuum_pipe {name}] vacuum_pipe_url"
    url = options.pop("vacuum_pipe_url", None)
    share = options.pop("target_share", None)
    pipe: dict[str, Any] = {"url": url[0] if url else None}
    if url is None or not url[0].startswith(("https://", "http://")):
        run.problems.lines.append(f"{where}: expected an http(s) URL")
    elif url[0].startswith("http://"):
        pipe["allow_http"] = True
        run.notes[("vacuum_pipes", name, "allow_http")] = ["Vac accepted a plain http pipe"]
    if share is not None:
        pipe.update(_options(PipeConfig, {"target_share": share}, name, run))
    overrides = _options(MachinetypeConfig, options, name, run)
    _merge_files(overrides, relative, name)
    # Vac kept the pipe's proxy certificate there; the pipe's JSON may turn proxies on.
    overrides.update(_x509(name))
    # Files the pipe's JSON names by relative name stay where Vac had them.
    overrides["files_dir"] = f"{VAC_DIR}/{name}/files"
    pipe["overrides"] = _ordered(MachinetypeConfig, overrides)
    return _ordered(PipeConfig, pipe)


def _machinetype(
    name: str,
    options: dict[str, _Opt],
    owner: str | None,
    pipe_overrides: Mapping[str, Any] | None,
    relative: Mapping[str, str],
    run: _Run,
) -> dict[str, Any] | None:
    """A ``[machinetype NAME]``; ``owner`` is the pipe whose type it overrides, if any."""
    mt = _options(MachinetypeConfig, options, owner or name, run)
    if mt.get("user_data_proxy"):
        mt.update(_x509(owner or name))
    if pipe_overrides is not None:
        # Option families merge name by name with the pipe's (lmrunner.pipes, as in Vac).
        # No default backend: the pipe's JSON decides.
        return _ordered(MachinetypeConfig, mt)
    if "image" not in mt:
        where = f"{_where(options)}: [machinetype {name}] root_image"
        run.dropped.append(f"{where}: missing; lmrunner requires it, machinetype not converted")
        return None
    if "backend" not in mt:
        mt["backend"] = "vm"
        run.notes[("machinetypes", name, "backend")] = ["no machine_model: Vac's default cernvm3"]
    _merge_files(mt, relative, name)
    return _ordered(MachinetypeConfig, mt)


def _read(files: Sequence[Path]) -> _Sections:
    """All files merged as Vac's single parser would, remembering where each value came from."""
    sections: _Sections = {}
    for path in files:
        text = read_text(path)
        # strict=False: Vac's Python 2 parser let a repeated option win instead of failing.
        parser = configparser.RawConfigParser(strict=False, default_section="\0")
        try:
            parser.read_string(text, source=str(path))
        except configparser.MissingSectionHeaderError as err:
            where = f"{one_line(str(path))}:{err.lineno}"
            raise ConfigError(f"{where}: option outside any [section]") from err
        except configparser.ParsingError as err:
            lineno, line = err.errors[0]
            where = f"{one_line(str(path))}:{lineno}"
            raise ConfigError(f"{where}: cannot parse {line.strip()!r}") from err
        for header in parser.sections():
            word, _, name = header.strip().partition(" ")
            kind = {"vmtype": "machinetype"}.get(word.lower(), word.lower())
            if kind not in ("machinetype", "vacuum_pipe"):
                kind, name = (kind, "") if kind == "settings" else (header, "")
            merged = sections.setdefault((kind, name.strip()), {})
            for option, value in parser.items(header):
                merged[option] = (value, str(path), header)
    return sections


def _options(cls: type[Any], raw: dict[str, _Opt], owner: str, run: _Run) -> dict[str, Any]:
    """Vac options of one section as lmrunner values of ``cls`` (one dict per family)."""
    names = vac_names(cls)
    priority = {vac: i for f, _h in fields_of(cls) for i, vac in enumerate(info_of(f).vac)}
    hints = {f.name: (f, h) for f, h in fields_of(cls)}
    out: dict[str, Any] = {}
    problems, dropped = run.problems, run.dropped
    chosen: dict[str, str] = {}
    # Vac looked up the current name first, then its deprecated spellings, whatever the file.
    for option in sorted(raw, key=lambda o: priority.get(o, 0)):
        value, file, header = raw[option]
        family = next((p for p in FAMILIES if option.startswith(p)), None)
        target = names.get(f"{family}*") if family else names.get(option)
        if option in NO_HOME or target is None:
            dropped.append(f"{file}: [{header}] {option}: {NO_HOME.get(option, UNKNOWN)}")
            continue
        if family is None and target in chosen:
            dropped.append(f"{file}: [{header}] {option}: overridden by {chosen[target]}")
            continue
        chosen[target] = option
        fld, hint = hints[target]
        if target == "user_data" and value.startswith("http://"):
            dropped.append(f"{file}: [{header}] {option}: lmrunner fetches it over https only")
            continue
        if target in ("image", "user_data") or family == "user_data_file_":
            value = _vac_file(value, owner)
        if target == "backend":
            if value not in VAC_MODELS:
                models = ", ".join(VAC_MODELS)
                problems.lines.append(f"{file}: [{header}] {option}: expected one of {models}")
                continue
            value = VAC_MODELS[value].value
        if family is not None:
            key = option.removeprefix(family)
            if family == "machinefeatures_option_" and key in STANDARD_MACHINEFEATURES:
                dropped.append(f"{file}: [{header}] {option}: lmrunner writes this key itself")
                continue
            before = len(problems.lines)
            where = f"[{header}] {option}"
            convert({key: value}, Mapping[str, str], info_of(fld), Where(file), where, problems)
            if len(problems.lines) == before:
                out.setdefault(target, {})[key] = value
            continue
        before = len(problems.lines)
        result = convert(value, hint, info_of(fld), Where(file), f"[{header}] {option}", problems)
        if len(problems.lines) == before:
            out[target] = _plain(result)
    return out


def _plain(value: Any) -> Any:
    """A converted value as YAML-friendly data."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _is_absolute(value: str) -> bool:
    return value.startswith("/") or "://" in value


def _vac_file(value: str, owner: str) -> str:
    """Vac resolved relative names in its machinetype's files/: keep using the site's files.

    ``owner`` is empty for [settings]: those are resolved per machinetype (:func:`_merge_files`).
    """
    if not value or not owner or _is_absolute(value):
        return value
    return f"{VAC_DIR}/{owner}/files/{value}"


def _x509(owner: str) -> dict[str, str]:
    return {f"x509_{k}": f"{VAC_DIR}/{owner}/x509{k}.pem" for k in ("cert", "key")}


def _merge_files(options: dict[str, Any], relative: Mapping[str, str], owner: str) -> None:
    if relative:
        own = {k: _vac_file(v, owner) for k, v in relative.items()}
        options["user_data_files"] = own | options.get("user_data_files", {})


def _ordered(cls: type[Any], options: dict[str, Any]) -> dict[str, Any]:
    """Keys in schema order; empty families left out (they are lmrunner's default)."""
    order = [f.name for f in dataclasses.fields(cls)]
    return {k: options[k] for k in sorted(options, key=order.index) if options[k] != {}}


def _where(options: Mapping[str, _Opt]) -> str:
    return next((file for _v, file, _h in options.values()), "(no options)")


def _emit(
    data: Mapping[str, Any],
    notes: Mapping[tuple[str, ...], list[str]],
    path: tuple[str, ...],
    indent: int,
) -> list[str]:
    """Block YAML with comments: sections and entries by hand, values through yaml.safe_dump."""
    lines: list[str] = []
    pad = " " * indent
    for key, value in data.items():
        here = (*path, key)
        lines += [f"{pad}# {note}" for note in notes.get(here, [])]
        if isinstance(value, dict) and value and len(here) <= 2:
            lines.append(f"{pad}{key}:")
            lines += _emit(value, notes, here, indent + 2)
        else:
            dumped = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False)
            lines += [f"{pad}{line}" for line in dumped.splitlines()]
    return lines
