"""The one subprocess runner: argv in, output or a CommandError carrying argv/code/stderr out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lmrunner import runner
from lmrunner.errors import CommandError, CommandTimeout

pytestmark = pytest.mark.allow_subprocess


def test_returns_output_and_code() -> None:
    done = runner.run([sys.executable, "-c", "print('hi')"])
    assert done.returncode == 0
    assert done.stdout == "hi\n"
    assert done.argv == (sys.executable, "-c", "print('hi')")


def test_unexpected_code_raises_with_argv_code_and_stderr() -> None:
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"]
    with pytest.raises(CommandError) as caught:
        runner.run(argv)
    err = caught.value
    assert err.returncode == 3
    assert err.argv == tuple(argv)
    assert err.stderr == "boom\n"
    assert "exited with 3: boom" in str(err)


def test_allowed_codes_do_not_raise() -> None:
    done = runner.run([sys.executable, "-c", "import sys; sys.exit(7)"], ok_codes=(0, 7))
    assert done.returncode == 7


def test_argument_is_never_shell_parsed() -> None:
    done = runner.run(["echo", "$HOME; rm -rf /"])
    assert done.stdout == "$HOME; rm -rf /\n"


def test_timeout_kills_and_raises() -> None:
    with pytest.raises(CommandTimeout) as caught:
        runner.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert "timed out after 0.5 s" in str(caught.value)
    assert isinstance(caught.value, CommandError)


def test_missing_program_is_a_command_error() -> None:
    with pytest.raises(CommandError) as caught:
        runner.run(["/nonexistent/program"])
    assert caught.value.returncode is None
    assert "cannot execute" in caught.value.stderr


def test_unit_tests_forbid_subprocesses_unless_marked(pytester: pytest.Pytester) -> None:
    register_marker = (
        "\n\ndef pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'allow_subprocess: may run subprocesses')\n"
    )
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text() + register_marker)
    pytester.makepyfile("import subprocess\ndef test_runs():\n    subprocess.run(['true'])\n")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*unit test ran a subprocess*"])
