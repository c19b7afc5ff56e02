"""Convert Vac's INI configuration (``/etc/vac.d/*.conf``, ``/etc/vac.conf``) to lmrunner's YAML.

Every option is mapped through the schema's ``vac`` names (so deprecated spellings work too) and
validated with the schema's own converter, so the YAML produced passes ``load_config``. What has
no home in lmrunner is listed in :attr:`Conversion.dropped` with a reason; what is carried over
but behaves differently (an option lmrunner accepts without acting on it, Vac's ``0`` disk size,
an ``http://`` URL) is listed in :attr:`Conversion.warnings`. Nothing is lost silently.
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
from lmrunner.schema import Problems, convert, default_of, fields_of, info_of
from lmrunner.vactables import (
    VAC_MACHINETYPE_NOT_CARRIED,
    VAC_MODELS,
    VAC_NOT_CARRIED,
    VAC_OLD_NAMES,
    vac_names,
)
from lmrunner.yamlsrc import Where, one_line, read_text

VAC_DIR = "/var/lib/vac/machinetypes"
FAMILIES = {
    "user_data_option_": "user_data_options",
    "user_data_file_": "user_data_files",
    "machinefeatures_option_": "machinefeatures_options",
}
NO_HOME: Mapping[type[Any], Mapping[str, str]] = {
    FactoryConfig: VAC_NOT_CARRIED,
    MachinetypeConfig: {**VAC_NOT_CARRIED, **VAC_MACHINETYPE_NOT_CARRIED},
    PipeConfig: VAC_NOT_CARRIED,
}
HTTP = "fetched without TLS (as Vac did), so anyone on the path can change what LMs run"
#: Vac's older true/false values of version_logger (messages per day).
VAC_VERSION_LOGGER = {"true": "1", "false": "0"}
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
    #: "FILE: [section] option: what changed", one per option carried over with a difference
    warnings: tuple[str, ...] = ()


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
    factory = _options(FactoryConfig, settings, "", run, ("factory",))
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
    if run.plain_http:
        factory["allow_http"] = True
        run.notes[("factory", "allow_http")] = [
            "Vac fetched these http:// URLs; lmrunner needs allow_http for them:",
            *(f"  {option}" for option in run.plain_http),
        ]
    # Option and section names as written; a line break would also end a YAML comment below.
    run.dropped = [one_line(line) for line in run.dropped]
    run.warnings = [one_line(line) for line in run.warnings]
    data = {
        "factory": _ordered(FactoryConfig, factory),
        "machinetypes": machinetypes,
        "vacuum_pipes": pipes,
    }
    header = ["lmrunner configuration converted from Vac's (later files override earlier):"]
    header += [f"  {one_line(str(f))}" for f in files]
    header += ["Not carried over:", *(f"  {line}" for line in run.dropped)] if run.dropped else []
    header += ["Warnings:", *(f"  {line}" for line in run.warnings)] if run.warnings else []
    notes = {k: [one_line(n) for n in v] for k, v in run.notes.items()}
    lines = [f"# {line}".rstrip() for line in header] + _emit(data, notes, (), 0)
    return Conversion("\n".join(lines) + "\n", tuple(run.dropped), tuple(run.warnings))


@dataclass
class _Run:
    """What one conversion collects besides the YAML data."""

    problems: Problems = field(default_factory=Problems)
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: dict[tuple[str, ...], list[str]] = field(default_factory=dict)  # YAML comments
    plain_http: list[str] = field(default_factory=list)  # "[section] option" with an http:// URL


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
        run.notes[("vacuum_pipes", name, "allow_http")] = [f"a plain http pipe: {HTTP}"]
        run.warnings.append(
            f"{url[1]}: [{url[2]}] vacuum_pipe_url: http:// URL kept with "
            f"vacuum_pipes.{name}.allow_http: true; {HTTP}"
        )
    if share is not None:
        pipe.update(
            _options(PipeConfig, {"target_share": share}, name, run, ("vacuum_pipes", name))
        )
    old_proxy = _pop_old_proxy(options)
    overrides = _options(MachinetypeConfig, options, name, run, ("vacuum_pipes", name, "overrides"))
    _merge_files(overrides, relative, name)
    # Vac kept the pipe's proxy certificate there; the pipe's JSON may turn proxies on.
    overrides.update(_x509(name))
    _old_proxy(old_proxy, overrides, name, False, run)
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
    old_proxy = _pop_old_proxy(options)
    mt = _options(MachinetypeConfig, options, owner or name, run, ("machinetypes", name))
    if mt.get("user_data_proxy"):
        mt.update(_x509(owner or name))
    # Pipes came with Vac 03, which ignored the old names: a pipe's type keeps x509cert.pem.
    _old_proxy(old_proxy, mt, owner or name, owner is None and not mt.get("user_data_proxy"), run)
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


def _pop_old_proxy(options: dict[str, _Opt]) -> dict[str, _Opt]:
    """Remove (and return) Vac's pre-03 user_data_proxy_cert / user_data_proxy_key."""
    old = VAC_OLD_NAMES[MachinetypeConfig]
    return {option: options.pop(option) for option in sorted(old) if option in options}


def _old_proxy(
    given: Mapping[str, _Opt], mt: dict[str, Any], owner: str, keep: bool, run: _Run
) -> None:
    """Carry Vac's pre-03 proxy certificate and key over as x509_cert / x509_key (``keep``),
    or report them dropped: Vac 03 ignored them and used the machinetype's x509cert.pem and
    x509key.pem with user_data_proxy, which the conversion keeps."""
    hints = {f.name: (f, h) for f, h in fields_of(MachinetypeConfig)}
    for option, (value, file, header) in given.items():
        target = VAC_OLD_NAMES[MachinetypeConfig][option]
        if not keep:
            run.dropped.append(
                f"{file}: [{header}] {option}: ignored by Vac 03, which made the proxy from "
                f"x509cert.pem and x509key.pem in {VAC_DIR}/{owner} (as this conversion does)"
            )
            continue
        # Old Vac looked a relative name up in the machinetype's folder (not in files/).
        path = value if value.startswith("/") or not value else f"{VAC_DIR}/{owner}/{value}"
        fld, hint = hints[target]
        before = len(run.problems.lines)
        result = convert(
            path, hint, info_of(fld), Where(file), f"[{header}] {option}", run.problems
        )
        if len(run.problems.lines) == before:
            mt[target] = _plain(result)
            run.warnings.append(
                f"{file}: [{header}] {option}: old Vac name, carried over as {target}; Vac 03 "
                "ignored it, and lmrunner uses it only with user_data_proxy: true"
            )


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


def _options(
    cls: type[Any], raw: dict[str, _Opt], owner: str, run: _Run, at: tuple[str, ...]
) -> dict[str, Any]:
    """Vac options of one section as lmrunner values of ``cls`` (one dict per family).

    ``at`` is where the values go in the YAML (``("machinetypes", "lhcb")``), for comments.
    """
    old_names = VAC_OLD_NAMES.get(cls, {})
    names = {**vac_names(cls), **old_names}
    priority = {vac: i for f, _h in fields_of(cls) for i, vac in enumerate(info_of(f).vac)}
    hints = {f.name: (f, h) for f, h in fields_of(cls)}
    priority |= {old: len(info_of(hints[target][0]).vac) for old, target in old_names.items()}
    no_home = NO_HOME.get(cls, VAC_NOT_CARRIED)
    out: dict[str, Any] = {}
    problems, dropped, warnings = run.problems, run.dropped, run.warnings
    chosen: dict[str, str] = {}
    # Vac looked up the current name first, then its deprecated spellings, whatever the file.
    for option in sorted(raw, key=lambda o: priority.get(o, 0)):
        value, file, header = raw[option]
        label = f"[{header}] {option}"
        where = f"{file}: {label}"
        family = next((p for p in FAMILIES if option.startswith(p)), None)
        target = names.get(f"{family}*") if family else names.get(option)
        if option in no_home or target is None:
            dropped.append(f"{where}: {no_home.get(option, UNKNOWN)}")
            continue
        if family is None and target in chosen:
            dropped.append(f"{where}: overridden by {chosen[target]}")
            continue
        chosen[target] = option
        fld, hint = hints[target]
        info = info_of(fld)
        if target in ("image", "user_data") and value.startswith("http://"):
            run.plain_http.append(f"[{header}] {option}")
            warnings.append(f"{where}: http:// URL kept with factory.allow_http: true; {HTTP}")
        if target in ("image", "user_data") or family == "user_data_file_":
            value = _vac_file(value, owner)
        if target == "backend":
            if value not in VAC_MODELS:
                models = ", ".join(VAC_MODELS)
                problems.lines.append(f"{where}: expected one of {models}")
                continue
            value = VAC_MODELS[value].value
        if target == "version_logger":
            number = VAC_VERSION_LOGGER.get(value.strip().lower(), value.strip())
            if not number.isascii() or not number.isdigit():
                dropped.append(f"{where}: not an integer, which Vac took as 0 (the default here)")
                continue
            value = number
        if family is not None:
            key = option.removeprefix(family)
            if family == "machinefeatures_option_" and key in STANDARD_MACHINEFEATURES:
                dropped.append(f"{where}: lmrunner writes this key itself")
                continue
            before = len(problems.lines)
            convert({key: value}, Mapping[str, str], info, Where(file), label, problems)
            if len(problems.lines) == before:
                out.setdefault(target, {})[key] = value
            continue
        before = len(problems.lines)
        result = convert(value, hint, info, Where(file), label, problems)
        if len(problems.lines) > before:
            continue
        if target == "disk_gb_per_processor" and result == 0:
            warnings.append(f"{where}: {_zero_disk(cls, fld)}")
            continue
        if info.unsupported and result != default_of(fld):
            warnings.append(f"{where}: {info.unsupported}")
            run.notes[(*at, target)] = [info.unsupported]
        if option in old_names:
            warnings.append(f"{where}: old Vac name, carried over as {target}")
        out[target] = _plain(result)
    return out


def _zero_disk(cls: type[Any], fld: dataclasses.Field[Any]) -> str:
    """Why Vac's disk_gb_per_processor = 0 is left unset (vac.md 4.4)."""
    if cls is FactoryConfig:
        then = f"lmrunner's default ({default_of(fld):g} GB per processor) applies"
    else:
        then = "the factory's disk_gb_per_processor applies"
    return (
        "0 meant the default size in Vac (a share of the volume group, or 40 GB per processor "
        f"for a VM's disk file), not no disk; left unset: {then}"
    )


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
