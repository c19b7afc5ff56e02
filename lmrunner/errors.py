"""The one exception tree of lmrunner.

Low-level errors (OSError, docker.errors.*, subprocess failures) are translated into these at the
boundary where they happen, always chained with ``raise ... from err`` so the cause is kept.
"""

from __future__ import annotations

from collections.abc import Sequence


class LmrunnerError(Exception):
    """Root of every error lmrunner raises on purpose."""


class ConfigError(LmrunnerError):
    """The configuration (a file, a field or a value in it) is invalid.

    ``errors`` holds every problem found, one line each (file:line: key: what was expected).
    """

    def __init__(self, message: str, *, errors: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.errors = errors or (message,)


class ProxyError(LmrunnerError):
    """An X.509 proxy for a logical machine could not be made."""


class PipeError(LmrunnerError):
    """A Vacuum Pipe could not be fetched or parsed."""


class SpecError(LmrunnerError):
    """A machine specification cannot be run by the backend asked to run it."""


class BackendError(LmrunnerError):
    """A backend (docker, apptainer, vm) failed."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend


class BackendUnavailable(BackendError):
    """The backend's engine is missing or does not answer."""


class StartError(BackendError):
    """A logical machine could not be started."""

    def __init__(self, backend: str, message: str, *, recoverable: bool = False) -> None:
        super().__init__(backend, message)
        self.recoverable = recoverable


class MachineNotFound(BackendError):
    """The engine has no object for this logical machine (any more)."""


class CgroupError(LmrunnerError):
    """A cgroup operation failed."""


class CgroupUnsupported(CgroupError):
    """This host offers no usable cgroup hierarchy for lmrunner."""


class CommandError(LmrunnerError):
    """A subprocess ended with an exit code it was not allowed to end with."""

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no stderr"
        super().__init__(f"command {list(self.argv)!r} exited with {returncode}: {detail}")


class CommandTimeout(CommandError):
    """A subprocess did not finish within its timeout and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float, stdout: str, stderr: str) -> None:
        super().__init__(argv, None, stdout, stderr)
        self.timeout = timeout
        self.args = (f"command {list(self.argv)!r} timed out after {timeout:g} s",)

    def __str__(self) -> str:
        return str(self.args[0])
