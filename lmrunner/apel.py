"""APEL accounting output: one individual job message per LM, and monthly sync messages.

Messages use Vac's field meanings (so a site's existing APEL accounting carries on unchanged: same
Site, SubmitHost, GlobalUserName, Queue), except that wall time, CPU time and real memory are
measured by lmrunner instead of sampled or taken from the allocation (docs/accounting.md).

Files are laid out as Vac laid them out, and that layout is a python-dirq ``QueueSimple``, the
queue ``ssmsend`` reads (apel/ssm ``ssm/ssm2.py``: ``self._outq = QueueSimple(qpath)`` when
``path_type`` is ``dirq``, its default in ``ssm/agents.py``). In cern-mig/python-dirq
``dirq/QueueBase.py`` (and ``dirq/QueueSimple.py``, which imports them):

- ``_DirectoryRegexp`` is ``[0-9a-f]{8}`` and ``_ElementRegexp`` is ``[0-9a-f]{14}``, both matched
  against the whole name; other names are skipped. ``YYYYMMDD`` directories and ``HHMMSS`` + 8
  digits file names are decimal, hence valid hexadecimal names of the right length.
- Elements are listed per directory in sorted order, and the sender locks an element by
  hard-linking ``NAME.lck`` beside it, then removes both once sent. Our temporary files start
  with ``.``, so the queue never sees a half-written message.
- After sending, ``ssmsend`` calls ``purge()``, which removes empty intermediate directories (all
  but the newest): a day directory may vanish between our ``mkdir`` and our write, so writing
  retries (:func:`_write_unique`).
- ``QueueSimple._add_path`` publishes an element with ``os.link(tmp, name)`` and tries another
  name on ``EEXIST``: a link never replaces an existing file, unlike a rename. lmrunner does the
  same, so no message is ever overwritten.

The grammar is apel/apel's (``apel/db/loader/record_factory.py``, ``apel/db/records/job.py``,
``sync.py``, ``record.py``): a header line, ``Key: Value`` lines, records ended by ``%%``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from lmrunner.accounting import AccountingRecord
from lmrunner.config import FactoryConfig
from lmrunner.errors import LmrunnerError
from lmrunner.state import Store

LOG = logging.getLogger(__name__)

JOB_HEADER = "APEL-individual-job-message: v0.3"
SYNC_HEADER = "APEL-sync-message: v0.1"
ARCHIVE = "apel-archive"  # every message ever written; never pruned (as in Vac)
OUTGOING = "apel-outgoing"  # the ssmsend queue: only with factory.gocdb_sitename
#: Names Vac used that dirq's QueueSimple also accepts: day directories and message files.
DAY_PATTERN = re.compile(r"[0-9]{8}")
ELEMENT_PATTERN = re.compile(r"[0-9]{14}")
FRACTION_DIGITS = 8
_MONTH_PATTERN = re.compile(r"([0-9]{4})([0-9]{2})")


class ApelError(LmrunnerError):
    """APEL output cannot be produced as asked (a bad month, no GOCDB site to sync)."""


# --- fields ---------------------------------------------------------------------------------


def hostname(factory: FactoryConfig) -> str:
    """The factory's FQDN (``load_config`` fills it in; the host's own name otherwise)."""
    return factory.hostname or socket.getfqdn()


def site(factory: FactoryConfig) -> str:
    """APEL ``Site``: the GOCDB site name, else the domain part of the space (as Vac)."""
    if factory.gocdb_sitename:
        return factory.gocdb_sitename
    return factory.space.split(".", 1)[1] if "." in factory.space else factory.space


def submit_host(factory: FactoryConfig) -> str:
    """APEL ``SubmitHost``, in Vac's form ``<space>/vac-<factory FQDN>``.

    Kept although this is not Vac: APEL matches sync counts per (Site, SubmitHost), so a
    factory moving from Vac to lmrunner continues the same accounting series.
    """
    return f"{factory.space}/vac-{hostname(factory)}"


def global_user_name(space: str) -> str:
    """Vac's ``GlobalUserName``: ``vac01.example.com`` -> ``/DC=com/DC=example/DC=vac01``."""
    return "".join(f"/DC={part}" for part in reversed(space.split(".")))


def _message(header: str, fields: Iterable[tuple[str, object]]) -> str:
    lines = [header]
    for key, value in fields:
        text = str(value)
        if "\n" in text or "\r" in text or "%%" in text or not text.strip():
            raise ValueError(f"APEL field {key} cannot hold {text!r}")
        lines.append(f"{key}: {text}")
    lines.append("%%")
    return "\n".join(lines) + "\n"


def job_message(record: AccountingRecord, factory: FactoryConfig) -> str:
    """One ``APEL-individual-job-message: v0.3`` for an LM that started.

    Measured, unlike Vac: ``WallDuration`` (start to end, not to the last heartbeat),
    ``CpuDuration`` (cgroup CPU time; 0 when unmeasured) and ``MemoryReal`` (peak memory in KiB;
    omitted when unmeasured). ``MemoryVirtual`` stays Vac's allocated memory in KiB (omitted
    when the record has no allocation). Times are whole seconds: ``StartTime`` and ``EndTime``
    are truncated, durations rounded.

    Raises:
        ValueError: the LM never started (APEL requires ``StartTime``), or a value would break
            the message's line format.
    """
    if record.started is None:
        raise ValueError(f"{record.name} ({record.uuid}) never started: no APEL record")
    host = hostname(factory)
    fields: list[tuple[str, object]] = [
        ("Site", site(factory)),
        ("SubmitHost", submit_host(factory)),
        ("LocalJobId", record.uuid),
        ("LocalUserId", host),
        ("Queue", record.machinetype),
        ("GlobalUserName", global_user_name(factory.space)),
    ]
    if record.fqan:
        fields.append(("FQAN", record.fqan))
    fields += [
        ("WallDuration", round(record.wall_seconds)),
        ("CpuDuration", round(record.cpu_seconds or 0.0)),
        ("Processors", record.processors),
        ("NodeCount", 1),
        ("InfrastructureDescription", "APEL-VAC"),
        ("InfrastructureType", "grid"),
        ("StartTime", math.floor(record.started)),
        ("EndTime", math.floor(record.finished)),
    ]
    if record.memory_peak_bytes is not None:
        fields.append(("MemoryReal", record.memory_peak_bytes // 1024))
    if record.memory_limit_bytes is not None:
        fields.append(("MemoryVirtual", record.memory_limit_bytes // 1024))
    fields += [("ServiceLevelType", "HEPSPEC"), ("ServiceLevel", float(record.hs06 or 1.0))]
    return _message(JOB_HEADER, fields)


def sync_message(factory: FactoryConfig, year: int, month: int) -> str:
    """An ``APEL-sync-message: v0.1``: how many job messages of the month this factory wrote.

    Counts the archive files of the month (the UTC day directories ``YYYYMM??``) whose Site and
    SubmitHost are this factory's current ones, as Vac did; others (written before
    ``gocdb_sitename`` was set, or under another host name) are skipped and logged.
    """
    return _message(
        SYNC_HEADER,
        [
            ("Site", site(factory)),
            ("SubmitHost", submit_host(factory)),
            ("NumberOfJobs", count_jobs(factory, year, month)),
            ("Month", month),
            ("Year", year),
        ],
    )


def count_jobs(factory: FactoryConfig, year: int, month: int) -> int:
    """Archived job messages of the month with this factory's Site and SubmitHost."""
    wanted = {"Site": site(factory), "SubmitHost": submit_host(factory)}
    count = skipped = 0
    for day in sorted((factory.state_dir / ARCHIVE).glob(f"{year:04d}{month:02d}[0-3][0-9]")):
        if not DAY_PATTERN.fullmatch(day.name) or not day.is_dir():
            continue
        for path in day.iterdir():
            if not ELEMENT_PATTERN.fullmatch(path.name):
                continue
            if _header_fields(path, wanted) == wanted:
                count += 1
            else:
                skipped += 1
    if skipped:
        LOG.warning(
            "apel: %d archived records of %04d-%02d have another Site or SubmitHost than "
            "%s, %s; not counted",
            skipped,
            year,
            month,
            wanted["Site"],
            wanted["SubmitHost"],
        )
    return count


def _header_fields(path: Path, keys: Iterable[str]) -> dict[str, str]:
    wanted = set(keys)
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in wanted:
            found[key.strip()] = value.strip()
    return found


# --- files ----------------------------------------------------------------------------------


def element_name(moment: float) -> tuple[str, str]:
    """Vac's (day directory, file name) for a Unix time: ``YYYYMMDD``, ``HHMMSS`` + 8 digits of
    the fractional second, in UTC."""
    whole = math.floor(moment)
    fraction = min(int((moment - whole) * 10**FRACTION_DIGITS), 10**FRACTION_DIGITS - 1)
    at = datetime.fromtimestamp(whole, UTC)
    return at.strftime("%Y%m%d"), f"{at:%H%M%S}{fraction:0{FRACTION_DIGITS}d}"


def _write_unique(directory: Path, name: str, text: str) -> Path:
    """Write ``text`` as a new file ``directory/name`` (or the next free name), atomically.

    The text goes to a hidden temporary file first, which is then hard-linked under the final
    name: a link fails rather than replace an existing file, so nothing is ever overwritten
    (taken names are skipped by counting the name up). A file already holding exactly ``text``
    is taken as this message written by an interrupted earlier run, and returned instead of
    written twice.
    """
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=directory)
        except FileNotFoundError:
            continue  # ssmsend's purge() removed the empty day directory meanwhile
        break
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        number = int(name)
        while True:
            path = directory / f"{number:0{len(name)}d}"
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                try:
                    if path.read_text() == text:
                        return path
                except FileNotFoundError:
                    continue  # sent and removed meanwhile: the name is free again
                number += 1
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_directory(directory)
    return path


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_job(record: AccountingRecord, factory: FactoryConfig) -> list[Path]:
    """Write the LM's job message into apel-archive, and into apel-outgoing with a GOCDB site.

    Both files are named after the LM's end time (its UTC day, then ``HHMMSS`` + fraction).
    """
    text = job_message(record, factory)
    day, name = element_name(record.finished)
    paths = [_write_unique(factory.state_dir / ARCHIVE / day, name, text)]
    if factory.gocdb_sitename:
        paths.append(_write_unique(factory.state_dir / OUTGOING / day, name, text))
    return paths


def publish(store: Store, factory: FactoryConfig) -> int:
    """Write the APEL messages of every accounting record not written yet; return how many.

    LMs that never started consumed nothing and get no message (they stay in the local
    accounting only); they are marked written all the same. A record is marked only after its
    files exist, so a crash loses none. A rerun after a crash between the files and the mark
    rewrites nothing already in place (an identical file is recognised), except the outgoing
    copy if ssmsend sent and removed it meanwhile: then that one message is sent twice, which
    the APEL server absorbs (it keys job records by SubmitHost, LocalJobId and EndTime).

    A record whose values cannot form a message (an FQAN with a line break) is logged and
    marked, not retried.

    Raises:
        OSError: a file could not be written; this and later records stay pending.
    """
    written = 0
    for record in store.apel_pending():
        if record.started is not None:
            try:
                paths = write_job(record, factory)
            except ValueError as err:
                # Its stored values can never make a valid message: retrying cannot help, and it
                # must not hold up the others. It stays in the local accounting.
                LOG.error("apel: lm=%s: no APEL record: %s", record.name, err)
            else:
                written += 1
                LOG.debug("apel: lm=%s: wrote %s", record.name, ", ".join(map(str, paths)))
        store.set_apel_written(record.uuid)
    return written


# --- sync -----------------------------------------------------------------------------------


def default_month(now: float) -> tuple[int, int]:
    """The (year, month) containing ``now`` minus 24 hours, in UTC (Vac's default)."""
    at = datetime.fromtimestamp(now - 86400, UTC)
    return at.year, at.month


def parse_month(text: str, *, now: float) -> tuple[int, int]:
    """``YYYYMM`` -> (year, month); not after the month of ``now``.

    Raises:
        ApelError: naming the value and what was expected.
    """
    match = _MONTH_PATTERN.fullmatch(text)
    if match is None or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1970:
        raise ApelError(f"bad month {text!r}: expected YYYYMM such as 202405")
    current = datetime.fromtimestamp(now, UTC)
    if (int(match[1]), int(match[2])) > (current.year, current.month):
        raise ApelError(f"bad month {text!r}: it is in the future")
    return int(match[1]), int(match[2])


def write_sync(
    factory: FactoryConfig, months: Iterable[tuple[int, int]] = (), *, now: float | None = None
) -> list[Path]:
    """Write one sync message per (year, month) into apel-outgoing; default: :func:`default_month`.

    Raises:
        ApelError: ``factory.gocdb_sitename`` is unset, so no job messages were sent to sync.
        OSError: a file could not be written.
    """
    if not factory.gocdb_sitename:
        raise ApelError(
            "factory.gocdb_sitename is not set: no APEL records are sent, so none to sync"
        )
    moment = now if now is not None else datetime.now(UTC).timestamp()
    day, name = element_name(moment)
    wanted = list(months) or [default_month(moment)]
    paths = []
    for year, month in wanted:
        text = sync_message(factory, year, month)
        paths.append(_write_unique(factory.state_dir / OUTGOING / day, name, text))
    return paths
