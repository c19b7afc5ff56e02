"""Options and helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmrunner.config import DEFAULT_CONFIG, Config, PipeConfig, load_config
from lmrunner.pipes import PipeStore


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"configuration file; conf.d/*.yaml beside it are merged (default {DEFAULT_CONFIG})",
    )


def pipe_store(state_dir: Path) -> PipeStore:
    return PipeStore(state_dir / "pipescache")


def load(path: Path, *, refresh_pipes: bool = False, check_files: bool = True) -> Config:
    """Load the configuration with the pipes' cached documents (refreshed first if asked)."""
    bare = load_config(path, check_files=False)
    store = pipe_store(bare.factory.state_dir)
    if refresh_pipes:
        for pipe in bare.pipes.values():
            result = store.refresh(pipe, force=True)
            print(f"lmrunner: pipe {pipe.name}: {result.status}: {result.detail}")
    return load_config(path, pipe_documents=store.documents(bare.pipes), check_files=check_files)


def pipe_summary(config: Config, pipe: PipeConfig) -> str:
    count = sum(1 for mt in config.machinetypes.values() if mt.pipe == pipe.name)
    return f"pipe {pipe.name}: {count} machinetypes from {pipe.url}"
