"""Options and helpers shared by subcommands."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import lmrunner
from lmrunner.errors import LmrunnerError
from lmrunner.state import DB_NAME, Store

if TYPE_CHECKING:
    from lmrunner.config import Config, PipeConfig

# The configuration modules (YAML, requests) are imported where used: `lmrunner ps --state-dir`
# never needs them, and must start fast.
DEFAULT_CONFIG = Path(lmrunner.DEFAULT_CONFIG)


#: The options every command takes, before or after its name (``lmrunner --config X ps`` and
#: ``lmrunner ps --config X``, as docker, git or systemctl take theirs).
GLOBAL_OPTIONS = ("--config", "--state-dir")


def common_options() -> argparse.ArgumentParser:
    """--config and --state-dir, accepted by every subcommand (several factories side by side).

    No defaults here (``SUPPRESS``): a subcommand's default would overwrite the value given
    before the subcommand's name; :func:`global_defaults` fills in what neither place gave.
    """
    parent = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    parent.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"configuration file; conf.d/*.yaml beside it are merged "
        f"(default: $LMRUNNER_CONFIG or {DEFAULT_CONFIG})",
    )
    parent.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="state directory, overriding the configured factory.state_dir",
    )
    return parent


def global_defaults(args: argparse.Namespace) -> None:
    """The defaults of the global options that were given nowhere."""
    if not hasattr(args, "config"):
        args.config = Path(os.environ.get("LMRUNNER_CONFIG") or DEFAULT_CONFIG)  # empty: unset
    if not hasattr(args, "state_dir"):
        args.state_dir = None


def load(
    args: argparse.Namespace, *, refresh_pipes: bool = False, check_files: bool = True
) -> Config:
    """Load the configuration with the pipes' cached documents (refreshed first if asked)."""
    from lmrunner.fetch import ca_verify
    from lmrunner.loader import load_config
    from lmrunner.pipes import PipeStore

    bare = _with_state_dir(load_config(args.config, check_files=False), args.state_dir)
    store = PipeStore(bare.factory.state_dir / "pipescache", verify=ca_verify(bare.factory.ca_path))
    if refresh_pipes:
        for pipe in bare.pipes.values():
            result = store.refresh(pipe, force=True)
            print(f"lmrunner: pipe {pipe.name}: {result.status}: {result.detail}")
    config = load_config(
        args.config, pipe_documents=store.documents(bare.pipes), check_files=check_files
    )
    return _with_state_dir(config, args.state_dir)


def _with_state_dir(config: Config, state_dir: Path | None) -> Config:
    if state_dir is None:
        return config
    factory = replace(config.factory, state_dir=state_dir.absolute())
    return replace(config, factory=factory)


def state_dir(args: argparse.Namespace) -> Path:
    """--state-dir, else the configured one (so read-only commands work without a config)."""
    if args.state_dir is not None:
        return Path(args.state_dir)
    from lmrunner.loader import load_config

    return load_config(args.config, check_files=False).factory.state_dir


def open_store(args: argparse.Namespace, *, readonly: bool = True) -> Store:
    """The factory's existing store (a mistyped --state-dir must not create a new one)."""
    directory = state_dir(args)
    if not (directory / DB_NAME).exists():
        raise LmrunnerError(f"{directory}: no state database yet (has the daemon ever run?)")
    return Store(directory, readonly=readonly)


def daemon_pid(store: Store) -> int | None:
    """The pid of a live daemon on this state directory, if any."""
    value = store.meta("daemon_pid")
    if value is None:
        return None
    try:
        os.kill(int(value), 0)
    except (ProcessLookupError, ValueError):
        return None
    except PermissionError:
        pass  # alive, another user's
    return int(value)


def pipe_summary(config: Config, pipe: PipeConfig) -> str:
    count = sum(1 for mt in config.machinetypes.values() if mt.pipe == pipe.name)
    return f"pipe {pipe.name}: {count} machinetypes from {pipe.url}"
