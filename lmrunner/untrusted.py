"""Files a payload can write: the only way lmrunner (root) reads, writes or looks at them.

A payload is root in its LM and owns everything under the host folders it can write (the LM's
``joboutputs/``, its tmp_binds and scratch folders, 9p shares of a VM). It can plant symlinks to
host files, FIFOs that block an ``open()`` for ever, device nodes that never end, files of any
size, and make them vanish between two calls. So here:

- names are opened relative to a trusted folder (the LM directory, which the payload cannot
  write) one component at a time with ``O_NOFOLLOW`` and ``dir_fd``: no symlink is followed at
  any level, and ``..`` or absolute names are refused;
- opens never block (``O_NONBLOCK``) and anything that is not a regular file (FIFO, socket,
  device, directory) is refused after ``fstat`` on the opened descriptor, not on the name;
- every read is bounded;
- lmrunner's writes only create a new file (``O_CREAT|O_EXCL``) and never replace what the
  payload put there; a write the payload asks for (:func:`replace`) renames a new file over it;
- folders are removed with :func:`shutil.rmtree`, whose fd-based walk never follows links.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lmrunner.errors import LmrunnerError

#: A shutdown_message is one line ("NNN text"): more than this is not one.
MESSAGE_LIMIT = 4096
#: What ``lmrunner logs`` shows of one file at most.
LOG_LIMIT = 1024 * 1024

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = _READ_FLAGS | os.O_WRONLY | os.O_CREAT | os.O_EXCL  # O_RDONLY is 0
#: errno values that mean "a payload put something other than a plain file or folder here"
#: Temporary files of :func:`replace` (a payload's own names must not collide with them).
_TEMP_PREFIX = ".lmrunner-"
_REFUSED = {errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR}


class UntrustedFileError(LmrunnerError):
    """A name in an LM's folders is not a regular file (or folder) lmrunner will touch."""


@dataclass(frozen=True, slots=True)
class Bounded:
    """What a bounded read got: the bytes, and whether the file held more."""

    data: bytes
    truncated: bool

    def text(self) -> str:
        return self.data.decode(errors="replace")


def _parts(name: str | PurePosixPath) -> list[str]:
    parts = [part for part in PurePosixPath(name).parts if part not in ("", ".")]
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise UntrustedFileError(f"{name}: not a plain relative name")
    return parts


@contextmanager
def _parent(root: Path, parts: list[str]) -> Iterator[int]:
    """An O_PATH descriptor of the folder holding ``parts[-1]``; every step refuses links."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                step = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                if err.errno in _REFUSED:
                    where = root.joinpath(*parts)
                    raise UntrustedFileError(f"{where}: {part} is not a folder") from err
                raise
            os.close(fd)
            fd = step
        yield fd
    finally:
        os.close(fd)


@contextmanager
def open_regular(root: Path, name: str | PurePosixPath) -> Iterator[int]:
    """A read descriptor of the regular file ``root/name``.

    Raises:
        FileNotFoundError: it (or a folder above it) does not exist.
        UntrustedFileError: it or a folder above it is a link, FIFO, device, socket or folder.
    """
    parts = _parts(name)
    with _parent(root, parts) as parent:
        try:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
        except OSError as err:
            if err.errno in _REFUSED:
                raise UntrustedFileError(f"{root / name}: not a regular file") from err
            raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UntrustedFileError(f"{root / name}: not a regular file")
        yield fd
    finally:
        os.close(fd)


def read(
    root: Path, name: str | PurePosixPath, limit: int, *, tail: bool = False
) -> Bounded | None:
    """At most ``limit`` bytes of ``root/name`` (its first ones, or its last with ``tail``);
    None when it does not exist.

    Raises:
        UntrustedFileError: it is not a regular file (see :func:`open_regular`).
        OSError: it cannot be read.
    """
    try:
        with open_regular(root, name) as fd:
            skipped = 0
            if tail:
                skipped = max(os.fstat(fd).st_size - limit, 0)
                os.lseek(fd, skipped, os.SEEK_SET)
            chunks = []
            left = limit + 1  # one more byte tells a file of exactly ``limit`` from a longer one
            while left > 0:
                chunk = os.read(fd, min(left, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
    except FileNotFoundError:
        return None
    data = b"".join(chunks)
    if tail:  # the file may have grown since fstat: keep its last ``limit`` bytes read
        return Bounded(data[-limit:] if limit else b"", skipped > 0 or len(data) > limit)
    return Bounded(data[:limit], len(data) > limit)


def read_message(
    root: Path, name: str | PurePosixPath = "joboutputs/shutdown_message"
) -> str | None:
    """The first line of a ``shutdown_message``, or None when there is none worth reading (absent,
    empty, not a regular file, unreadable). Never blocks, never reads more than
    :data:`MESSAGE_LIMIT` bytes."""
    try:
        got = read(root, name, MESSAGE_LIMIT)
    except (UntrustedFileError, OSError):
        return None
    if got is None:
        return None
    lines = got.text().splitlines()
    first = lines[0].strip() if lines else ""
    return first or None


def lstat_regular(root: Path, name: str | PurePosixPath) -> os.stat_result | None:
    """The ``lstat`` of ``root/name`` when it is a regular file, else None (absent, a link or
    anything else). The heartbeat check: a link to a fresh host file is no heartbeat."""
    try:
        parts = _parts(name)
        with _parent(root, parts) as parent:
            info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except (UntrustedFileError, OSError):
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def create(root: Path, name: str | PurePosixPath, data: bytes, *, mode: int = 0o644) -> bool:
    """Create ``root/name`` holding ``data``; False (nothing written) when something is there
    already, whatever it is: what a payload left is never replaced or followed.

    Raises:
        UntrustedFileError: a folder above it is not a plain folder.
        OSError: it cannot be written (e.g. the folder is gone or the disk is full).
    """
    parts = _parts(name)
    with _parent(root, parts) as parent:
        try:
            fd = os.open(parts[-1], _CREATE_FLAGS, mode, dir_fd=parent)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno in _REFUSED:
                return False
            raise
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return True


def replace(
    root: Path, name: str | PurePosixPath, chunks: Iterable[bytes], limit: int, *, mode: int = 0o644
) -> bool:
    """Write ``root/name`` atomically from ``chunks`` (at most ``limit`` bytes): a new file is
    made beside it and renamed over the name, so whatever was there (a link included) is
    replaced, never followed or written through. False when the name is a folder.

    For writes a payload asks for (a VM's ``PUT $JOBOUTPUTS/NAME``); lmrunner's own writes use
    :func:`create`.

    Raises:
        UntrustedFileError: a folder above it is not a plain folder, or more than ``limit`` bytes.
        OSError: it cannot be written (e.g. the folder is gone or the disk is full).
    """
    parts = _parts(name)
    if parts[-1].startswith(_TEMP_PREFIX):
        raise UntrustedFileError(f"{name}: names starting {_TEMP_PREFIX} are lmrunner's")
    with _parent(root, parts) as parent:
        temp = f"{_TEMP_PREFIX}{os.urandom(8).hex()}"
        fd = os.open(temp, _CREATE_FLAGS, mode, dir_fd=parent)
        try:
            written = 0
            try:
                for chunk in chunks:
                    written += len(chunk)
                    if written > limit:
                        raise UntrustedFileError(f"{root / name}: more than {limit} bytes")
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(temp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException as err:
            with suppress(OSError):
                os.unlink(temp, dir_fd=parent)
            if isinstance(err, OSError) and err.errno in (errno.EISDIR, errno.ENOTEMPTY):
                return False
            raise
    return True


def names(root: Path, name: str | PurePosixPath = ".") -> list[str]:
    """The entries of the folder ``root/name`` (``.``: root itself), sorted; [] when it is
    absent or not a plain folder."""
    try:
        parts = [] if PurePosixPath(name) == PurePosixPath(".") else _parts(name)
        with _parent(root, [*parts, "."]) as folder:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=folder)
    except (UntrustedFileError, OSError):
        return []
    try:
        return sorted(os.listdir(fd))  # noqa: PTH208 - a descriptor: no Path can list it
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a folder a payload could write into, never following a link out of it."""
    if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - Linux always has it
        raise UntrustedFileError("this platform's rmtree can follow links: refusing")
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            path.unlink()  # the link itself, never its target
            return
    except FileNotFoundError:
        return
    shutil.rmtree(path, ignore_errors=True)
