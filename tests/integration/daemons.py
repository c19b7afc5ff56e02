"""Helpers for tests that run real ``lmrunner`` processes: a daemon with options (or through a
fault-injecting wrapper), its peak memory, the command line with bounded time and output, and
reading its store while it runs.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmrunner.accounting import AccountingRecord
from lmrunner.state import DB_NAME, LmRecord, Store, StoreError
from tests.integration.conftest import REPO

#: The daemon's peak resident memory must stay below this (VmHWM).
RSS_LIMIT_BYTES = 150 * 2**20
#: Address space allowed to a test's daemon: one that reads without bound then fails alone
#: (MemoryError) instead of making the kernel's OOM killer pick among the host's processes.
ADDRESS_SPACE_BYTES = 4 * 2**30


def cap_memory(pid: int, limit: int = ADDRESS_SPACE_BYTES) -> None:
    """Limit a started daemon's address space (RLIMIT_AS)."""
    with contextlib.suppress(ProcessLookupError):
        resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))


def start(
    config: Path, log: Path, *options: str, wrapper: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``lmrunner daemon --config config OPTIONS``, stderr appended to ``log``; with ``wrapper``
    (e.g. ``("-m", "tests.integration.faulty_daemon", "destroy-sleeps", MARKER)``) the daemon runs
    inside that module, which patches lmrunner before calling its main."""
    entry = list(wrapper) if wrapper else ["-m", "lmrunner"]
    with log.open("ab") as err:
        daemon = subprocess.Popen(
            [sys.executable, *entry, "daemon", "--config", str(config), *options],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
        )
    cap_memory(daemon.pid)
    return daemon


def stop(daemon: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
    """SIGTERM, then its exit status; a daemon that does not exit in time is killed (None)."""
    if daemon.poll() is not None:
        return daemon.returncode
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        return None


def kill(daemon: subprocess.Popen[bytes]) -> None:
    """SIGKILL (a test's clean-up: it must not outlive the test)."""
    if daemon.poll() is None:
        daemon.kill()
    daemon.wait()


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM of a live process, None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


@dataclass(frozen=True)
class Snapshot:
    """What a read-only look at a daemon's store found."""

    records: list[LmRecord]  # oldest first
    accounting: list[AccountingRecord]
    draining: bool

    def accounted(self, uuid: str) -> int:
        return sum(1 for a in self.accounting if a.uuid == uuid)

    def first_of(self, machinetype: str) -> LmRecord | None:
        return next((r for r in self.records if r.machinetype == machinetype), None)

    def get(self, uuid: str) -> LmRecord | None:
        return next((r for r in self.records if r.uuid == uuid), None)


def snapshot(state: Path) -> Snapshot | None:
    """The store in ``state``, read-only; None before the daemon made it."""
    if not (state / DB_NAME).exists():
        return None
    store = Store(state, readonly=True)
    try:
        records = sorted(store.recent(), key=lambda r: r.created)
        return Snapshot(records, store.accounting(), store.meta("draining") == "1")
    finally:
        store.close()


def snapshot_retrying(state: Path, timeout: float = 10.0) -> Snapshot | None:
    """:func:`snapshot`, retried while the store is briefly unreadable (a reader can meet the
    database locked while the daemon checkpoints on a full filesystem)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return snapshot(state)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class Cli:
    """One run of the command line."""

    argv: tuple[str, ...]
    returncode: int | None  # None: killed, too slow or printing too much
    seconds: float
    output: bytes  # stdout and stderr, at most the cap
    flooded: bool  # it printed more than the cap

    def text(self) -> str:
        return self.output.decode(errors="replace")


def cli(config: Path, *args: str, timeout: float = 30.0, cap: int = 16 * 2**20) -> Cli:
    """``lmrunner ARGS --config config``, killed after ``timeout`` s or ``cap`` bytes of output
    (so a command that hangs or floods fails the test instead of stalling or filling it)."""
    argv = (sys.executable, "-m", "lmrunner", *args, "--config", str(config))
    started = time.monotonic()
    flooded = killed = False
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            while process.poll() is None:
                if os.fstat(out.fileno()).st_size > cap:
                    flooded = killed = True
                    break
                if time.monotonic() - started > timeout:
                    killed = True
                    break
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        out.seek(0)
        output = out.read(cap)
    seconds = time.monotonic() - started
    return Cli(argv, None if killed else process.returncode, seconds, output, flooded)


def processes_with(text: str) -> list[int]:
    """Pids (other than this one) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
    return found


CGROUP_ROOT = Path("/sys/fs/cgroup")


def lm_cgroups(uuids: Iterable[str], parent: str) -> list[Path]:
    """The cgroup folders of these LMs (``<parent>/lm-<uuid>``, in any v1 hierarchy or in the
    v2 tree) that still exist."""
    if not CGROUP_ROOT.is_dir():
        return []
    roots = [CGROUP_ROOT, *(p for p in CGROUP_ROOT.iterdir() if p.is_dir())]
    names = [f"lm-{uuid}" for uuid in uuids]
    return [d for root in roots for n in names if (d := root / parent.strip("/") / n).is_dir()]


def remove_cgroup_dirs(folders: Iterable[Path]) -> None:
    """rmdir cgroup folders, their (empty) children first; what is still in use stays."""
    for folder in folders:
        children = sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for each in [*children, folder]:
            with contextlib.suppress(OSError):
                each.rmdir()
