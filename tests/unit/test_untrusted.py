"""lmrunner.untrusted on real files a payload could plant: links, FIFOs, devices, sockets, huge
files. These tests run as root (mknod needs it) and never block: anything that could is run
under a deadline."""

from __future__ import annotations

import os
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmrunner import untrusted
from lmrunner.untrusted import MESSAGE_LIMIT, Bounded, UntrustedFileError

T = TypeVar("T")
GIB = 1 << 30


@contextmanager
def deadline(seconds: float = 5.0) -> Iterator[None]:
    """Fail (instead of hanging for ever) when the body blocks longer than ``seconds``."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def no_block(call: Callable[[], T]) -> T:
    with deadline():
        return call()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The trusted folder (an LM directory) with a ``joboutputs`` folder in it."""
    made = tmp_path / "lm"
    (made / "joboutputs").mkdir(parents=True)
    return made


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host folder outside the LM directory, with a file a payload must never reach."""
    made = tmp_path / "host"
    made.mkdir()
    (made / "secret").write_text("200 secret\n")
    return made


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def make_device(path: Path) -> Path:
    """/dev/zero's numbers: a device that never ends."""
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    return path


def make_socket(path: Path) -> Path:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        here = Path.cwd()
        os.chdir(path.parent)  # a relative name: sun_path is short
        try:
            sock.bind(path.name)
        finally:
            os.chdir(here)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    return path


def make_dir(path: Path) -> Path:
    path.mkdir()
    (path / "inner").write_text("x")
    return path


def make_sparse(path: Path, head: bytes, size: int = GIB) -> Path:
    with path.open("wb") as file:
        file.write(head)
        file.truncate(size)
    return path


NOT_REGULAR: dict[str, Callable[[Path], Path]] = {
    "fifo": make_fifo,
    "device": make_device,
    "socket": make_socket,
    "directory": make_dir,
}


# --- read: refusals ------------------------------------------------------------------------


def test_read_refuses_a_symlink_at_the_leaf(root: Path, outside: Path) -> None:
    (root / "joboutputs" / "log").symlink_to(outside / "secret")
    with pytest.raises(UntrustedFileError):
        untrusted.read(root, "joboutputs/log", 100)


def test_read_refuses_a_symlink_to_a_file_inside_too(root: Path) -> None:
    (root / "joboutputs" / "real").write_text("fine\n")
    (root / "joboutputs" / "log").symlink_to("real")
    with pytest.raises(UntrustedFileError):
        untrusted.read(root, "joboutputs/log", 100)


def test_read_refuses_a_symlinked_intermediate_folder(root: Path, outside: Path) -> None:
    (root / "joboutputs" / "sub").symlink_to(outside)
    with pytest.raises(UntrustedFileError):
        untrusted.read(root, "joboutputs/sub/secret", 100)


def test_read_refuses_a_symlinked_top_folder(root: Path, outside: Path) -> None:
    (root / "joboutputs").rmdir()
    (root / "joboutputs").symlink_to(outside)
    with pytest.raises(UntrustedFileError):
        untrusted.read(root, "joboutputs/secret", 100)


def test_read_refuses_a_regular_file_used_as_a_folder(root: Path) -> None:
    (root / "joboutputs" / "sub").write_text("not a folder")
    with pytest.raises(UntrustedFileError):
        untrusted.read(root, "joboutputs/sub/x", 100)


@pytest.mark.parametrize("kind", sorted(NOT_REGULAR))
def test_read_refuses_what_is_not_a_regular_file(root: Path, kind: str) -> None:
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    NOT_REGULAR[kind](root / "joboutputs" / "thing")
    with pytest.raises(UntrustedFileError):
        no_block(lambda: untrusted.read(root, "joboutputs/thing", 100))
    with pytest.raises(UntrustedFileError):
        no_block(lambda: untrusted.read(root, "joboutputs/thing", 100, tail=True))


def test_read_of_a_fifo_with_a_writer_does_not_block_either(root: Path) -> None:
    fifo = make_fifo(root / "joboutputs" / "pipe")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets a writer open without blocking
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, b"200 from a pipe\n")
        with pytest.raises(UntrustedFileError):
            no_block(lambda: untrusted.read(root, "joboutputs/pipe", 100))
    finally:
        os.close(writer)
        os.close(reader)


@pytest.mark.parametrize("name", ["../host/secret", "joboutputs/../../host/secret", ".."])
def test_read_refuses_dot_dot(root: Path, outside: Path, name: str) -> None:
    with pytest.raises(UntrustedFileError):
        untrusted.read(root, name, 100)


def test_read_refuses_absolute_names(root: Path, outside: Path) -> None:
    with pytest.raises(UntrustedFileError):
        untrusted.read(root, str(outside / "secret"), 100)


@pytest.mark.parametrize("name", ["", "."])
def test_read_refuses_empty_names(root: Path, name: str) -> None:
    with pytest.raises(UntrustedFileError):
        untrusted.read(root, name, 100)


def test_read_returns_none_for_a_missing_file(root: Path) -> None:
    assert untrusted.read(root, "joboutputs/absent", 100) is None
    assert untrusted.read(root, "nofolder/absent", 100) is None
    assert untrusted.read(root, "joboutputs/absent", 100, tail=True) is None


# --- read: bounds -------------------------------------------------------------------------


def test_read_is_bounded_and_says_so(root: Path) -> None:
    (root / "joboutputs" / "log").write_bytes(b"0123456789")
    assert untrusted.read(root, "joboutputs/log", 4) == Bounded(b"0123", truncated=True)
    assert untrusted.read(root, "joboutputs/log", 100) == Bounded(b"0123456789", truncated=False)


def test_a_file_of_exactly_limit_bytes_is_not_truncated(root: Path) -> None:
    (root / "joboutputs" / "log").write_bytes(b"0123456789")
    assert untrusted.read(root, "joboutputs/log", 10) == Bounded(b"0123456789", truncated=False)
    assert untrusted.read(root, "joboutputs/log", 10, tail=True) == Bounded(
        b"0123456789", truncated=False
    )
    assert untrusted.read(root, "joboutputs/log", 9) == Bounded(b"012345678", truncated=True)


def test_tail_gives_the_last_bytes(root: Path) -> None:
    (root / "joboutputs" / "log").write_bytes(b"0123456789")
    assert untrusted.read(root, "joboutputs/log", 3, tail=True) == Bounded(b"789", truncated=True)
    assert untrusted.read(root, "joboutputs/log", 0, tail=True) == Bounded(b"", truncated=True)


def test_empty_file(root: Path) -> None:
    (root / "joboutputs" / "log").write_bytes(b"")
    assert untrusted.read(root, "joboutputs/log", 10) == Bounded(b"", truncated=False)
    assert untrusted.read(root, "joboutputs/log", 10, tail=True) == Bounded(b"", truncated=False)


def test_reads_of_a_huge_sparse_file_are_bounded(root: Path) -> None:
    make_sparse(root / "joboutputs" / "log", b"head", GIB)
    head = no_block(lambda: untrusted.read(root, "joboutputs/log", 8))
    assert head == Bounded(b"head\0\0\0\0", truncated=True)
    tail = no_block(lambda: untrusted.read(root, "joboutputs/log", 8, tail=True))
    assert tail == Bounded(b"\0" * 8, truncated=True)


def test_bounded_text_replaces_bad_bytes() -> None:
    assert Bounded(b"ok \xff", truncated=False).text() == "ok \ufffd"


# --- read_message ----------------------------------------------------------------------------


def message(root: Path, data: bytes) -> str | None:
    (root / "joboutputs" / "shutdown_message").write_bytes(data)
    return untrusted.read_message(root)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"300 No more work\n", "300 No more work"),
        (b"  200 Done  \r\nsecond line\n", "200 Done"),
        (b"200 no newline", "200 no newline"),
        (b"", None),
        (b"   \n\t\n", None),
        (b"\n200 on the second line\n", None),
    ],
)
def test_read_message_gives_the_first_line_stripped(
    root: Path, data: bytes, expected: str | None
) -> None:
    assert message(root, data) == expected


def test_read_message_of_an_absent_file(root: Path) -> None:
    assert untrusted.read_message(root) is None
    assert untrusted.read_message(root / "nowhere") is None


def test_read_message_refuses_a_symlink(root: Path, outside: Path) -> None:
    (root / "joboutputs" / "shutdown_message").symlink_to(outside / "secret")
    assert untrusted.read_message(root) is None


@pytest.mark.parametrize("kind", sorted(NOT_REGULAR))
def test_read_message_is_none_for_what_is_not_a_regular_file(root: Path, kind: str) -> None:
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    NOT_REGULAR[kind](root / "joboutputs" / "shutdown_message")
    assert no_block(lambda: untrusted.read_message(root)) is None


def test_read_message_reads_at_most_message_limit_bytes_of_a_huge_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_sparse(root / "joboutputs" / "shutdown_message", b"200 Done\n" + b"x" * 10_000, GIB)
    got: list[int] = []
    real_read = os.read

    def counting_read(fd: int, size: int) -> bytes:
        data = real_read(fd, size)
        got.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting_read)
    assert no_block(lambda: untrusted.read_message(root)) == "200 Done"
    monkeypatch.undo()
    # One byte more than the limit tells "exactly the limit" from "longer".
    assert 0 < sum(got) <= MESSAGE_LIMIT + 1


def test_read_message_of_one_endless_line_is_cut_at_the_limit(root: Path) -> None:
    make_sparse(root / "joboutputs" / "shutdown_message", b"200 " + b"y" * 10_000, GIB)
    got = no_block(lambda: untrusted.read_message(root))
    assert got == "200 " + "y" * (MESSAGE_LIMIT - 4)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.binary(max_size=2 * MESSAGE_LIMIT))
def test_read_message_of_random_bytes_never_raises(root: Path, data: bytes) -> None:
    got = message(root, data)
    if got is not None:
        assert isinstance(got, str)
        assert got
        assert got == got.strip()
        assert got.splitlines() == [got]
        assert len(got) <= MESSAGE_LIMIT


# --- lstat_regular ------------------------------------------------------------------------------


def test_lstat_regular_of_a_regular_file(root: Path) -> None:
    beat = root / "joboutputs" / "heartbeat"
    beat.write_text("alive\n")
    os.utime(beat, (1_700_000_000, 1_700_000_000))
    info = untrusted.lstat_regular(root / "joboutputs", "heartbeat")
    assert info is not None
    assert stat.S_ISREG(info.st_mode)
    assert info.st_mtime == 1_700_000_000
    assert info.st_ino == beat.stat().st_ino


def test_lstat_regular_is_none_for_a_symlink_even_to_a_fresh_file(
    root: Path, outside: Path
) -> None:
    fresh = outside / "fresh"
    fresh.write_text("alive\n")  # mtime: now
    (root / "joboutputs" / "heartbeat").symlink_to(fresh)
    assert untrusted.lstat_regular(root / "joboutputs", "heartbeat") is None
    (root / "joboutputs" / "inside").write_text("alive\n")
    (root / "joboutputs" / "beat2").symlink_to("inside")
    assert untrusted.lstat_regular(root / "joboutputs", "beat2") is None


def test_lstat_regular_is_none_under_a_symlinked_folder(root: Path, outside: Path) -> None:
    (outside / "heartbeat").write_text("alive\n")
    (root / "joboutputs" / "sub").symlink_to(outside)
    assert untrusted.lstat_regular(root / "joboutputs", "sub/heartbeat") is None


@pytest.mark.parametrize("kind", sorted(NOT_REGULAR))
def test_lstat_regular_is_none_for_what_is_not_a_regular_file(root: Path, kind: str) -> None:
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    NOT_REGULAR[kind](root / "joboutputs" / "heartbeat")
    assert no_block(lambda: untrusted.lstat_regular(root / "joboutputs", "heartbeat")) is None


@pytest.mark.parametrize("name", ["absent", "nofolder/absent", "../host/secret", "/etc/passwd"])
def test_lstat_regular_is_none_for_missing_or_bad_names(
    root: Path, outside: Path, name: str
) -> None:
    assert untrusted.lstat_regular(root / "joboutputs", name) is None


# --- create ------------------------------------------------------------------------------------


def test_create_writes_a_new_file(root: Path) -> None:
    assert untrusted.create(root, "joboutputs/shutdown_message", b"100 Stopped\n") is True
    made = root / "joboutputs" / "shutdown_message"
    assert made.read_bytes() == b"100 Stopped\n"
    info = made.lstat()
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o644 & ~current_umask()


def test_create_writes_large_data_whole(root: Path) -> None:
    data = os.urandom(3 << 20)
    assert untrusted.create(root, "big", data, mode=0o600) is True
    assert (root / "big").read_bytes() == data


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_create_leaves_an_existing_file_alone(root: Path) -> None:
    there = root / "joboutputs" / "shutdown_message"
    there.write_bytes(b"300 payload's own\n")
    before = there.stat()
    assert untrusted.create(root, "joboutputs/shutdown_message", b"100 ours\n") is False
    assert there.read_bytes() == b"300 payload's own\n"
    assert there.stat().st_ino == before.st_ino


def test_create_does_not_follow_a_symlink_to_a_file_outside(root: Path, outside: Path) -> None:
    secret = outside / "secret"
    (root / "joboutputs" / "shutdown_message").symlink_to(secret)
    assert untrusted.create(root, "joboutputs/shutdown_message", b"100 ours\n") is False
    assert secret.read_text() == "200 secret\n"
    assert (root / "joboutputs" / "shutdown_message").is_symlink()


def test_create_does_not_follow_a_dangling_symlink(root: Path, outside: Path) -> None:
    target = outside / "would-be-created"
    (root / "joboutputs" / "shutdown_message").symlink_to(target)
    assert untrusted.create(root, "joboutputs/shutdown_message", b"100 ours\n") is False
    assert not target.exists()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


@pytest.mark.parametrize("kind", sorted(NOT_REGULAR))
def test_create_leaves_what_is_not_a_regular_file_alone(root: Path, kind: str) -> None:
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    thing = NOT_REGULAR[kind](root / "joboutputs" / "shutdown_message")
    mode = thing.lstat().st_mode
    assert no_block(lambda: untrusted.create(root, "joboutputs/shutdown_message", b"x")) is False
    assert thing.lstat().st_mode == mode


def test_create_through_a_symlinked_folder_writes_nothing(root: Path, outside: Path) -> None:
    (root / "joboutputs" / "sub").symlink_to(outside)
    with pytest.raises(UntrustedFileError):
        untrusted.create(root, "joboutputs/sub/new", b"x")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    (root / "joboutputs").rename(root / "was-joboutputs")
    (root / "joboutputs").symlink_to(outside)
    with pytest.raises(UntrustedFileError):
        untrusted.create(root, "joboutputs/new", b"x")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "joboutputs/../../escape"])
def test_create_refuses_bad_names(root: Path, name: str) -> None:
    with pytest.raises(UntrustedFileError):
        untrusted.create(root, name, b"x")
    assert not (root.parent / "escape").exists()


def test_create_in_a_missing_folder_raises_oserror(root: Path) -> None:
    with pytest.raises(FileNotFoundError):
        untrusted.create(root, "nofolder/file", b"x")


# --- names -------------------------------------------------------------------------------------


def test_names_lists_a_folder_sorted(root: Path) -> None:
    out = root / "joboutputs"
    for name in ("b", "a", "c"):
        (out / name).write_text(name)
    (out / "sub").mkdir()
    make_fifo(out / "pipe")
    assert untrusted.names(root, "joboutputs") == ["a", "b", "c", "pipe", "sub"]
    assert untrusted.names(out) == ["a", "b", "c", "pipe", "sub"]
    assert untrusted.names(root) == ["joboutputs"]


def test_names_of_a_symlinked_folder_is_empty(root: Path, outside: Path) -> None:
    (root / "joboutputs" / "sub").symlink_to(outside)
    assert untrusted.names(root, "joboutputs/sub") == []
    (root / "link").symlink_to(outside)
    assert untrusted.names(root, "link") == []
    assert untrusted.names(root / "link") == []  # the trusted root itself being a link


def test_names_of_a_missing_or_bad_name_is_empty(root: Path) -> None:
    (root / "file").write_text("x")
    assert untrusted.names(root, "absent") == []
    assert untrusted.names(root, "file") == []
    assert untrusted.names(root, "../..") == []
    assert untrusted.names(root / "absent") == []


# --- remove_tree ----------------------------------------------------------------------------------


def test_remove_tree_does_not_follow_links_out(root: Path, outside: Path) -> None:
    (outside / "keep").mkdir()
    (outside / "keep" / "file").write_text("kept")
    (root / "joboutputs" / "deep" / "deeper").mkdir(parents=True)
    (root / "joboutputs" / "deep" / "deeper" / "to-host").symlink_to(outside)
    (root / "joboutputs" / "to-secret").symlink_to(outside / "secret")
    (root / "joboutputs" / "data").write_text("payload's")
    make_fifo(root / "joboutputs" / "pipe")
    untrusted.remove_tree(root)
    assert not root.exists()
    assert (outside / "secret").read_text() == "200 secret\n"
    assert (outside / "keep" / "file").read_text() == "kept"


def test_remove_tree_unlinks_a_top_level_symlink(tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "lm-link"
    link.symlink_to(outside)
    untrusted.remove_tree(link)
    assert not link.exists() and not link.is_symlink()
    assert outside.is_dir()
    assert (outside / "secret").read_text() == "200 secret\n"


def test_remove_tree_of_a_missing_folder_is_quiet(tmp_path: Path) -> None:
    untrusted.remove_tree(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


# --- replace ------------------------------------------------------------------------------------


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".lmrunner-")]


def test_replace_writes_a_new_file(root: Path) -> None:
    assert untrusted.replace(root, "joboutputs/log", [b"one ", b"", b"two\n"], 100) is True
    written = root / "joboutputs" / "log"
    assert written.read_bytes() == b"one two\n"
    assert stat.S_ISREG(written.lstat().st_mode)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644 & ~current_umask()
    assert temporaries(root / "joboutputs") == []


def test_replace_takes_any_iterable_and_a_mode(root: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"a" * 70000
        yield b"b"

    assert untrusted.replace(root, "joboutputs/gen", chunks(), 70001, mode=0o600)
    written = root / "joboutputs" / "gen"
    assert written.read_bytes() == b"a" * 70000 + b"b"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert untrusted.replace(root, "joboutputs/empty", [], 0)
    assert (root / "joboutputs" / "empty").read_bytes() == b""


def test_replace_replaces_an_existing_file_as_a_new_inode(root: Path) -> None:
    old = root / "joboutputs" / "heartbeat"
    old.write_text("an old and longer heartbeat\n")
    held = old.open("rb")  # a reader of the old file keeps reading the old file
    before = old.stat().st_ino
    try:
        assert untrusted.replace(root, "joboutputs/heartbeat", [b"1"], 10)
        assert old.read_bytes() == b"1"
        assert old.stat().st_ino != before
        assert held.read() == b"an old and longer heartbeat\n"
    finally:
        held.close()
    assert temporaries(root / "joboutputs") == []


@pytest.mark.parametrize("target", ["secret", "absent", "."])
def test_replace_replaces_a_symlink_and_leaves_its_target(
    root: Path, outside: Path, target: str
) -> None:
    link = root / "joboutputs" / "heartbeat"
    link.symlink_to(outside / target)
    assert untrusted.replace(root, "joboutputs/heartbeat", [b"payload's"], 100)
    assert not link.is_symlink()
    assert link.read_bytes() == b"payload's"
    assert (outside / "secret").read_text() == "200 secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_replace_replaces_what_is_not_a_regular_file_without_opening_it(
    root: Path, kind: str
) -> None:
    NOT_REGULAR[kind](root / "joboutputs" / "odd")
    assert no_block(lambda: untrusted.replace(root, "joboutputs/odd", [b"x"], 10))
    assert (root / "joboutputs" / "odd").read_bytes() == b"x"


@pytest.mark.parametrize("full", [False, True])
def test_replace_of_a_folder_is_false_and_leaves_it(root: Path, full: bool) -> None:
    folder = root / "joboutputs" / "logs"
    folder.mkdir()
    if full:
        (folder / "one").write_text("kept")
    assert untrusted.replace(root, "joboutputs/logs", [b"x"], 10) is False
    assert folder.is_dir()
    assert [p.name for p in folder.iterdir()] == (["one"] if full else [])
    assert temporaries(root / "joboutputs") == []


def test_replace_through_a_symlinked_folder_raises_and_writes_nothing(
    root: Path, outside: Path
) -> None:
    (root / "joboutputs").rmdir()
    (root / "joboutputs").symlink_to(outside)
    with pytest.raises(UntrustedFileError):
        untrusted.replace(root, "joboutputs/secret", [b"overwritten"], 100)
    with pytest.raises(UntrustedFileError):
        untrusted.replace(root, "joboutputs/new", [b"x"], 100)
    assert (outside / "secret").read_text() == "200 secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_replace_under_a_file_used_as_a_folder_raises(root: Path) -> None:
    (root / "joboutputs" / "file").write_text("x")
    with pytest.raises(UntrustedFileError):
        untrusted.replace(root, "joboutputs/file/inner", [b"x"], 10)


@pytest.mark.parametrize("chunks", [[b"x" * 11], [b"x" * 6, b"x" * 5], [b"x" * 10, b"y"]])
def test_replace_over_the_limit_raises_and_leaves_nothing(root: Path, chunks: list[bytes]) -> None:
    old = root / "joboutputs" / "log"
    old.write_text("before")
    with pytest.raises(UntrustedFileError, match="more than 10 bytes"):
        untrusted.replace(root, "joboutputs/log", chunks, 10)
    with pytest.raises(UntrustedFileError):
        untrusted.replace(root, "joboutputs/new", chunks, 10)
    assert old.read_text() == "before"
    assert sorted(p.name for p in (root / "joboutputs").iterdir()) == ["log"]


def test_replace_exactly_at_the_limit(root: Path) -> None:
    assert untrusted.replace(root, "joboutputs/log", [b"x" * 6, b"x" * 4], 10)
    assert (root / "joboutputs" / "log").read_bytes() == b"x" * 10


def test_replace_stops_reading_chunks_once_over_the_limit(root: Path) -> None:
    taken: list[int] = []

    def endless() -> Iterator[bytes]:
        while True:
            taken.append(1)
            yield b"z" * 1000

    with pytest.raises(UntrustedFileError):
        untrusted.replace(root, "joboutputs/log", endless(), 2500)
    assert len(taken) == 3
    assert temporaries(root / "joboutputs") == []


def test_replace_removes_its_temporary_when_the_chunks_fail(root: Path) -> None:
    def failing() -> Iterator[bytes]:
        yield b"half"
        raise ValueError("the body ended early")

    with pytest.raises(ValueError, match="ended early"):
        untrusted.replace(root, "joboutputs/log", failing(), 100)
    assert list((root / "joboutputs").iterdir()) == []


@pytest.mark.parametrize(
    "name", ["joboutputs/.lmrunner-0123456789abcdef", "joboutputs/.lmrunner-", ".lmrunner-x"]
)
def test_replace_refuses_its_own_temporary_names(root: Path, name: str) -> None:
    with pytest.raises(UntrustedFileError, match="lmrunner's"):
        untrusted.replace(root, name, [b"x"], 10)
    assert list((root / "joboutputs").iterdir()) == []


@pytest.mark.parametrize(
    "name", ["../escaped", "joboutputs/../../escaped", "/tmp/escaped", "", "."]
)
def test_replace_refuses_bad_names(root: Path, name: str) -> None:
    with pytest.raises(UntrustedFileError):
        untrusted.replace(root, name, [b"x"], 10)
    assert not (root.parent / "escaped").exists()


def test_replace_in_a_missing_folder_raises_oserror(root: Path) -> None:
    with pytest.raises(FileNotFoundError):
        untrusted.replace(root, "absent/log", [b"x"], 10)
