"""The one place where lmrunner runs a subprocess.

Commands are argv lists, never shell strings. A return code outside ``ok_codes`` raises
:class:`~lmrunner.errors.CommandError` carrying argv, code, stdout and stderr, so no failure goes
unnoticed (Vac wrapped ``os.system`` in ``try/except``, which can never fire).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmrunner.errors import CommandError, CommandTimeout

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Completed:
    """A finished command."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float | None = 60.0,
    ok_codes: Collection[int] = (0,),
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Completed:
    """Run ``argv`` to completion and return its output.

    Args:
        argv: program and arguments; never passed through a shell.
        timeout: seconds before the process is killed and :class:`CommandTimeout` raised.
        ok_codes: return codes that count as success.
        input_text: text written to the command's stdin.
        env: the complete environment for the command (default: inherit).
        cwd: working directory.

    Raises:
        CommandError: the command could not be started or exited with another code.
        CommandTimeout: the command ran longer than ``timeout``.
    """
    args = tuple(str(a) for a in argv)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise CommandTimeout(args, timeout or 0.0, _text(err.stdout), _text(err.stderr)) from err
    except OSError as err:
        raise CommandError(args, None, "", f"cannot execute: {err}") from err
    done = Completed(args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
    LOG.debug("ran %s -> %d in %.3f s", args, done.returncode, done.seconds)
    if done.returncode not in ok_codes:
        raise CommandError(args, done.returncode, done.stdout, done.stderr)
    return done


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
