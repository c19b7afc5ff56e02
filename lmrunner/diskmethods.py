"""How this host gives an LM a filesystem of its own, bounded at its disk size: the one place
that chooses (:func:`open_disk_method`), as :func:`lmrunner.cgroups.open_controller` does for
cgroups. :mod:`lmrunner.lmdisks` only ever sees the :class:`DiskMethod` interface.

The method here is a sparse image file in ``<state_dir>/disks``, formatted ext4 and
loop-mounted (``nodev,nosuid``) on the LM's ``mnt`` folder, Vac's mount point for its per-LM
logical volumes. Nothing is written until the payload writes: formatting a sparse file with lazy
inode tables and no journal takes milliseconds whatever its size, and the payload meets a real
``ENOSPC`` when its filesystem is full. No journal: the filesystem dies with its LM, and a host
crash ends every LM anyway.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmrunner import runner
from lmrunner.config import DiskMethodName, FactoryConfig
from lmrunner.errors import LmrunnerError

LOG = logging.getLogger(__name__)

#: ext4's bytes per inode here; the image is made this much larger, so the space a payload can
#: fill is its size (measured: 98 to 100 % of it from 100 MB to 100 GB).
BYTES_PER_INODE = 32768
INODE_SIZE = 256
SLACK_BYTES = 1 << 20
MKFS_TIMEOUT = 60.0
MOUNT_TIMEOUT = 60.0
#: The ext4 options: no journal, no reserved blocks (the payload is often root: reserved
#: blocks would be its anyway), lazy inode tables, no discard of a sparse file.
MKFS_OPTIONS = (
    "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-b", "4096",
    "-i", str(BYTES_PER_INODE), "-I", str(INODE_SIZE), "-E", "lazy_itable_init=1,nodiscard",
)  # fmt: skip
MOUNT_OPTIONS = "loop,nodev,nosuid,noatime"


class DiskError(LmrunnerError):
    """An LM's filesystem could not be made, measured or removed."""


class DiskUnsupported(LmrunnerError):
    """This host cannot give LMs filesystems of their own (the reason is in the message)."""


@dataclass(frozen=True, slots=True)
class DiskRef:
    """One LM's filesystem, as recorded in its row before anything is made."""

    method: str
    image: Path  # the backing storage on the host
    mount: Path  # where it is mounted (the LM directory's ``mnt``)
    size_bytes: int  # what the LM was promised (scratch_limit_bytes)

    def to_json(self) -> str:
        return json.dumps(
            {
                "method": self.method,
                "image": str(self.image),
                "mount": str(self.mount),
                "size_bytes": self.size_bytes,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> DiskRef:
        try:
            data: dict[str, Any] = json.loads(text)
            return cls(str(data["method"]), Path(data["image"]), Path(data["mount"]),
                       int(data["size_bytes"]))  # fmt: skip
        except (ValueError, KeyError, TypeError) as err:
            raise DiskError(f"unreadable disk reference {text[:80]!r}: {err}") from err


@dataclass(frozen=True, slots=True)
class DiskUsage:
    used_bytes: int  # what the LM's files take
    size_bytes: int  # what its filesystem can hold


class DiskMethod(Protocol):
    """Per-LM filesystems on this host."""

    name: str
    root: Path  # where the backing storage lives (on the state directory's filesystem)

    def plan(self, uuid: str, mount: Path, size_bytes: int) -> DiskRef: ...

    def create(self, ref: DiskRef) -> None:
        """Make and mount the filesystem (its folder ``ref.mount`` may exist; it must be empty).

        Raises:
            DiskError: it could not be made; nothing of it is left.
        """

    def usage(self, ref: DiskRef) -> DiskUsage | None:
        """None when it is not mounted."""

    def allocated(self, ref: DiskRef) -> int:
        """The host bytes its backing storage takes now; it never shrinks while mounted."""

    def release(self, ref: DiskRef) -> None:
        """Unmount it and free its backing storage; idempotent.

        Raises:
            DiskError: it is still mounted or its storage cannot be removed (retry later).
        """

    def backing(self) -> list[str]:
        """The uuids whose backing storage exists (crash leftovers are among them)."""


def image_bytes(size_bytes: int) -> int:
    """The image size that leaves ``size_bytes`` free once formatted."""
    return size_bytes + size_bytes * INODE_SIZE // BYTES_PER_INODE + SLACK_BYTES


class LoopDisks:
    """Sparse ext4 images, loop-mounted (``mount -o loop`` sets autoclear: unmounting frees the
    loop device)."""

    name = "loop"

    def __init__(self, root: Path) -> None:
        self.root = root

    def plan(self, uuid: str, mount: Path, size_bytes: int) -> DiskRef:
        return DiskRef(self.name, self.root / f"{uuid}.img", mount, size_bytes)

    def create(self, ref: DiskRef) -> None:
        try:
            self.root.mkdir(mode=0o700, exist_ok=True)
            ref.mount.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(ref.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError as err:  # someone else's: never removed here
            raise DiskError(f"cannot make {ref.image}: it exists") from err
        except OSError as err:
            raise DiskError(f"cannot make {ref.image}: {err.strerror}") from err
        try:
            try:
                os.ftruncate(fd, image_bytes(ref.size_bytes))
            finally:
                os.close(fd)
        except OSError as err:
            self._forget(ref)
            raise DiskError(f"cannot make {ref.image}: {err.strerror}") from err
        try:
            runner.run(["mkfs.ext4", *MKFS_OPTIONS, "-L", "lmrunner", ref.image],
                       timeout=MKFS_TIMEOUT)  # fmt: skip
            runner.run(["mount", "-o", MOUNT_OPTIONS, ref.image, ref.mount], timeout=MOUNT_TIMEOUT)
        except LmrunnerError as err:
            self._forget(ref)
            raise DiskError(f"cannot make the filesystem of {ref.mount}: {err}") from err

    def usage(self, ref: DiskRef) -> DiskUsage | None:
        if not os.path.ismount(ref.mount):
            return None
        try:
            info = os.statvfs(ref.mount)
        except OSError:
            return None
        used = (info.f_blocks - info.f_bfree) * info.f_frsize
        return DiskUsage(used, info.f_blocks * info.f_frsize)

    def allocated(self, ref: DiskRef) -> int:
        try:
            return ref.image.stat().st_blocks * 512
        except OSError:
            return 0

    def release(self, ref: DiskRef) -> None:
        if os.path.ismount(ref.mount):
            try:
                runner.run(["umount", ref.mount], timeout=MOUNT_TIMEOUT)
            except LmrunnerError as err:
                if not os.path.ismount(ref.mount):  # it went, whatever umount said after
                    return self._unlink(ref)
                # Busy (a process of the LM outlived it, a shell of an admin in it): detached
                # now, freed by the kernel when its last user goes; the image goes below.
                LOG.warning("disk %s: %s; detaching it lazily", ref.mount, err)
                try:
                    runner.run(["umount", "--lazy", ref.mount], timeout=MOUNT_TIMEOUT)
                except LmrunnerError as lazy:
                    raise DiskError(f"cannot unmount {ref.mount}: {lazy}") from lazy
        self._unlink(ref)

    def _unlink(self, ref: DiskRef) -> None:
        try:
            ref.image.unlink(missing_ok=True)
        except OSError as err:
            raise DiskError(f"cannot remove {ref.image}: {err.strerror}") from err

    def backing(self) -> list[str]:
        try:
            names = [entry.name for entry in self.root.iterdir()]
        except FileNotFoundError:
            return []
        except OSError as err:
            raise DiskError(f"cannot list {self.root}: {err.strerror}") from err
        return sorted(n.removesuffix(".img") for n in names if n.endswith(".img"))

    def _forget(self, ref: DiskRef) -> None:
        """Undo a create that failed half-way."""
        try:
            self.release(ref)
        except DiskError as err:
            LOG.error("disk %s: cannot remove what a failed create made: %s", ref.mount, err)


def open_disk_method(factory: FactoryConfig) -> DiskMethod | None:
    """The host's way of giving LMs filesystems, per ``factory.disk_method``; None (the LMs
    write into the state directory, unbounded) when it is ``none``.

    Raises:
        DiskUnsupported: this host cannot do what was asked (``auto``: anything).
    """
    if factory.disk_method is DiskMethodName.NONE:
        return None
    missing = loop_missing()
    if missing is not None:
        raise DiskUnsupported(f"factory.disk_method {factory.disk_method}: {missing}")
    return LoopDisks(factory.state_dir / "disks")


def loop_missing() -> str | None:
    """Why loop-mounted images cannot work here; None when they can."""
    if os.geteuid() != 0:
        return "mounting needs root"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    try:
        if not stat.S_ISCHR(Path("/dev/loop-control").stat().st_mode):
            return "/dev/loop-control is not a device"
    except OSError as err:
        if err.errno == errno.ENOENT:
            return "no /dev/loop-control (is the loop module loaded?)"
        return f"/dev/loop-control: {err.strerror}"
    return None


def describe(method: DiskMethod | None) -> str:
    """One line for logs and ``check``: where the LMs' writes go."""
    if method is None:
        return "disks: none (LMs write into the state directory, unbounded)"
    return f"disks: {method.name}: one sparse ext4 image per LM in {method.root}, loop-mounted"
