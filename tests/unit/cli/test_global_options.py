"""--config and --state-dir work before or after the subcommand, as docker's, git's or
systemctl's global options do."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmrunner.cli import _command, build_parser, main
from lmrunner.cli.common import global_defaults


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "/x.yaml", "--state-dir", "/s", "ps"],
        ["ps", "--config", "/x.yaml", "--state-dir", "/s"],
        ["--config=/x.yaml", "ps", "--state-dir=/s"],
        ["--state-dir", "/s", "ps", "--config", "/x.yaml"],
    ],
)
def test_global_options_before_or_after(argv: list[str]) -> None:
    assert _command(argv) == "ps"
    args = build_parser("ps").parse_args(argv)
    global_defaults(args)
    assert (args.command, args.config, args.state_dir) == ("ps", Path("/x.yaml"), Path("/s"))


def test_defaults_when_given_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMRUNNER_CONFIG", "/from/env.yaml")
    args = build_parser("ps").parse_args(["ps"])
    global_defaults(args)
    assert (args.config, args.state_dir) == (Path("/from/env.yaml"), None)


def test_a_value_named_like_a_command_is_not_the_command() -> None:
    assert _command(["--config", "ps", "check"]) == "check"
    assert _command(["--state-dir", "logs"]) is None


def test_global_option_before_the_command_reaches_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing"
    assert main(["--state-dir", str(missing), "ps"]) == 1
    assert str(missing) in capsys.readouterr().err
