"""Long-lived LM processes (Apptainer, QEMU): started inside their cgroup, exits pushed, not polled.

Backends whose engine is a process rather than a daemon use this one module, so each has the
same guarantees:

- The child writes itself into the LM's cgroup before it executes anything (``preexec_fn``),
  then drops to the LM's account: nothing the LM runs exists outside its cgroup for a moment.
- It runs in a new session, so a signal to the daemon's terminal does not reach it, and it
  outlives a daemon that is killed.
- While it is our child, a thread waits for it and records its exit status in a file in the LM
  directory (written atomically) before notifying; after a daemon restart it is not our child any
  more, so a pidfd tells when it ends (its status is then unknown to us).
- A process is identified by pid **and** its start time (``/proc/<pid>/stat`` field 22), so a
  recycled pid is never taken for the LM.

The identity is read here, not through psutil. Its only public start time,
``Process.create_time()``, is derived from the same field 22 but is wall-clock seconds (the
boot time from ``/proc/stat`` added), and a stepped clock moves the boot time, so a stored
identity would stop matching its live process; psutil's own pid-reuse check compares the raw
value through a private method for that reason. Converting back to ticks costs a second file
read with a race against such a step, and about three times as long as this one read of one
file (40 against 14 µs per call, measured). Handles store field 22 as is, so those written by
any version compare alike. Listing processes, their accounts and environments is psutil's job
(``lmrunner.backends.apptainer.orphans``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmrunner.atomic import write_text
from lmrunner.cgroups.base import enter
from lmrunner.errors import CommandError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProcessId:
    """A process, told apart from any later one that reuses its pid."""

    pid: int
    start_ticks: int  # clock ticks after boot when it started (/proc/<pid>/stat field 22)


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a supervised process ended (from the file the waiting thread wrote)."""

    exit_code: int | None  # 128 + N: killed by signal N (as a shell shows it); None: unobserved
    ended_at: float | None


def stat_fields(stat_text: str) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` text after the command name (field 3 first): the
    name, in parentheses, may hold spaces and parentheses itself, so the split is after it."""
    return stat_text[stat_text.rindex(")") + 2 :].split()


def start_ticks(stat_text: str) -> int | None:
    """The start time (field 22) of a live process from its stat text; None for a zombie."""
    fields = stat_fields(stat_text)
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def identify(pid: int) -> ProcessId | None:
    """The :class:`ProcessId` of a live process, or None when there is none with this pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    ticks = start_ticks(text)
    return None if ticks is None else ProcessId(pid, ticks)


def alive(process: ProcessId) -> bool:
    """Whether ``process`` still runs (same pid, same start time, not a zombie)."""
    return identify(process.pid) == process


def send_signal(process: ProcessId, signum: int, *, group: bool = False) -> None:
    """Signal exactly ``process``, nothing when its pid now names another process: through a
    pidfd (Linux 5.3+), else by its identity checked first. With ``group``, its whole process
    group when it leads one (an LM's engine process leads its own session). The one way
    lmrunner signals a process it knows by pid."""
    if group:
        with contextlib.suppress(ProcessLookupError):
            if alive(process) and os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signum)  # a group leader's pid is not reused while it lives
                return
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd_open (EL7's kernel): by its identity, checked first
        if alive(process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)
        return
    try:
        if alive(process):
            signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def read_status(path: Path) -> ExitStatus | None:
    """The exit status recorded in ``path``, or None when none was recorded."""
    try:
        data = json.loads(path.read_text())
        code = data.get("exit_code")
        ended = data.get("ended_at")
        return ExitStatus(
            None if code is None else shell_status(int(code)),
            None if ended is None else float(ended),
        )
    except (OSError, ValueError, TypeError, AttributeError):  # absent, torn or foreign
        return None


def shell_status(code: int) -> int:
    """A Popen return code as a shell shows it (and every backend reports it): killed by
    signal N -> 128 + N."""
    return 128 - code if code < 0 else code


def _preexec(
    procs_files: Sequence[Path], user: tuple[int, int] | None, *, launcher: bool = False
) -> Callable[[], None]:
    files = tuple(procs_files)

    def child() -> None:
        enter(files)  # as root, before anything of the LM runs
        if launcher:
            # The launcher (systemd-run --scope) switches uid and gid but never the
            # supplementary groups: drop the daemon's here, or the payload keeps them.
            os.setgroups([])
        elif user is not None and user != (os.getuid(), os.getgid()):
            os.setgroups([])
            os.setgid(user[1])
            os.setuid(user[0])

    return child


class Supervisor:
    """Starts, watches and re-adopts the processes of one backend's LMs."""

    def __init__(self) -> None:
        self._notify: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._pending: list[str] = []  # exits seen before watch() was called
        self._closed = threading.Event()

    def spawn(
        self,
        key: str,
        argv: Sequence[str | Path],
        *,
        status_file: Path,
        log_file: Path,
        procs_files: Sequence[Path] = (),
        launcher: Callable[[tuple[int, int] | None], Sequence[str]] | None = None,
        user: tuple[int, int] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ProcessId:
        """Start ``argv`` in the cgroup whose ``cgroup.procs`` files are given, as ``user``; or,
        where systemd owns the cgroup tree, behind the ``launcher`` prefix made for ``user``.

        Output goes to ``log_file``. ``key`` (the LM's uuid) is what the notify callback gets.

        Raises:
            CommandError: it could not be started (carries argv and the reason).
        """
        args = [str(a) for a in argv]
        if launcher is not None:  # it enters the LM's cgroup and becomes ``user`` itself
            args = [*launcher(user), *args]
        status_file.unlink(missing_ok=True)
        try:
            with log_file.open("ab") as log:
                proc = subprocess.Popen(  # argv list, never a shell
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    start_new_session=True,
                    # only os calls in the child
                    preexec_fn=_preexec(procs_files, user, launcher=launcher is not None),
                    close_fds=True,
                )
        except (OSError, subprocess.SubprocessError) as err:
            raise CommandError(tuple(args), None, "", f"cannot start: {err}") from err
        process = identify(proc.pid) or ProcessId(proc.pid, 0)
        thread = threading.Thread(
            target=self._wait_child,
            args=(key, proc, status_file),
            name=f"wait-{key[:8]}",
            daemon=True,
        )
        thread.start()
        return process

    def adopt(self, key: str, process: ProcessId) -> bool:
        """Watch a process this daemon did not start (after a restart); False when it is gone."""
        if not alive(process):
            return False
        try:
            pidfd: int | None = os.pidfd_open(process.pid)
        except ProcessLookupError:
            return False
        except OSError:  # no pidfd_open (Linux < 5.3, e.g. EL7): watch by its identity instead
            pidfd = None
        if not alive(process):  # the pid was reused between the check and the open
            if pidfd is not None:
                os.close(pidfd)
            return False
        target = self._wait_pidfd if pidfd is not None else self._wait_identity
        threading.Thread(
            target=target,
            args=(key, process if pidfd is None else pidfd),
            name=f"adopted-{key[:8]}",
            daemon=True,
        ).start()
        return True

    def _wait_identity(self, key: str, process: ProcessId) -> None:
        # Fallback only: once a second, where the kernel cannot tell us.
        while alive(process):
            if self._closed.wait(1.0):
                return
        self._tell(key)

    def watch(self, notify: Callable[[str], None]) -> None:
        """Call ``notify(key)`` whenever a supervised process ends (from a waiting thread)."""
        with self._lock:
            self._notify = notify
            pending, self._pending = self._pending, []
        for key in pending:
            notify(key)

    def close(self) -> None:
        """Stop notifying (the processes keep running: LMs outlive their daemon by design)."""
        self._closed.set()
        with self._lock:
            self._notify = None

    def _tell(self, key: str) -> None:
        if self._closed.is_set():
            return
        with self._lock:
            notify = self._notify
            if notify is None:
                self._pending.append(key)
                return
        notify(key)

    def _wait_child(self, key: str, proc: subprocess.Popen[bytes], status_file: Path) -> None:
        code = proc.wait()
        try:
            write_text(status_file, json.dumps({"exit_code": code, "ended_at": time.time()}))
        except OSError as err:  # the LM directory was removed under us: nothing to record
            LOG.warning("cannot record the exit of %s in %s: %s", key, status_file, err)
        self._tell(key)

    def _wait_pidfd(self, key: str, pidfd: int) -> None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll(1000):
                if self._closed.is_set():
                    return
        finally:
            os.close(pidfd)
        self._tell(key)
