"""The vcbusybox /init contract, run with the host's shell in container mode.

The same script is PID 1 in the VM; that path is proven by tests/integration/test_smoke_vm.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmrunner import runner

pytestmark = pytest.mark.allow_subprocess

INIT = Path(__file__).resolve().parents[3] / "images" / "vcbusybox" / "init"


def run_init(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[int, Path]:
    outputs = tmp_path / "joboutputs"
    outputs.mkdir(exist_ok=True)
    payload = tmp_path / "payload"
    payload.write_text(script)
    payload.chmod(0o755)
    environ = {"PATH": os.environ["PATH"], "JOBOUTPUTS": str(outputs), **env}
    argv = ["sh", str(INIT), *(args or (str(payload),))]
    done = runner.run(argv, env=environ, ok_codes=range(256), timeout=30)
    return done.returncode, outputs


def message(outputs: Path) -> str:
    return (outputs / "shutdown_message").read_text()


def test_exit_zero_without_message_is_200(tmp_path: Path) -> None:
    code, outputs = run_init(tmp_path, "#!/bin/sh\nexit 0\n")
    assert code == 0
    assert message(outputs) == "200 Intended work completed ok\n"


def test_nonzero_exit_without_message_is_700_with_status(tmp_path: Path) -> None:
    code, outputs = run_init(tmp_path, "#!/bin/sh\nexit 42\n")
    assert code == 42
    assert message(outputs) == "700 Payload exited with status 42\n"


def test_payload_message_is_never_overwritten(tmp_path: Path) -> None:
    code, outputs = run_init(
        tmp_path, '#!/bin/sh\necho "400 Banned" > "$JOBOUTPUTS/shutdown_message"\nexit 1\n'
    )
    assert code == 1
    assert message(outputs) == "400 Banned\n"


def test_environment_is_exported_to_the_payload(tmp_path: Path) -> None:
    features = tmp_path / "mf"
    features.mkdir()
    script = '#!/bin/sh\necho "$MACHINEFEATURES|$JOBFEATURES|$JOBOUTPUTS" > "$JOBOUTPUTS/env"\n'
    _, outputs = run_init(tmp_path, script, MACHINEFEATURES=str(features))
    mf, _jf, jo = (outputs / "env").read_text().strip().split("|")
    assert (mf, jo) == (str(features), str(outputs))


def test_missing_cernvm_root_is_a_site_problem(tmp_path: Path) -> None:
    code, outputs = run_init(
        tmp_path, "#!/bin/sh\nexit 0\n", VCBUSYBOX_ROOT=str(tmp_path / "no-such-root")
    )
    assert code == 125
    assert message(outputs).startswith("500 CernVM root ")


def test_payload_arguments_are_passed_through(tmp_path: Path) -> None:
    outputs = tmp_path / "joboutputs"
    outputs.mkdir()
    code, _ = run_init(tmp_path, "", "sh", "-c", 'echo "$0 $1" > "$JOBOUTPUTS/args"', "a", "b c")
    assert code == 0
    assert (outputs / "args").read_text() == "a b c\n"
