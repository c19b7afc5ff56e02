"""The process supervisor: real (short) child processes, their exit files and notifications.

Every test here starts real processes (``/bin/sh``, ``sleep``), so each is marked
``allow_subprocess``; none takes more than a fraction of a second unless something is wrong.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lmrunner.errors import CommandError
from lmrunner.process import (
    ExitStatus,
    ProcessId,
    Supervisor,
    alive,
    identify,
    read_status,
    send_signal,
)

pytestmark = pytest.mark.allow_subprocess

KEY = "0b8e3f4c-3c1e-4a55-9f53-5f8f0a2b7d11"  # an LM uuid
TIMEOUT = 10.0  # seconds any notification may take (it takes milliseconds)


class Notes:
    """A notify callback that queues the keys it gets."""

    def __init__(self) -> None:
        self.keys: queue.Queue[str] = queue.Queue()

    def __call__(self, key: str) -> None:
        self.keys.put(key)

    def next(self, timeout: float = TIMEOUT) -> str:
        return self.keys.get(timeout=timeout)

    def none_within(self, seconds: float) -> bool:
        try:
            self.keys.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


def spawn(
    supervisor: Supervisor, tmp_path: Path, argv: list[str], *, key: str = KEY, **kwargs: object
) -> ProcessId:
    return supervisor.spawn(
        key,
        argv,
        status_file=tmp_path / f"{key}.status",
        log_file=tmp_path / f"{key}.log",
        **kwargs,  # type: ignore[arg-type]
    )


def join_waiters(key: str) -> None:
    """Wait until the supervisor's threads for ``key`` have finished (they told, or queued);
    one that is not listed has finished already."""
    for thread in [t for t in threading.enumerate() if t.name.endswith(f"-{key[:8]}")]:
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def wait_gone(process: ProcessId) -> None:
    deadline = time.monotonic() + TIMEOUT
    while alive(process):
        assert time.monotonic() < deadline, f"{process} still alive"
        time.sleep(0.01)


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    made = Supervisor()
    yield made
    made.close()


# --- spawn and the exit status file ----------------------------------------------------------


def test_exit_code_is_recorded_and_notified(supervisor: Supervisor, tmp_path: Path) -> None:
    notes = Notes()
    supervisor.watch(notes)
    process = spawn(supervisor, tmp_path, ["/bin/sh", "-c", "echo hello; exit 3"], procs_files=())
    assert process.pid > 0
    assert notes.next() == KEY
    # The status is written before the notification: it is there when the core looks.
    status = read_status(tmp_path / f"{KEY}.status")
    assert status is not None
    assert status.exit_code == 3
    assert status.ended_at is not None and abs(status.ended_at - time.time()) < 60
    assert (tmp_path / f"{KEY}.log").read_text() == "hello\n"


def test_an_old_status_file_is_removed_at_spawn(supervisor: Supervisor, tmp_path: Path) -> None:
    status_file = tmp_path / f"{KEY}.status"
    status_file.write_text('{"exit_code": 0, "ended_at": 1.0}')
    notes = Notes()
    supervisor.watch(notes)
    spawn(supervisor, tmp_path, ["/bin/sh", "-c", "exit 7"])
    assert notes.next() == KEY
    status = read_status(status_file)
    assert status is not None
    assert status.exit_code == 7
    assert status.ended_at is not None and status.ended_at > 1.0


def test_the_child_enters_its_cgroup_before_it_runs(supervisor: Supervisor, tmp_path: Path) -> None:
    """A plain file stands in for cgroup.procs: the child writes "0" (itself) into each."""
    procs = [tmp_path / "cpu.procs", tmp_path / "memory.procs"]
    for path in procs:
        path.write_text("")
    notes = Notes()
    supervisor.watch(notes)
    spawn(supervisor, tmp_path, ["/bin/sh", "-c", "exit 0"], procs_files=tuple(procs))
    assert notes.next() == KEY
    assert [path.read_bytes() for path in procs] == [b"0", b"0"]
    status = read_status(tmp_path / f"{KEY}.status")
    assert status is not None and status.exit_code == 0


def test_a_procs_file_that_cannot_be_written_fails_the_spawn(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    """Nothing may run outside its cgroup: a missing procs file means no process at all."""
    argv = ["/bin/sh", "-c", "exit 0"]
    with pytest.raises(CommandError) as caught:
        spawn(supervisor, tmp_path, argv, procs_files=(tmp_path / "gone" / "cgroup.procs",))
    assert caught.value.argv == tuple(argv)


def test_a_process_killed_by_a_signal_has_a_shell_exit_status(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    notes = Notes()
    supervisor.watch(notes)
    process = spawn(supervisor, tmp_path, ["sleep", "30"])
    assert alive(process)
    os.kill(process.pid, signal.SIGKILL)
    assert notes.next() == KEY
    status = read_status(tmp_path / f"{KEY}.status")
    assert status is not None and status.exit_code == 128 + signal.SIGKILL


def test_spawned_processes_run_in_a_new_session(supervisor: Supervisor, tmp_path: Path) -> None:
    process = spawn(supervisor, tmp_path, ["sleep", "30"])
    try:
        assert os.getsid(process.pid) == process.pid
    finally:
        os.kill(process.pid, signal.SIGKILL)


def test_spawn_of_a_missing_program_raises_command_error_with_argv(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    argv = [str(tmp_path / "no-such-program"), "--flag"]
    with pytest.raises(CommandError) as caught:
        spawn(supervisor, tmp_path, argv)
    assert caught.value.argv == tuple(argv)
    assert caught.value.returncode is None
    assert "cannot start" in caught.value.stderr


def test_spawn_accepts_paths_in_argv(supervisor: Supervisor, tmp_path: Path) -> None:
    notes = Notes()
    supervisor.watch(notes)
    spawn(supervisor, tmp_path, [Path("/bin/sh"), "-c", "exit 5"])  # type: ignore[list-item]
    assert notes.next() == KEY
    status = read_status(tmp_path / f"{KEY}.status")
    assert status is not None and status.exit_code == 5


# --- identity: pid plus start time -------------------------------------------------------------


def test_identify_this_process() -> None:
    me = identify(os.getpid())
    assert me is not None
    assert me.pid == os.getpid()
    assert me.start_ticks > 0
    assert alive(me)


def test_a_recycled_pid_is_not_the_process() -> None:
    me = identify(os.getpid())
    assert me is not None
    assert not alive(ProcessId(me.pid, me.start_ticks + 1))
    assert not alive(ProcessId(me.pid, 0))


def test_the_start_time_is_the_one_psutil_derives_its_create_time_from() -> None:
    """Handles of every version hold field 22 in clock ticks; psutil's create_time() is the same
    field in seconds plus the boot time, so the two agree to the tick (and any identity stored
    by an older lmrunner compares alike)."""
    for pid in (os.getpid(), 1):
        mine = identify(pid)
        assert mine is not None
        proc = psutil.Process(pid)
        ticks = round((proc.create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK"))
        assert mine.start_ticks == ticks


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        process = identify(child.pid)
        assert process is not None and alive(process)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # not reaped yet
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert identify(child.pid) is None
        assert not alive(process)
    finally:
        child.kill()
        child.wait()


def test_a_missing_pid_is_not_alive() -> None:
    missing = 2**22 + 1  # above the kernel's PID_MAX_LIMIT: never a process
    assert identify(missing) is None
    assert not alive(ProcessId(missing, 1))


def test_a_spawned_process_identity_matches_identify(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    process = spawn(supervisor, tmp_path, ["sleep", "30"])
    try:
        assert identify(process.pid) == process
        assert process.start_ticks > 0
    finally:
        os.kill(process.pid, signal.SIGKILL)
    wait_gone(process)
    assert identify(process.pid) is None  # reaped, or at most a zombie: never "alive"


# --- adoption after a restart -------------------------------------------------------------------


def test_adopt_notifies_when_a_process_it_did_not_start_ends(tmp_path: Path) -> None:
    first = Supervisor()  # the daemon before its restart
    first.watch(lambda key: None)
    process = spawn(first, tmp_path, ["sleep", "30"])
    first.close()
    second = Supervisor()  # the restarted daemon
    notes = Notes()
    second.watch(notes)
    try:
        assert second.adopt(KEY, process)
        assert notes.none_within(0.1)  # still running: nothing to tell
        os.kill(process.pid, signal.SIGKILL)
        assert notes.next() == KEY
    finally:
        second.close()


def test_adopt_of_a_gone_or_recycled_process_is_false(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    notes = Notes()
    supervisor.watch(notes)
    me = identify(os.getpid())
    assert me is not None
    assert not supervisor.adopt(KEY, ProcessId(me.pid, me.start_ticks + 1))
    assert not supervisor.adopt(KEY, ProcessId(2**22 + 1, 1))
    assert notes.none_within(0.05)


def test_adopt_without_pidfd_support(
    supervisor: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux < 5.3 (EL7) has no pidfd_open: the process is watched by its identity instead."""
    first = Supervisor()
    process = spawn(first, tmp_path, ["sleep", "30"])
    first.close()
    notes = Notes()
    supervisor.watch(notes)

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr("lmrunner.process.os.pidfd_open", no_pidfd)
    try:
        assert supervisor.adopt(KEY, process)
        os.kill(process.pid, signal.SIGKILL)
        assert notes.next() == KEY
    finally:
        if alive(process):
            os.kill(process.pid, signal.SIGKILL)


# --- notifications ----------------------------------------------------------------------------


def test_exits_before_watch_are_delivered_when_watch_is_called(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    spawn(supervisor, tmp_path, ["/bin/sh", "-c", "exit 1"])
    other = "1f00d2e4-0000-4000-8000-000000000000"
    spawn(supervisor, tmp_path, ["/bin/sh", "-c", "exit 2"], key=other)
    join_waiters(KEY)
    join_waiters(other)
    got: list[str] = []
    supervisor.watch(got.append)
    assert sorted(got) == sorted([KEY, other])  # delivered inside watch(), not later
    status = read_status(tmp_path / f"{other}.status")
    assert status is not None and status.exit_code == 2


def test_close_stops_notifications(tmp_path: Path) -> None:
    supervisor = Supervisor()
    notes = Notes()
    supervisor.watch(notes)
    supervisor.close()
    spawn(supervisor, tmp_path, ["/bin/sh", "-c", "exit 4"])
    join_waiters(KEY)
    assert notes.none_within(0.05)
    supervisor.watch(notes)  # nothing was queued for later either
    assert notes.none_within(0.05)
    status = read_status(tmp_path / f"{KEY}.status")
    assert status is not None and status.exit_code == 4  # the exit is still recorded


def test_close_stops_notifications_of_adopted_processes(tmp_path: Path) -> None:
    first = Supervisor()
    process = spawn(first, tmp_path, ["sleep", "30"])
    first.close()
    second = Supervisor()
    notes = Notes()
    second.watch(notes)
    assert second.adopt(KEY, process)
    second.close()
    os.kill(process.pid, signal.SIGKILL)
    join_waiters(KEY)
    assert notes.none_within(0.05)


def test_a_vanished_lm_directory_still_notifies(supervisor: Supervisor, tmp_path: Path) -> None:
    """The status cannot be written (its directory is gone): logged, and the core still told."""
    notes = Notes()
    supervisor.watch(notes)
    directory = tmp_path / "lm"
    directory.mkdir()
    supervisor.spawn(
        KEY,
        ["/bin/sh", "-c", "sleep 0.2"],
        status_file=directory / "status.json",
        log_file=tmp_path / "log",
    )
    directory.rmdir()
    assert notes.next() == KEY
    assert read_status(directory / "status.json") is None


# --- read_status ------------------------------------------------------------------------------


def test_read_status_of_a_missing_file(tmp_path: Path) -> None:
    assert read_status(tmp_path / "status.json") is None


@pytest.mark.parametrize("text", ["", "{", '{"exit_code": 3', "not json\n"])
def test_read_status_of_a_corrupt_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "status.json"
    path.write_text(text)
    assert read_status(path) is None


@pytest.mark.parametrize("text", ["null", "3", "[]", '{"exit_code": "x"}', '{"ended_at": []}'])
def test_read_status_of_valid_json_that_is_no_status(tmp_path: Path, text: str) -> None:
    path = tmp_path / "status.json"
    path.write_text(text)
    assert read_status(path) is None


def test_read_status_of_an_unobserved_end(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text('{"exit_code": null, "ended_at": null}')
    assert read_status(path) == ExitStatus(None, None)


@pytest.mark.allow_subprocess
def test_send_signal_hits_exactly_the_process_it_names() -> None:
    """The one way lmrunner signals a process it knows by pid: never a recycled pid."""
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        me = identify(child.pid)
        assert me is not None
        send_signal(ProcessId(child.pid, me.start_ticks + 1), signal.SIGKILL)  # another one
        assert alive(me)
        send_signal(me, signal.SIGKILL, group=True)
        assert child.wait(timeout=10) == -signal.SIGKILL
        send_signal(me, signal.SIGKILL)  # gone: nothing happens
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("launcher", "expected"),
    [
        # systemd-run --scope switches uid and gid itself, but never the groups.
        (True, [("setgroups", [])]),
        (False, [("setgroups", []), ("setgid", 1001), ("setuid", 1000)]),
    ],
)
def test_the_child_drops_the_daemons_groups_with_or_without_a_launcher(
    monkeypatch: pytest.MonkeyPatch, launcher: bool, expected: list[tuple[str, object]]
) -> None:
    from lmrunner import process

    calls: list[tuple[str, object]] = []
    for name in ("setgroups", "setgid", "setuid"):
        monkeypatch.setattr(os, name, lambda v, n=name: calls.append((n, v)))
    monkeypatch.setattr(process, "enter", lambda files: None)
    process._preexec((), (1000, 1001), launcher=launcher)()
    assert calls == expected
