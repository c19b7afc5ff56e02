"""``lmrunner check``: validate the configuration and print the effective one (pipes expanded)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from lmrunner import slots, spec
from lmrunner.backends.base import Backend
from lmrunner.cli.common import common_options, load, pipe_summary
from lmrunner.config import Config, as_dict
from lmrunner.errors import LmrunnerError, SpecError
from lmrunner.images import DownloadSettings, ImageCache, is_remote
from lmrunner.vactables import unsupported_options
from lmrunner.yamlsrc import Located, load_yaml, one_line


def unsupported_lines(config: Config) -> list[str]:
    """One line per option ``config`` sets that lmrunner accepts without acting on it.

    Each names where the option was set (file and line; the pipe for a pipe's type that got it
    from the pipe), its key and why it has no effect: ``FILE:LINE: factory.vacmon_hostport:
    not supported by lmrunner: ...``.
    """
    documents = _documents(config.files)
    lines = []
    for path, option, reason in unsupported_options(config):
        where = _where_set(documents, [*path.split("."), option])
        if where is None:  # a pipe's type, or a file changed since it was loaded
            kind, _, name = path.partition(".")
            pipe = config.machinetypes[name].pipe if kind == "machinetypes" else None
            where = f"vacuum pipe {pipe}" if pipe else ", ".join(map(str, config.files))
        lines.append(one_line(f"{where}: {path}.{option}: {reason}"))
    return lines


def _documents(files: Sequence[Path]) -> list[Located]:
    """The configuration files as loaded (they were valid a moment ago; a changed one is left
    out: the line then names no file)."""
    out = []
    for file in files:
        try:
            data = load_yaml(file)
        except LmrunnerError:
            continue
        if isinstance(data, Located):
            out.append(data)
    return out


def _where_set(documents: Sequence[Located], keys: Sequence[str]) -> str | None:
    """File and line of the last file that sets ``keys`` (a later file wins, as in loading)."""
    for data in reversed(documents):
        node: Any = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, Located) else None
        if isinstance(node, Located) and keys[-1] in node:
            return str(node.where_of(keys[-1]))
    return None


def host_report(config: Config, backends: Mapping[str, Backend]) -> list[str]:
    """What this host gives the configuration: cgroups, and each backend's engine (accel...)."""
    from lmrunner.diskmethods import DiskUnsupported, open_disk_method
    from lmrunner.diskmethods import describe as describe_disks
    from lmrunner.lmcgroups import describe, host_cgroups

    cgroups = host_cgroups(config.factory)
    lines = [describe(cgroups, config.factory)]
    try:
        lines.append(describe_disks(open_disk_method(config.factory)))
    except DiskUnsupported as err:
        lines.append(f"disks: none ({err})")
    for name, backend in sorted(backends.items()):
        probe = backend.probe()
        lines.append(f"backend {name}: {probe.health} {probe.version or ''} {probe.detail}".strip())
    return lines


def validation_lines(
    config: Config, backends: Mapping[str, Backend]
) -> tuple[list[str], list[str]]:
    """Run each machinetype's backend ``validate`` on the spec a start would build now (in a
    scratch state directory: nothing of the real one changes); returns (errors, warnings).

    Errors are what a start would refuse (a missing image, a bad option for this engine);
    warnings are what cannot be checked here (an image not downloaded yet, a backend this host
    lacks, user_data that cannot be fetched now).
    """
    errors: list[str] = []
    warnings: list[str] = []
    folder = config.factory.state_dir / "images"
    # Only look: a check never makes the daemon's folders (it may run before the daemon did).
    cache = ImageCache(folder, DownloadSettings.of(config.factory)) if folder.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="lmrunner-check-") as scratch:
        Path(scratch).chmod(0o755)  # as a real state directory: LM accounts reach LM folders
        trial = replace(config, factory=replace(config.factory, state_dir=Path(scratch)))
        for name, mt in sorted(config.machinetypes.items()):
            where = f"machinetypes.{name}"
            backend = backends.get(mt.backend.value)
            if backend is None:
                warnings.append(f"{where}: backend {mt.backend.value} is not usable here: "
                                "not validated")  # fmt: skip
                continue
            downloaded = None
            if is_remote(mt.image):
                downloaded = None if cache is None else cache.cached(mt.image, mt.image_digest)
                if downloaded is None:
                    later = f"the {backend.name} backend checks it once the daemon has it"
                    warnings.append(f"{where}.image: {mt.image} is not downloaded yet: {later}")
                    continue
            decision = slots.StartDecision(name, mt.min_processors, 2**31 - 1, "check")
            try:
                planned = spec.plan(trial, decision, backend, 0, time.time())
                owner = spec.owner(trial, backend)
                machine = spec.build(trial, planned, backend, factory_id="check", owner=owner,
                                     downloaded=downloaded)  # fmt: skip
                backend.validate(machine)
            except SpecError as err:
                errors.append(one_line(f"{where}: {err}"))
            except (LmrunnerError, OSError) as err:  # user_data down, no account: not the config
                warnings.append(one_line(f"{where}: not validated: {err}"))
    return errors, warnings


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "check",
        parents=[common_options()],
        help="validate the configuration and print the effective configuration",
        description="Validate the configuration (every error on its own line, naming file, "
        "line and key) and print the effective configuration, Vacuum Pipes expanded, as YAML. "
        "Warns (on stderr) about every option set that lmrunner accepts but does not act on.",
    )
    parser.add_argument(
        "--refresh-pipes", action="store_true", help="fetch every Vacuum Pipe first"
    )
    parser.add_argument(
        "--skip-file-checks",
        action="store_true",
        help="do not require the files the configuration names to exist here (e.g. when "
        "checking a converted Vac configuration before copying its files)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="do not probe this host's cgroups and engines (the VM probe may boot a guest)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args, refresh_pipes=args.refresh_pipes, check_files=not args.skip_file_checks)
    for warning in config.warnings:
        print(f"lmrunner: warning: {warning}", file=sys.stderr)
    for line in unsupported_lines(config):  # accepted for Vac's sake: say it does nothing
        print(f"lmrunner: warning: {line}", file=sys.stderr)
    for mt in config.machinetypes.values():
        if mt.capabilities:  # widening what a payload may do deserves a second look
            added = ", ".join(mt.capabilities)
            print(
                f"lmrunner: warning: machinetypes.{mt.name}.capabilities: LMs get {added} "
                "beyond lmrunner's reduced default set",
                file=sys.stderr,
            )
    from lmrunner.backends import make_backends
    from lmrunner.lmcgroups import host_cgroups
    from lmrunner.vacquery.space import describe as describe_space

    names = {mt.backend.value for mt in config.machinetypes.values()}
    backends = make_backends(names, config.factory, host_cgroups(config.factory))
    try:
        errors: list[str] = []
        warnings: list[str] = []
        if not args.skip_file_checks:  # validation needs the files (images) the config names
            errors, warnings = validation_lines(config, backends)
        for line in warnings:
            print(f"lmrunner: warning: {line}", file=sys.stderr)
        for line in errors:
            print(f"lmrunner: error: {line}", file=sys.stderr)
        if errors:
            return 1
        if args.quiet:
            return 0
        header = [f"effective configuration from {', '.join(map(str, config.files))}"]
        header += [pipe_summary(config, pipe) for pipe in config.pipes.values()]
        header.append(describe_space(config))
        if not args.no_probe:
            header += host_report(config, backends)
    finally:
        for backend in backends.values():
            backend.close()
    # File names and URLs as written: a line break (or undecodable byte) must not break YAML.
    print("\n".join(f"# {one_line(line)}" for line in header))
    print(yaml.safe_dump(as_dict(config), sort_keys=False, default_flow_style=False), end="")
    return 0
