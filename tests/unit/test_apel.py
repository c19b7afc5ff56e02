"""APEL output: job and sync messages against APEL's own grammar, and the dirq file layout.

:func:`parse_apel` is a strict reading of the grammar the APEL server loads (apel/apel
``apel/db/loader/record_factory.py`` and ``apel/db/records/{record,job,sync}.py``): every message
lmrunner writes must pass it.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lmrunner import apel
from lmrunner.accounting import AccountingRecord, Flag
from lmrunner.config import FactoryConfig
from lmrunner.state import Store

# --- APEL's grammar, strictly ------------------------------------------------------------------

#: JobRecord (message v0.3): _msg_fields, _ignored_fields, _mandatory_fields and field types.
JOB_FIELDS = (
    "Site", "SubmitHost", "MachineName", "Queue", "LocalJobId", "LocalUserId", "GlobalUserName",
    "FQAN", "VO", "VOGroup", "VORole", "WallDuration", "CpuDuration", "Processors", "NodeCount",
    "StartTime", "EndTime", "InfrastructureDescription", "InfrastructureType", "MemoryReal",
    "MemoryVirtual", "ServiceLevelType", "ServiceLevel",
)  # fmt: skip
JOB_IGNORED = ("SubmitHostType", "UpdateTime")
JOB_MANDATORY = ("Site", "LocalJobId", "WallDuration", "CpuDuration", "StartTime", "EndTime")
JOB_INT = ("WallDuration", "CpuDuration", "Processors", "NodeCount", "MemoryReal", "MemoryVirtual")
JOB_FLOAT = ("ServiceLevel",)
JOB_DATETIME = ("StartTime", "EndTime")
SERVICE_LEVEL_TYPES = ("si2k", "hepspec", "hepscore23")  # not case-sensitive
#: SyncRecord (message v0.1).
SYNC_FIELDS = ("Site", "SubmitHost", "NumberOfJobs", "Month", "Year")
SYNC_MANDATORY = ("Site", "NumberOfJobs", "Month", "Year")
SYNC_INT = ("NumberOfJobs", "Month", "Year")
GRAMMAR: dict[str, dict[str, tuple[str, ...]]] = {
    "APEL-individual-job-message: v0.3": {
        "allowed": JOB_FIELDS + JOB_IGNORED,
        "mandatory": JOB_MANDATORY,
        "int": JOB_INT + JOB_DATETIME,  # times: APEL accepts seconds since the epoch
        "float": JOB_FLOAT,
    },
    "APEL-sync-message: v0.1": {
        "allowed": SYNC_FIELDS,
        "mandatory": SYNC_MANDATORY,
        "int": SYNC_INT,
        "float": (),
    },
}
NULLS = ("none", "null", "")  # record.check_for_null


class Invalid(AssertionError):
    pass


def parse_apel(text: str, *, now: float | None = None) -> tuple[str, list[dict[str, str]]]:
    """(header, records) of an APEL text message, or :class:`Invalid` naming what is wrong.

    Stricter than APEL where APEL is lax: the exact header with version; one ``Key: Value`` per
    line with nothing around it; no key twice; ``%%`` alone on its line and ending the message;
    integers and floats as plain digits.
    """
    if not text.endswith("%%\n"):
        raise Invalid("a message ends with a %% line")
    if text.startswith(("<", "{")):
        raise Invalid("not the APEL text format")
    lines = text.split("\n")[:-1]
    header = lines[0]
    if header not in GRAMMAR:
        raise Invalid(f"unknown header {header!r}")
    grammar = GRAMMAR[header]
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in lines[1:]:
        if line == "%%":
            if not current:
                raise Invalid("empty record")
            records.append(current)
            current = {}
            continue
        if "%%" in line:
            raise Invalid(f"%% inside a line: {line!r}")  # APEL splits records on any %%
        match = re.fullmatch(r"([A-Za-z]+): (\S(?:.*\S)?)", line)
        if match is None:
            raise Invalid(f"not a 'Key: Value' line: {line!r}")
        key, value = match[1], match[2]
        if key not in grammar["allowed"]:
            raise Invalid(f"unexpected field {key}")
        if key in current:
            raise Invalid(f"{key} twice")
        current[key] = value
    if current:
        raise Invalid("the last record has no %%")
    if not records:
        raise Invalid("no record")
    for record in records:
        _check_record(header, grammar, record, now if now is not None else time.time())
    return header, records


def _check_record(
    header: str, grammar: dict[str, tuple[str, ...]], record: dict[str, str], now: float
) -> None:
    for key in grammar["mandatory"]:
        if record.get(key, "").lower() in NULLS:
            raise Invalid(f"mandatory field {key} missing or null")
    for key in grammar["int"]:
        if key in record and not re.fullmatch(r"[0-9]+", record[key]):
            raise Invalid(f"{key} is not an integer: {record[key]!r}")
    for key in grammar["float"]:
        if key in record and not re.fullmatch(r"[0-9]+(\.[0-9]+)?", record[key]):
            raise Invalid(f"{key} is not a float: {record[key]!r}")
    if header.startswith("APEL-individual-job-message"):
        # JobRecord._check_factor: both or neither, and a known type.
        slt, sl = record.get("ServiceLevelType"), record.get("ServiceLevel")
        if (slt is None) != (sl is None):
            raise Invalid("ServiceLevelType and ServiceLevel go together")
        if slt is not None and slt.lower() not in SERVICE_LEVEL_TYPES:
            raise Invalid(f"ServiceLevelType {slt} not valid")
        # JobRecord._check_start_end_times.
        if int(record["EndTime"]) < int(record["StartTime"]):
            raise Invalid("EndTime is before StartTime")
        if int(record["EndTime"]) > now + 2 * 86400:
            raise Invalid("EndTime is in the future")
    else:
        if not 1 <= int(record["Month"]) <= 12:
            raise Invalid(f"Month {record['Month']}")


def test_the_parser_rejects_what_apel_rejects() -> None:
    good = (
        "APEL-individual-job-message: v0.3\nSite: S\nLocalJobId: j\nWallDuration: 1\n"
        "CpuDuration: 0\nStartTime: 10\nEndTime: 11\n%%\n"
    )
    assert parse_apel(good)[1] == [
        {
            "Site": "S",
            "LocalJobId": "j",
            "WallDuration": "1",
            "CpuDuration": "0",
            "StartTime": "10",
            "EndTime": "11",
        }
    ]
    bad = [
        good.replace("v0.3", "v0.4"),
        good.replace("Site: S\n", ""),
        good.replace("Site: S", "Site: None"),
        good.replace("WallDuration: 1", "WallDuration: 1.5"),
        good.replace("LocalJobId: j", "LocalJobId: j\nColour: red"),
        good.replace("LocalJobId: j", "LocalJobId: j\nLocalJobId: k"),
        good.replace("StartTime: 10", "StartTime: 12"),
        good.replace("%%\n", "\n%%\n"),
        good.replace("Site: S", "Site:S"),
        good[:-3],
        good.replace("EndTime: 11", "EndTime: 11\nServiceLevelType: HEPSPEC"),
        good.replace("EndTime: 11", "EndTime: 11\nServiceLevelType: bogomips\nServiceLevel: 2"),
        "APEL-sync-message: v0.1\nSite: S\nNumberOfJobs: 1\nMonth: 13\nYear: 2024\n%%\n",
    ]
    for text in bad:
        with pytest.raises(Invalid):
            parse_apel(text)


# --- fixtures ----------------------------------------------------------------------------------

END = datetime(2024, 5, 1, 12, 34, 56, tzinfo=UTC).timestamp() + 0.25


def factory(tmp_path: Path, **changes: Any) -> FactoryConfig:
    values: dict[str, Any] = {
        "space": "vac01.example.com",
        "hostname": "factory1.example.com",
        "state_dir": tmp_path / "state",
    }
    values.update(changes)
    return FactoryConfig(**values)


def record(**changes: Any) -> AccountingRecord:
    values: dict[str, Any] = {
        "uuid": "0b5a4f6e-1111-4222-8333-444455556666",
        "name": "factory1-00.example.com",
        "machinetype": "lhcb-pilot",
        "backend": "docker",
        "fqan": "/lhcb/Role=pilot",
        "vo": "lhcb",
        "processors": 2,
        "hs06": 10.5,
        "created": END - 4000,
        "started": END - 3600.4,
        "finished": END,
        "wall_seconds": 3600.4,
        "cpu_seconds": 6000.6,
        "memory_peak_bytes": 1536 * 1048576 + 1000,
        "oom_kills": 0,
        "outcome_code": 200,
        "outcome_text": "Intended work completed ok",
        "outcome_source": "payload",
        "flags": frozenset(),
        "memory_limit_bytes": 4096 * 1048576,
    }
    values.update(changes)
    return AccountingRecord(**values)


def fields_of(text: str) -> dict[str, str]:
    _, records = parse_apel(text)
    assert len(records) == 1
    return records[0]


# --- job messages --------------------------------------------------------------------------------


def test_job_message_has_vac_fields_and_measured_usage(tmp_path: Path) -> None:
    text = apel.job_message(record(), factory(tmp_path, gocdb_sitename="UKI-EXAMPLE"))
    assert text == (
        "APEL-individual-job-message: v0.3\n"
        "Site: UKI-EXAMPLE\n"
        "SubmitHost: vac01.example.com/vac-factory1.example.com\n"
        "LocalJobId: 0b5a4f6e-1111-4222-8333-444455556666\n"
        "LocalUserId: factory1.example.com\n"
        "Queue: lhcb-pilot\n"
        "GlobalUserName: /DC=com/DC=example/DC=vac01\n"
        "FQAN: /lhcb/Role=pilot\n"
        "WallDuration: 3600\n"
        "CpuDuration: 6001\n"
        "Processors: 2\n"
        "NodeCount: 1\n"
        "InfrastructureDescription: APEL-VAC\n"
        "InfrastructureType: grid\n"
        f"StartTime: {int(END - 3600.4)}\n"
        f"EndTime: {int(END)}\n"
        "MemoryReal: 1572864\n"  # the peak, in KiB (rounded down)
        "MemoryVirtual: 4194304\n"  # the allocation, in KiB (as Vac)
        "ServiceLevelType: HEPSPEC\n"
        "ServiceLevel: 10.5\n"
        "%%\n"
    )
    parse_apel(text)


def test_site_without_gocdb_is_the_domain_of_the_space(tmp_path: Path) -> None:
    assert fields_of(apel.job_message(record(), factory(tmp_path)))["Site"] == "example.com"


@pytest.mark.parametrize(
    ("wall", "cpu", "expected"),
    [
        (100.4, 50.4, ("100", "50")),
        (100.6, 50.6, ("101", "51")),
        (0.2, None, ("0", "0")),  # CPU unmeasured: 0, as APEL needs a number
        (59.5, 0.0, ("60", "0")),
    ],
)
def test_durations_are_rounded(
    tmp_path: Path, wall: float, cpu: float | None, expected: tuple[str, str]
) -> None:
    started = END - wall
    fields = fields_of(
        apel.job_message(
            record(wall_seconds=wall, cpu_seconds=cpu, started=started), factory(tmp_path)
        )
    )
    assert (fields["WallDuration"], fields["CpuDuration"]) == expected
    assert fields["StartTime"] == str(int(started))  # times are truncated, never after the end


def test_unknown_values_are_omitted(tmp_path: Path) -> None:
    unmeasured = record(
        fqan=None,
        vo=None,
        hs06=None,
        cpu_seconds=None,
        memory_peak_bytes=None,
        memory_limit_bytes=None,
        flags=frozenset({Flag.UNMEASURED}),
    )
    fields = fields_of(apel.job_message(unmeasured, factory(tmp_path)))
    assert not {"FQAN", "MemoryReal", "MemoryVirtual"} & set(fields)
    assert (fields["ServiceLevelType"], fields["ServiceLevel"]) == ("HEPSPEC", "1.0")
    assert fields["CpuDuration"] == "0"
    assert "FQAN" not in fields_of(apel.job_message(record(fqan=""), factory(tmp_path)))


def test_job_message_refuses_an_lm_that_never_started(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never started"):
        apel.job_message(record(started=None, wall_seconds=0.0), factory(tmp_path))


def test_job_message_refuses_values_that_break_lines(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FQAN"):
        apel.job_message(record(fqan="/lhcb\nSite: elsewhere"), factory(tmp_path))


def test_global_user_name_reverses_the_space() -> None:
    assert apel.global_user_name("a.b.example.org") == "/DC=org/DC=example/DC=b/DC=a"


# --- names and files ----------------------------------------------------------------------------

DIRQ_DIRECTORY = re.compile(r"[0-9a-f]{8}")  # python-dirq QueueBase _DirectoryRegexp
DIRQ_ELEMENT = re.compile(r"[0-9a-f]{14}")  # python-dirq QueueBase _ElementRegexp


def test_element_name_is_the_utc_day_and_time_with_eight_fraction_digits() -> None:
    assert apel.element_name(END) == ("20240501", "12345625000000")
    at = datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp() + 0.5
    assert apel.element_name(at) == ("20241231", "23595950000000")
    # A fraction that rounds up to a whole second still gets 8 digits, in the same second.
    assert apel.element_name(math.nextafter(1.0, 0.0)) == ("19700101", "00000099999999")


def queue_files(root: Path) -> list[Path]:
    """Every file under an apel directory, asserting the whole tree is a valid dirq queue."""
    files = []
    for day in sorted(root.iterdir()):
        assert DIRQ_DIRECTORY.fullmatch(day.name), day
        for path in sorted(day.iterdir()):
            assert DIRQ_ELEMENT.fullmatch(path.name), path  # no temporary file is left behind
            files.append(path)
    return files


def add(store: Store, *records: AccountingRecord) -> None:
    for one in records:
        assert store.add_accounting(one)


def test_publish_writes_archive_only_without_gocdb_sitename(tmp_path: Path) -> None:
    config = factory(tmp_path)
    store = Store(config.state_dir)
    add(store, record())
    assert apel.publish(store, config) == 1
    [path] = queue_files(config.state_dir / apel.ARCHIVE)
    assert path.relative_to(config.state_dir / apel.ARCHIVE) == Path("20240501/12345625000000")
    assert fields_of(path.read_text())["LocalJobId"] == record().uuid
    assert not (config.state_dir / apel.OUTGOING).exists()
    assert store.apel_pending() == []
    assert apel.publish(store, config) == 0  # written once only
    store.close()


def test_publish_writes_outgoing_too_with_gocdb_sitename(tmp_path: Path) -> None:
    config = factory(tmp_path, gocdb_sitename="UKI-EXAMPLE")
    store = Store(config.state_dir)
    add(store, record(), record(uuid="u-2", finished=END + 86400))
    assert apel.publish(store, config) == 2
    archived = queue_files(config.state_dir / apel.ARCHIVE)
    outgoing = queue_files(config.state_dir / apel.OUTGOING)
    assert [p.relative_to(config.state_dir / apel.ARCHIVE) for p in archived] == [
        p.relative_to(config.state_dir / apel.OUTGOING) for p in outgoing
    ]
    assert [p.parent.name for p in outgoing] == ["20240501", "20240502"]
    assert [p.read_text() for p in archived] == [p.read_text() for p in outgoing]
    for path in outgoing:
        assert path.stat().st_mode & 0o777 == 0o644
        parse_apel(path.read_text())
    store.close()


def test_lms_that_never_started_get_no_message_but_are_done(tmp_path: Path) -> None:
    config = factory(tmp_path, gocdb_sitename="UKI-EXAMPLE")
    store = Store(config.state_dir)
    failed = record(uuid="u-failed", started=None, wall_seconds=0.0, flags=frozenset({Flag.FAILED}))
    add(store, failed, record())
    assert apel.publish(store, config) == 1
    assert len(queue_files(config.state_dir / apel.ARCHIVE)) == 1
    assert store.apel_pending() == []
    assert [r.uuid for r in store.accounting()] == ["u-failed", record().uuid]  # still local
    store.close()


def test_names_are_unique_and_nothing_is_overwritten(tmp_path: Path) -> None:
    config = factory(tmp_path)
    day = config.state_dir / apel.ARCHIVE / "20240501"
    day.mkdir(parents=True)
    (day / "12345625000000").write_text("someone else's\n")
    first = apel.write_job(record(uuid="u-1"), config)
    second = apel.write_job(record(uuid="u-2"), config)  # the same end time
    assert [p.name for p in first + second] == ["12345625000001", "12345625000002"]
    assert (day / "12345625000000").read_text() == "someone else's\n"
    assert len(queue_files(config.state_dir / apel.ARCHIVE)) == 3


def test_rewriting_the_same_message_is_recognised(tmp_path: Path) -> None:
    # A crash after the files were written but before the record was marked.
    config = factory(tmp_path, gocdb_sitename="UKI-EXAMPLE")
    store = Store(config.state_dir)
    add(store, record())
    first = apel.write_job(record(), config)
    assert apel.publish(store, config) == 1
    assert queue_files(config.state_dir / apel.ARCHIVE) == first[:1]
    assert queue_files(config.state_dir / apel.OUTGOING) == first[1:]
    store.close()


def test_a_day_directory_removed_by_ssmsend_purge_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = factory(tmp_path)
    real = tempfile.mkstemp
    calls: list[Path] = []

    def purged_once(prefix: str, suffix: str, dir: Path) -> tuple[int, str]:
        calls.append(dir)
        if len(calls) == 1:
            dir.rmdir()  # as dirq's purge() would, between our mkdir and our write
        return real(prefix=prefix, suffix=suffix, dir=dir)

    monkeypatch.setattr(tempfile, "mkstemp", purged_once)
    [path] = apel.write_job(record(), config)
    assert len(calls) == 2
    assert fields_of(path.read_text())["LocalJobId"] == record().uuid


def test_a_record_that_cannot_form_a_message_does_not_block_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = factory(tmp_path)
    store = Store(config.state_dir)
    add(store, record(uuid="u-bad", fqan="/lhcb\nSite: x", finished=END - 1), record())
    assert apel.publish(store, config) == 1
    [path] = queue_files(config.state_dir / apel.ARCHIVE)
    assert fields_of(path.read_text())["LocalJobId"] == record().uuid
    assert store.apel_pending() == []
    assert "no APEL record" in caplog.text
    store.close()


def test_a_failed_write_leaves_the_record_pending(tmp_path: Path) -> None:
    config = factory(tmp_path)
    store = Store(config.state_dir)
    add(store, record())
    (config.state_dir / apel.ARCHIVE).write_text("not a directory")
    with pytest.raises(OSError):
        apel.publish(store, config)
    assert [r.uuid for r in store.apel_pending()] == [record().uuid]
    store.close()


# --- sync messages -------------------------------------------------------------------------------


def archive(config: FactoryConfig, *records: AccountingRecord) -> None:
    for one in records:
        apel.write_job(one, config)


def test_sync_counts_the_archived_messages_of_the_month(tmp_path: Path) -> None:
    config = factory(tmp_path, gocdb_sitename="UKI-EXAMPLE")
    may = [record(uuid=f"may-{n}", finished=END + n * 86400) for n in range(3)]  # 1st to 3rd
    april = record(uuid="april", finished=END - 2 * 86400)
    june = record(uuid="june", finished=END + 31 * 86400)
    archive(config, *may, april, june)
    archive(factory(tmp_path), record(uuid="before-gocdb"))  # another Site: never sent
    (config.state_dir / apel.ARCHIVE / "20240501" / "README").write_text("not a message")
    text = apel.sync_message(config, 2024, 5)
    header, [fields] = parse_apel(text)
    assert header == apel.SYNC_HEADER
    assert fields == {
        "Site": "UKI-EXAMPLE",
        "SubmitHost": "vac01.example.com/vac-factory1.example.com",
        "NumberOfJobs": "3",
        "Month": "5",
        "Year": "2024",
    }
    assert fields_of(apel.sync_message(config, 2024, 4))["NumberOfJobs"] == "1"
    assert fields_of(apel.sync_message(config, 2023, 5))["NumberOfJobs"] == "0"


def test_write_sync_puts_one_message_per_month_into_outgoing(tmp_path: Path) -> None:
    config = factory(tmp_path, gocdb_sitename="UKI-EXAMPLE")
    archive(config, record())
    now = datetime(2024, 6, 2, 8, 0, 0, tzinfo=UTC).timestamp()
    paths = apel.write_sync(config, [(2024, 5), (2024, 4)], now=now)
    assert [p.parent.name for p in paths] == ["20240602", "20240602"]
    assert len(set(paths)) == 2
    assert [fields_of(p.read_text())["Month"] for p in paths] == ["5", "4"]
    assert fields_of(paths[0].read_text())["NumberOfJobs"] == "1"
    outgoing = queue_files(config.state_dir / apel.OUTGOING)
    assert set(paths) <= set(outgoing)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2024, 3, 1, 10, 0, tzinfo=UTC), (2024, 2)),  # early on the 1st: last month
        (datetime(2024, 3, 2, 0, 0, 1, tzinfo=UTC), (2024, 3)),
        (datetime(2024, 1, 1, 12, 0, tzinfo=UTC), (2023, 12)),
    ],
)
def test_the_default_month_is_the_one_24_hours_ago(
    tmp_path: Path, now: datetime, expected: tuple[int, int]
) -> None:
    assert apel.default_month(now.timestamp()) == expected
    config = factory(tmp_path, gocdb_sitename="UKI-EXAMPLE")
    [path] = apel.write_sync(config, now=now.timestamp())
    fields = fields_of(path.read_text())
    assert (int(fields["Year"]), int(fields["Month"])) == expected


def test_write_sync_needs_a_gocdb_site(tmp_path: Path) -> None:
    with pytest.raises(apel.ApelError, match="gocdb_sitename"):
        apel.write_sync(factory(tmp_path), [(2024, 5)])


def test_parse_month() -> None:
    now = datetime(2024, 6, 2, tzinfo=UTC).timestamp()
    assert apel.parse_month("202405", now=now) == (2024, 5)
    assert apel.parse_month("202406", now=now) == (2024, 6)
    for bad in ("2024-05", "202413", "202400", "24005", "2024055", "may", "196912"):
        with pytest.raises(apel.ApelError, match=re.escape(repr(bad))):
            apel.parse_month(bad, now=now)
    with pytest.raises(apel.ApelError, match="future"):
        apel.parse_month("202407", now=now)


def test_every_flagged_record_still_parses(tmp_path: Path) -> None:
    config = factory(tmp_path, gocdb_sitename="UKI-EXAMPLE")
    base = record()
    variants = [
        replace(base, flags=frozenset({Flag.SHORT}), wall_seconds=3.0, started=END - 3.0),
        replace(base, flags=frozenset({Flag.OOM}), oom_kills=2, memory_peak_bytes=4096 << 20),
        replace(base, processors=8, hs06=None, memory_peak_bytes=0),
        replace(base, wall_seconds=0.0, started=END, cpu_seconds=0.0),
    ]
    for variant in variants:
        parse_apel(apel.job_message(variant, config))
