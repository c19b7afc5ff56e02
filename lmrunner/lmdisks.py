"""Each LM's filesystem through its life, like its cgroup: recorded, made and mounted on the LM's
``mnt`` folder before anything of the LM exists there; measured while it runs (its peak goes
into the accounting); after its end is recorded, what its joboutputs hold is copied out,
bounded, and the filesystem and its backing storage are removed; found again when a crash left
one. The host's method is chosen once, in :func:`lmrunner.diskmethods.open_disk_method`.

The factory also refuses to promise more disk than the state directory's filesystem holds
(times ``disk_overcommit``): see :func:`refusal`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lmrunner import untrusted
from lmrunner.config import DiskMethodName, FactoryConfig
from lmrunner.diskmethods import (
    DiskError,
    DiskMethod,
    DiskRef,
    DiskUnsupported,
    DiskUsage,
    open_disk_method,
)
from lmrunner.layout import mount_point, outputs_root
from lmrunner.state import LmRecord, Store

__all__ = ["LmDisks", "host_disks", "mount_point", "outputs_root", "refusal"]

LOG = logging.getLogger(__name__)

#: What of an ended LM's joboutputs is kept (with its directory, for machines_dir_days): the
#: files at its top, each cut to its last FILE_LIMIT bytes, at most FILES of them and TOTAL
#: bytes in all. Logs and the shutdown_message fit; a payload's bulk output does not belong there.
KEEP_FILES = 256
KEEP_FILE_LIMIT = 1024 * 1024
KEEP_TOTAL = 16 * 1024 * 1024
#: Below this much free space beside the promised disks no LM starts (as statedir's guard).
RESERVE_BYTES = 64 * 1024 * 1024


def host_disks(factory: FactoryConfig) -> DiskMethod | None:
    """The host's disk method; None when LMs get no filesystems of their own (``auto`` on a
    host without loop devices is logged; an explicit ``loop`` there is an error)."""
    try:
        return open_disk_method(factory)
    except DiskUnsupported as err:
        if factory.disk_method is DiskMethodName.AUTO:
            LOG.warning("no per-LM filesystems (LMs write into the state directory, "
                        "unbounded): %s", err)  # fmt: skip
            return None
        raise


def refusal(
    method: DiskMethod | None,
    factory: FactoryConfig,
    active: list[LmRecord],
    size_bytes: int,
) -> str | None:
    """Why an LM with a disk of ``size_bytes`` must not start now (its disk would make the
    promises exceed the state directory's free space times ``disk_overcommit``); None when
    it may. What running LMs have written already is on disk (not free), so only the rest of
    their promises counts."""
    if method is None or size_bytes <= 0:
        return None
    try:
        info = os.statvfs(factory.state_dir)
    except OSError as err:
        return f"cannot look at the state directory: {err.strerror}"
    free = info.f_bavail * info.f_frsize - RESERVE_BYTES
    outstanding = 0
    for record in active:
        ref = disk_ref(record)
        if ref is not None:
            outstanding += max(ref.size_bytes - method.allocated(ref), 0)
    promised = outstanding + size_bytes
    if promised > free * factory.disk_overcommit:
        return (
            f"disk: {promised / 1e9:.1f} GB would be promised and the state directory has "
            f"{max(free, 0) / 1e9:.1f} GB free (disk_overcommit {factory.disk_overcommit:g})"
        )
    return None


def disk_ref(record: LmRecord) -> DiskRef | None:
    if record.disk is None:
        return None
    try:
        return DiskRef.from_json(record.disk)
    except DiskError as err:
        LOG.error("lm=%s: %s", record.name, err)
        return None


class LmDisks:
    """The filesystems of one factory's LMs (all no-ops without a disk method)."""

    def __init__(self, method: DiskMethod | None, store: Store) -> None:
        self.method = method
        self.store = store
        self._told: dict[str, str] = {}  # uuid -> the removal problem last logged

    def _tell(self, record: LmRecord, problem: str) -> None:
        """Log a disk that cannot be removed once per problem, not on every retry (a
        read-only state directory would repeat it each pass)."""
        if self._told.get(record.uuid) != problem:
            self._told[record.uuid] = problem
            LOG.error("lm=%s: cannot remove its disk yet: %s", record.name, problem)

    def make(self, record: LmRecord, overhead: int = 0) -> Path | None:
        """Record, make and mount the LM's filesystem (its disk size, plus ``overhead`` for the
        engine's own files: a VM's image metadata); its mount point, or None when the LM gets
        none (no method, or a disk size of 0).

        Raises:
            DiskError: it could not be made (nothing of it is left).
        """
        if self.method is None or record.limits.disk_bytes <= 0:
            return None
        ref = self.method.plan(record.uuid, mount_point(record.directory),
                               record.limits.disk_bytes + overhead)  # fmt: skip
        self.store.update(record.uuid, disk=ref.to_json())  # first: a crash leaves it findable
        self.method.create(ref)
        return ref.mount

    def usage(self, record: LmRecord) -> DiskUsage | None:
        ref = disk_ref(record)
        if ref is None or self.method is None:
            return None
        return self.method.usage(ref)

    def peak(self, record: LmRecord) -> int | None:
        """The most of the host's disk the LM's filesystem took: what its backing storage
        holds, which only grows while it is mounted (no discard: blocks the payload frees are
        reused, not given back), so a reading at the end is the peak and no sample is missed."""
        ref = disk_ref(record)
        if ref is None or self.method is None:
            return record.disk_peak_bytes
        return max(self.method.allocated(ref), record.disk_peak_bytes or 0)

    def sample(self, active: list[LmRecord]) -> None:
        """Keep each running LM's peak in its row (for ``ps``; one ``stat`` each)."""
        for record in active:
            peak = self.peak(record)
            if peak is not None and peak > (record.disk_peak_bytes or 0):
                self.store.update(record.uuid, disk_peak_bytes=peak)

    def release(self, record: LmRecord) -> bool:
        """After an LM's end is recorded: keep a bounded copy of its joboutputs, then remove
        its filesystem; False to retry later."""
        ref = disk_ref(record)
        if ref is None:
            if record.disk is not None:  # unreadable: its storage is found by its uuid
                self.store.update(record.uuid, disk=None)
            return True
        if self.method is None:  # the method was switched off with disks left: keep the row
            return False
        if os.path.ismount(ref.mount):
            keep_outputs(ref.mount, record.directory, record.name)
        try:
            self.method.release(ref)
        except DiskError as err:
            self._tell(record, str(err))
            return False
        self.store.update(record.uuid, disk=None)
        if self._told.pop(record.uuid, None) is not None:
            LOG.info("lm=%s: its disk is removed", record.name)
        return True

    def remove_leftovers(self) -> None:
        """Disks of ended LMs not removed before (a crash, a busy mount), and backing storage
        no row names. Only uuids this store knows are touched: other factories may share
        nothing here, but a stray file is no reason to guess."""
        for leftover in self.store.leftover_disks():
            self.release(leftover)
        if self.method is None:
            return
        try:
            found = self.method.backing()
        except DiskError as err:
            LOG.error("cannot look for leftover disks: %s", err)
            return
        for uuid in found:
            known = self.store.get(uuid)
            if known is None or known.active or known.disk is not None:
                continue
            record = known
            ref = self.method.plan(uuid, mount_point(record.directory), record.limits.disk_bytes)
            try:
                self.method.release(ref)
            except DiskError as err:
                self._tell(record, f"unrecorded: {err}")
            else:
                LOG.warning("lm=%s: removed a disk its record did not name", record.name)


def keep_outputs(mount: Path, directory: Path, name: str) -> None:
    """Copy the files at the top of ``mount/joboutputs`` into ``directory/joboutputs`` (the
    state directory's filesystem), bounded: each cut to its last KEEP_FILE_LIMIT bytes, at most
    KEEP_FILES files and KEEP_TOTAL bytes. Read through :mod:`lmrunner.untrusted`: links,
    FIFOs, devices and folders are skipped."""
    target = directory / "joboutputs"
    try:
        target.mkdir(mode=0o755, exist_ok=True)
    except OSError as err:
        LOG.error("lm=%s: cannot keep its joboutputs: %s", name, err)
        return
    total = kept = skipped = 0
    for entry in untrusted.names(directory, "joboutputs"):  # kept by an earlier try: count them
        found = untrusted.lstat_regular(directory, f"joboutputs/{entry}")
        kept += 1
        total += 0 if found is None else found.st_size
    for entry in untrusted.names(mount, "joboutputs"):
        if kept >= KEEP_FILES or total >= KEEP_TOTAL:
            skipped += 1
            continue
        try:
            got = untrusted.read(mount, f"joboutputs/{entry}",
                                 min(KEEP_FILE_LIMIT, KEEP_TOTAL - total), tail=True)  # fmt: skip
        except (untrusted.UntrustedFileError, OSError):
            skipped += 1  # not a plain file: nothing a log or an outcome needs
            continue
        if got is None:
            continue
        try:
            written = untrusted.create(directory, f"joboutputs/{entry}", got.data)
        except (untrusted.UntrustedFileError, OSError) as err:
            LOG.error("lm=%s: cannot keep joboutputs/%s: %s", name, entry, err)
            continue
        if written:
            kept += 1
            total += len(got.data)
    if skipped:
        LOG.info("lm=%s: kept %d joboutputs files (%d bytes), skipped %d", name, kept, total,
                 skipped)  # fmt: skip
