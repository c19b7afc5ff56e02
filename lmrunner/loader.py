"""Reading the configuration: the main YAML file and ``conf.d/*.yaml`` merged, the Vacuum Pipes'
cached documents expanded into machinetypes, everything validated into the frozen objects of
:mod:`lmrunner.config` (one line per problem, naming file, line, key and what was expected)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmrunner import pipes as pipes_mod
from lmrunner.config import (
    DEFAULT_CONFIG,
    FQDN_PATTERN,
    FQDN_TEXT,
    NAME_PATTERN,
    NAME_TEXT,
    SECTIONS,
    STANDARD_MACHINEFEATURES,
    Config,
    FactoryConfig,
    MachinetypeConfig,
    PipeConfig,
    resolve_local,
)
from lmrunner.errors import ConfigError
from lmrunner.schema import Problems, build, unknown_key_message
from lmrunner.vacquery.auth import load_secret
from lmrunner.yamlsrc import Located, Where, load_yaml, one_line


def usable_cpus() -> int:
    """CPUs this process may run on (respects cpusets and affinity, unlike /proc/cpuinfo)."""
    return len(os.sched_getaffinity(0))


def config_files(path: Path) -> list[Path]:
    """The main file followed by ``conf.d/*.yaml`` beside it, in name order."""
    confd = path.parent / "conf.d"
    if not confd.is_dir():
        return [path]
    try:
        entries = list(confd.iterdir())  # glob() takes an unreadable folder for an empty one
    except OSError as err:
        raise ConfigError(f"{one_line(str(confd))}: cannot read: {err.strerror or err}") from err
    # As glob("*.yaml"): no hidden files.
    wanted = (e for e in entries if e.name.endswith(".yaml") and not e.name.startswith("."))
    return [path, *sorted(wanted)]


def load_config(
    path: Path = DEFAULT_CONFIG,
    *,
    pipe_documents: Mapping[str, Any] | None = None,
    hostname: str | None = None,
    cpus: int | None = None,
    check_files: bool = True,
) -> Config:
    """Read, merge and validate the configuration.

    Args:
        path: the main YAML file; ``conf.d/*.yaml`` beside it are merged in name order.
        pipe_documents: the cached document of each Vacuum Pipe by name (see
            :mod:`lmrunner.pipes`); a pipe without one contributes no machinetypes yet.
        hostname: this host's FQDN (default: ``socket.getfqdn()``).
        cpus: CPUs usable by this process (default: :func:`usable_cpus`).
        check_files: verify that referenced local files exist and are readable.

    Raises:
        ConfigError: with ``.errors``, one line per problem, naming file, line, key and what
            was expected.
    """

    files = config_files(path)
    merged = Located(Where(str(path), 1))
    problems = Problems()
    for file in files:
        data = load_yaml(file) if file.exists() or file == path else None
        if data is None:
            continue
        if not isinstance(data, Located):
            problems.add(Where(str(file), 1), "(top level)", "expected a mapping of sections")
            continue
        _merge(merged, data)
    for key in merged:
        if key not in SECTIONS:
            problems.add(merged.where_of(key), key, unknown_key_message(key, list(SECTIONS)))

    factory_raw = _section(merged, "factory", problems)
    # shutdown_time also takes ISO 8601 text: _finish_factory parses it.
    factory = build(
        FactoryConfig, factory_raw, "factory", problems, skip=frozenset({"shutdown_time"})
    )
    if factory is not None:
        factory = _finish_factory(factory, factory_raw, problems, hostname, cpus)

    pipes: dict[str, PipeConfig] = {}
    pipes_raw = _section(merged, "vacuum_pipes", problems)
    for name, raw in pipes_raw.items():
        if _named_section(pipes_raw.where_of(name), name, raw, "vacuum_pipes", problems):
            built = build(PipeConfig, raw, f"vacuum_pipes.{name}", problems, extra={"name": name})
            if built is not None and pipes_mod.check_pipe(built, raw, problems):
                pipes[name] = built

    local_raw = _section(merged, "machinetypes", problems)
    warnings: list[str] = []
    expanded = pipes_mod.expand_pipes(pipes, pipe_documents or {}, local_raw, warnings)
    allow_http = factory is not None and factory.allow_http
    machinetypes: dict[str, MachinetypeConfig] = {}
    for name, raw in {**local_raw, **expanded}.items():
        where = raw.where if name in expanded else local_raw.where_of(name)
        if not _named_section(where, name, raw, "machinetypes", problems):
            continue
        pipe_name = raw.pop("__pipe__", None)
        extra = {"name": name, "pipe": pipe_name}
        path_ = f"machinetypes.{name}"
        if pipe_name is None and _pipe_of(name, pipes):
            # A local section named like a pipe's type the pipe does not (yet) offer: fine when
            # complete on its own, otherwise it is an override waiting for its pipe.
            scratch = Problems()
            if build(MachinetypeConfig, raw, path_, scratch, extra=extra) is None:
                warnings.append(
                    f"{local_raw.where_of(name)}: {path_}: pipe '{_pipe_of(name, pipes)}' offers "
                    "no such machinetype (yet); section ignored"
                )
                continue
        built_mt = build(MachinetypeConfig, raw, path_, problems, extra=extra)
        if built_mt is None:
            continue
        if pipe_name is None:
            machinetypes[name] = _finish_machinetype(built_mt, raw, problems, allow_http)
            continue
        # A pipe's type that fails the checks across options (min above max, a bad regex) is
        # rejected alone, like a bad entry: a document must not stop the whole configuration.
        scratch = Problems()
        finished = _finish_machinetype(built_mt, raw, scratch, allow_http)
        if scratch:
            warnings.extend(f"{line}; machinetype ignored" for line in scratch.lines)
        else:
            machinetypes[name] = finished

    if factory is not None:
        for mt in list(machinetypes.values()):
            if mt.pipe is None:
                _check_machinetype_files(mt, factory, problems, check_files)
                continue
            # A pipe's type whose files are missing here is rejected alone, like a bad entry.
            scratch = Problems()
            _check_machinetype_files(mt, factory, scratch, check_files)
            if scratch:
                warnings.extend(f"{line}; machinetype ignored" for line in scratch.lines)
                del machinetypes[mt.name]
    if factory is not None and check_files and factory.space_secret_file is not None:
        try:
            load_secret(factory.space_secret_file)
        except ConfigError as err:
            problems.add(factory_raw.where_of("space_secret_file"), "factory.space_secret_file",
                         str(err))  # fmt: skip
    if problems:
        raise ConfigError("\n".join(problems.lines), errors=tuple(problems.lines))
    assert factory is not None
    return Config(
        factory=factory,
        machinetypes=dict(sorted(machinetypes.items())),
        pipes=pipes,
        files=tuple(f for f in files if f.exists()),
        warnings=tuple(one_line(line) for line in warnings),  # pipe URLs and keys as written
    )


def _merge(into: Located, new: Located) -> None:
    """Later files win per key; mappings merge recursively (a conf.d file can add one type)."""
    for key, value in new.items():
        old = into.get(key)
        if isinstance(old, Located) and isinstance(value, Located):
            _merge(old, value)
        else:
            into.put(key, value, new.where_of(key))


def _section(merged: Located, name: str, problems: Problems) -> Located:
    value = merged.get(name)
    if value is None:
        return Located(merged.where_of(name))
    if not isinstance(value, Located):
        problems.add(merged.where_of(name), name, "expected a mapping")
        return Located(merged.where_of(name))
    return value


def _named_section(where: Where, name: str, raw: Any, path: str, problems: Problems) -> bool:
    if not re.fullmatch(NAME_PATTERN, name):
        problems.add(where, f"{path}.{name}", f"expected {NAME_TEXT}")
        return False
    if not isinstance(raw, Located):
        problems.add(where, f"{path}.{name}", "expected a mapping of options")
        return False
    return True


def _pipe_of(name: str, pipes: Mapping[str, PipeConfig]) -> str | None:
    return next((p for p in pipes if name.startswith(f"{p}-")), None)


def parse_time(value: Any) -> int | None:
    """A Unix time from an int or an ISO 8601 text (naive = UTC); None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        if value.strip().isascii() and value.strip().isdigit():  # not '²', which int() refuses
            return int(value) if len(value.strip()) <= 18 else None  # beyond: no time
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _finish_factory(
    factory: FactoryConfig, raw: Located, problems: Problems, hostname: str | None, cpus: int | None
) -> FactoryConfig:
    usable = cpus if cpus is not None else usable_cpus()
    total = factory.total_processors or usable
    if factory.total_processors > usable:
        problems.add(
            raw.where_of("total_processors"),
            "factory.total_processors",
            f"expected at most the {usable} CPUs this process may use, "
            f"got {factory.total_processors}",
        )
    host = factory.hostname or (hostname if hostname is not None else socket.getfqdn())
    if not re.fullmatch(FQDN_PATTERN, host):
        problems.add(
            raw.where_of("hostname"),
            "factory.hostname",
            f"expected {FQDN_TEXT} (this host calls itself {host!r}; set factory.hostname)",
        )
    if factory.factories and not {".", host} & set(factory.factories):
        problems.add(
            raw.where_of("factories"),
            "factory.factories",
            f"expected to include this factory ({host} or '.')",
        )
    clash = sorted(STANDARD_MACHINEFEATURES & set(factory.machinefeatures_options))
    if clash:
        problems.add(
            raw.where_of("machinefeatures_options"),
            "factory.machinefeatures_options",
            f"expected extra keys only; {', '.join(clash)} is a standard machinefeatures key",
        )
    if factory.space_answer_vac and factory.space_secret_file is None:
        problems.add(
            raw.where_of("space_answer_vac"),
            "factory.space_answer_vac",
            "expected only with factory.space_secret_file (without a secret every query is "
            "answered, as Vac does)",
        )
    shutdown = factory.shutdown_time
    if "shutdown_time" in raw and raw["shutdown_time"] is not None:
        shutdown = parse_time(raw["shutdown_time"])
        if shutdown is None:
            problems.add(
                raw.where_of("shutdown_time"),
                "factory.shutdown_time",
                f"expected a Unix time or ISO 8601 time, got {raw['shutdown_time']!r}",
            )
    return replace(factory, total_processors=total, hostname=host, shutdown_time=shutdown)


def _finish_machinetype(
    mt: MachinetypeConfig, raw: Located, problems: Problems, allow_http: bool
) -> MachinetypeConfig:
    path = f"machinetypes.{mt.name}"
    if mt.max_processors < mt.min_processors:
        problems.add(
            raw.where_of("max_processors"),
            f"{path}.max_processors",
            f"expected at least min_processors ({mt.min_processors}), got {mt.max_processors}",
        )
    if mt.min_wallclock_seconds is not None and mt.min_wallclock_seconds > mt.max_wallclock_seconds:
        problems.add(
            raw.where_of("min_wallclock_seconds"),
            f"{path}.min_wallclock_seconds",
            f"expected at most max_wallclock_seconds ({mt.max_wallclock_seconds}), got "
            f"{mt.min_wallclock_seconds}",
        )
    web = ("https://", "http://") if allow_http else ("https://",)
    for key, value, local in (("user_data", mt.user_data, "a path"),
                              ("image", mt.image, "a path, an engine reference")):  # fmt: skip
        if value and value.lower().startswith("http://") and not allow_http:
            problems.add(raw.where_of(key), f"{path}.{key}",
                         f"{value!r}: http:// needs factory.allow_http: true (no TLS), or use "
                         "https://")  # fmt: skip
        elif key == "user_data" and value and "://" in value and not value.startswith(web):
            problems.add(raw.where_of(key), f"{path}.{key}",
                         f"expected {local} or an https:// URL, got {value!r}")  # fmt: skip
    if mt.image_digest is not None and not mt.image.lower().startswith(("https://", "http://")):
        why = f"pins a downloaded image; image {mt.image!r} is not an https:// URL"
        problems.add(raw.where_of("image_digest"), f"{path}.image_digest", why)
    if mt.image_signing_dn is not None:
        try:
            re.compile(mt.image_signing_dn)
        except re.error as err:
            problems.add(
                raw.where_of("image_signing_dn"),
                f"{path}.image_signing_dn",
                f"expected a regular expression ({err})",
            )
    return mt


def _check_machinetype_files(
    mt: MachinetypeConfig, factory: FactoryConfig, problems: Problems, check_files: bool
) -> None:
    """Local files a machinetype needs must exist now, not when its first LM starts."""
    if not check_files:
        return
    where = Where(f"machinetypes.{mt.name}")
    files_dir = mt.files_dir or factory.state_dir / "machinetypes" / (mt.pipe or mt.name) / "files"
    wanted: list[tuple[str, Path]] = []
    if mt.user_data and "://" not in mt.user_data:
        wanted.append(("user_data", resolve_local(mt.user_data, files_dir)))
    for key, name in {**factory.user_data_files, **mt.user_data_files}.items():
        wanted.append((f"user_data_files.{key}", resolve_local(name, files_dir)))
    if mt.user_data_proxy:
        base = factory.state_dir / "machinetypes" / (mt.pipe or mt.name)
        wanted.append(("x509_cert", mt.x509_cert or base / "x509cert.pem"))
        wanted.append(("x509_key", mt.x509_key or base / "x509key.pem"))
    for key, file in wanted:
        if not os.access(file, os.R_OK) or not file.is_file():
            problems.add(
                where, f"machinetypes.{mt.name}.{key}", f"expected a readable file, {file} is not"
            )
