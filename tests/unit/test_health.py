"""The daemon's heartbeat file (written rate-limited, read tolerantly) and ``lmrunner health``'s
Nagios verdict: each rule, the worst first, the performance data's format (Nagios plugin
guidelines: ``'label'=value[UOM];[warn];[crit];[min];[max]``) and the exit codes of the CLI."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmrunner import health
from lmrunner import loader as config_mod
from lmrunner.cli import main
from lmrunner.health import (
    CRITICAL,
    HEARTBEAT,
    HEARTBEAT_SECONDS,
    OK,
    STALE_SECONDS,
    UNKNOWN,
    WARNING,
    Heartbeat,
    HeartbeatWriter,
    Verdict,
    judge,
    read_heartbeat,
)
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.model import Limits
from lmrunner.state import LmRecord, Store
from tests.unit.test_factory import T0, Clock

PID = 4242
NOW = float(T0)
#: One item of performance data (Nagios plugin guidelines): a label without '=' (quoted when it
#: has spaces), a number with an optional unit of measure, then up to four ';'-separated fields
#: (warn, crit: a number or a range such as 10: ~:5 @1:2; min, max: numbers).
PERFDATA = re.compile(
    r"^(?:'[^'=]+'|[^'= ]+)=-?[0-9]+(?:\.[0-9]+)?(?:s|ms|us|%|B|KB|MB|TB|c)?"
    r"(?:;(?:@?(?:~|-?[0-9.]+)?:?(?:-?[0-9.]+)?)?){0,2}(?:;(?:-?[0-9.]+)?){0,2}$"
)


def beat(age: float = 12.0, **fields: Any) -> Heartbeat:
    return Heartbeat(time=NOW - age, pid=PID, **fields)


def verdict(
    heartbeat: Heartbeat | None,
    *,
    free_share: float | None = 0.5,
    alive: bool = True,
    lms: int = 3,
    used: int = 2,
    total: int = 4,
) -> Verdict:
    return judge(
        heartbeat,
        now=NOW,
        lms=lms,
        processors_used=used,
        processors_total=total,
        free_share=free_share,
        alive=lambda pid: alive,
    )


def perf(result: Verdict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in result.perfdata.split(" "))


# --- judge ----------------------------------------------------------------------------------


def test_all_well_is_ok_with_the_summary_and_the_pass_age() -> None:
    result = verdict(beat(age=12.4))
    assert result.code == OK
    assert result.text == "3 LMs on 2 of 4 processors, last pass 12 s ago"
    assert result.perfdata == (
        "lms=3 processors=2;;;0;4 pass_age=12s;150;300 state_dir_free=50.0%;10:;3:"
    )
    assert result.line() == f"LMRUNNER OK - {result.text} | {result.perfdata}"


def test_no_heartbeat_is_critical() -> None:
    result = verdict(None, free_share=None)
    assert result.code == CRITICAL
    assert result.text == (
        "no daemon heartbeat (is lmrunner daemon running?); 3 LMs on 2 of 4 processors"
    )
    assert result.perfdata == "lms=3 processors=2;;;0;4"  # no pass age without a heartbeat
    assert result.line().startswith("LMRUNNER CRITICAL - no daemon heartbeat")


def test_a_dead_daemon_is_critical_through_the_alive_hook() -> None:
    asked: list[int] = []

    def alive(pid: int) -> bool:
        asked.append(pid)
        return False

    result = judge(
        beat(), now=NOW, lms=0, processors_used=0, processors_total=4, free_share=0.5, alive=alive
    )
    assert asked == [PID]
    assert result.code == CRITICAL
    assert result.text.startswith(f"the daemon (pid {PID}) is not running; ")


def test_a_dead_daemon_is_not_also_called_stale() -> None:
    result = verdict(beat(age=STALE_SECONDS + 100), alive=False)
    assert result.code == CRITICAL
    assert "is not running" in result.text
    assert "has not passed" not in result.text


def test_the_real_alive_check() -> None:
    assert health._alive(os.getpid())
    assert health._alive(1)  # another user's process (or ours as root): alive either way
    assert not health._alive(2**22 + 12345)  # above pid_max: no such process


@pytest.mark.parametrize(
    ("age", "code"),
    [(0.0, OK), (STALE_SECONDS / 2, OK), (STALE_SECONDS / 2 + 1, WARNING),
     (STALE_SECONDS, WARNING), (STALE_SECONDS + 1, CRITICAL)],
)  # fmt: skip
def test_a_stale_heartbeat_is_critical(age: float, code: int) -> None:
    """Late by half the limit: WARNING (as its perfdata's warning threshold says); beyond it:
    CRITICAL."""
    result = verdict(beat(age=age))
    assert result.code == code
    if code == CRITICAL:
        assert result.text.startswith(f"the daemon has not passed for {age:.0f} s; ")
    if code == WARNING:
        assert result.text.startswith(f"the daemon's last pass was {age:.0f} s ago; ")
    assert perf(result)["pass_age"] == f"{age:.0f}s;150;300"


def test_a_heartbeat_from_the_future_has_age_0() -> None:
    result = verdict(beat(age=-50))
    assert result.code == OK
    assert perf(result)["pass_age"] == "0s;150;300"
    assert result.text.endswith("last pass 0 s ago")


def test_a_state_directory_problem_is_critical() -> None:
    result = verdict(beat(state_dir_problem="the state directory is full"))
    assert result.code == CRITICAL
    assert result.text == "no LM starts: the state directory is full; 3 LMs on 2 of 4 processors"


def test_unavailable_engines_warn_in_backend_order() -> None:
    result = verdict(beat(unavailable={"podman": "gone", "docker": "cannot connect"}))
    assert result.code == WARNING
    assert result.text == (
        "backend docker unavailable: cannot connect; backend podman unavailable: gone; "
        "3 LMs on 2 of 4 processors"
    )


def test_a_long_reason_is_cut_to_200_characters() -> None:
    result = verdict(beat(unavailable={"docker": "x" * 1000}, silent=["f" * 300]))
    first, second, _summary = result.text.split("; ")
    assert len(first) == 200
    assert first.startswith("backend docker unavailable: xxx")
    assert len(second) == 200
    assert second.startswith("no answer from fff")


def test_silent_factories_warn() -> None:
    result = verdict(beat(silent=["a.example.com", "b.example.com"]))
    assert result.code == WARNING
    assert result.text.startswith("no answer from a.example.com, b.example.com; ")


@pytest.mark.parametrize(
    ("share", "code", "shown"),
    [
        (1.0, OK, "100.0%"),
        (0.10, OK, "10.0%"),
        (0.0999, WARNING, "10.0%"),
        (0.05, WARNING, "5.0%"),
        (0.03, WARNING, "3.0%"),
        (0.0299, CRITICAL, "3.0%"),
        (0.0, CRITICAL, "0.0%"),
    ],
)
def test_free_share_thresholds(share: float, code: int, shown: str) -> None:
    result = verdict(beat(), free_share=share)
    assert result.code == code
    assert perf(result)["state_dir_free"].startswith(f"{shown};")
    if code != OK:
        assert result.text.startswith(f"state directory {shown} free; ")


def test_unknown_free_share_adds_no_perfdata() -> None:
    result = verdict(beat(), free_share=None)
    assert result.code == OK
    assert "state_dir_free" not in perf(result)


def test_the_worst_comes_first() -> None:
    result = verdict(
        beat(
            unavailable={"docker": "cannot connect"},
            silent=["a.example.com"],
            state_dir_problem="read-only filesystem",
        ),
        free_share=0.02,
    )
    assert result.code == CRITICAL
    assert result.text.split("; ") == [
        "no LM starts: read-only filesystem",
        "state directory 2.0% free",
        "backend docker unavailable: cannot connect",
        "no answer from a.example.com",
        "3 LMs on 2 of 4 processors",
    ]


def test_a_warning_comes_before_nothing_and_ok_summary_is_last() -> None:
    result = verdict(beat(silent=["a"]), free_share=0.05)
    assert result.code == WARNING
    assert result.text == "no answer from a; state directory 5.0% free; 3 LMs on 2 of 4 processors"


@pytest.mark.parametrize(
    "heartbeat",
    [None, beat(), beat(age=1000, unavailable={"d": "x"}, state_dir_problem="full")],
)
@pytest.mark.parametrize("free_share", [None, 0.5, 0.05, 0.0])
def test_every_perfdata_item_follows_the_plugin_guidelines(
    heartbeat: Heartbeat | None, free_share: float | None
) -> None:
    result = verdict(heartbeat, free_share=free_share, lms=0, used=0, total=0)
    items = result.perfdata.split(" ")
    assert items[:2] == ["lms=0", "processors=0;;;0;0"]
    for item in items:
        assert PERFDATA.match(item), item
    labels = [item.split("=", 1)[0] for item in items]
    assert len(labels) == len(set(labels))
    line = result.line()
    assert line.count(" | ") == 1
    assert "\n" not in line


def test_free_space_thresholds_are_ranges_alerting_below() -> None:
    result = verdict(beat(), free_share=0.5)
    assert perf(result)["state_dir_free"] == "50.0%;10:;3:"


@pytest.mark.parametrize("reason", ["cannot connect\nsee the log", "exit 1 | tee: broken"])
def test_the_verdict_is_one_line_whatever_the_engine_said(reason: str) -> None:
    result = verdict(beat(unavailable={"docker": reason}))
    line = result.line()
    assert "\n" not in line
    assert line.count("|") == 1
    assert line.endswith(f"| {result.perfdata}")


def test_verdict_line_without_perfdata() -> None:
    assert Verdict(UNKNOWN, "no config").line() == "LMRUNNER UNKNOWN - no config"
    assert Verdict(WARNING, "w", "a=1").line() == "LMRUNNER WARNING - w | a=1"
    assert (OK, WARNING, CRITICAL, UNKNOWN) == (0, 1, 2, 3)


# --- the heartbeat file -----------------------------------------------------------------------


def test_heartbeat_json_round_trip(tmp_path: Path) -> None:
    beat_ = Heartbeat(NOW, 77, {"docker": "down"}, "full", ["a", "b"])
    (tmp_path / HEARTBEAT).write_text(beat_.to_json())
    assert read_heartbeat(tmp_path) == beat_
    data = json.loads(beat_.to_json())
    assert data == {
        "time": NOW,
        "pid": 77,
        "unavailable": {"docker": "down"},
        "state_dir_problem": "full",
        "silent": ["a", "b"],
    }


def test_optional_fields_may_be_missing_or_null(tmp_path: Path) -> None:
    (tmp_path / HEARTBEAT).write_text(
        json.dumps({"time": 5, "pid": "12", "unavailable": None, "silent": None})
    )
    assert read_heartbeat(tmp_path) == Heartbeat(5.0, 12, {}, None, [])


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b"{}",
        b'{"time": 1}',
        b'{"pid": 1}',
        b'{"time": "yesterday", "pid": 1}',
        b'{"time": 1, "pid": "me"}',
        b'{"time": 1, "pid": null}',
        b'{"time": 1, "pid": 1, "unavailable": [1, 2]}',
        b'{"time": 1, "pid": 1, "silent": 5}',
        b'"a string"',
        b'{"time": 1, "pid": 1',  # cut short
    ],
)
def test_a_garbled_heartbeat_is_none(tmp_path: Path, content: bytes) -> None:
    (tmp_path / HEARTBEAT).write_bytes(content)
    assert read_heartbeat(tmp_path) is None


def test_a_missing_heartbeat_is_none(tmp_path: Path) -> None:
    assert read_heartbeat(tmp_path) is None
    assert read_heartbeat(tmp_path / "no-such-dir") is None


def test_a_directory_in_place_of_the_heartbeat_is_none(tmp_path: Path) -> None:
    (tmp_path / HEARTBEAT).mkdir()
    assert read_heartbeat(tmp_path) is None


def test_a_huge_heartbeat_is_read_bounded_and_is_none(tmp_path: Path) -> None:
    valid_but_huge = {"time": 1, "pid": 1, "silent": ["x" * health.MAX_HEARTBEAT_BYTES]}
    (tmp_path / HEARTBEAT).write_text(json.dumps(valid_but_huge))
    assert read_heartbeat(tmp_path) is None
    with (tmp_path / HEARTBEAT).open("wb") as handle:
        handle.write(b"{" + b" " * (8 << 20))  # 8 MiB of nothing
    began = time.monotonic()
    assert read_heartbeat(tmp_path) is None
    assert time.monotonic() - began < 2.0


def test_a_heartbeat_with_a_nan_time_is_not_ok(tmp_path: Path) -> None:
    (tmp_path / HEARTBEAT).write_text(f'{{"time": NaN, "pid": {os.getpid()}}}')
    result = judge(
        read_heartbeat(tmp_path),
        now=time.time(),
        lms=0,
        processors_used=0,
        processors_total=2,
        free_share=0.5,
    )
    assert result.code != OK


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


def written(tmp_path: Path) -> Heartbeat:
    got = read_heartbeat(tmp_path)
    assert got is not None
    return got


def test_the_writer_writes_at_once_then_at_most_every_heartbeat_seconds(
    tmp_path: Path, clock: Clock
) -> None:
    writer = HeartbeatWriter(tmp_path, clock=clock)
    assert writer.path == tmp_path / HEARTBEAT
    writer.beat({}, None, ())
    assert written(tmp_path) == Heartbeat(NOW, os.getpid(), {}, None, [])
    for offset in (1.0, 5.0, HEARTBEAT_SECONDS - 0.01):
        clock.now = NOW + offset
        writer.beat({}, None, ())
        assert written(tmp_path).time == NOW
    clock.now = NOW + HEARTBEAT_SECONDS
    writer.beat({}, None, ())
    assert written(tmp_path).time == NOW + HEARTBEAT_SECONDS
    clock.now = NOW + HEARTBEAT_SECONDS + 3
    writer.beat({}, None, ())
    assert written(tmp_path).time == NOW + HEARTBEAT_SECONDS


@pytest.mark.parametrize(
    ("unavailable", "problem", "silent"),
    [
        ({"docker": "cannot connect"}, None, ()),
        ({}, "the state directory is full", ()),
        ({}, None, ("a.example.com",)),
    ],
)
def test_a_change_is_written_at_once(
    tmp_path: Path,
    clock: Clock,
    unavailable: dict[str, str],
    problem: str | None,
    silent: tuple[str, ...],
) -> None:
    writer = HeartbeatWriter(tmp_path, clock=clock)
    writer.beat({}, None, ())
    clock.now = NOW + 1
    writer.beat(unavailable, problem, silent)
    assert written(tmp_path) == Heartbeat(NOW + 1, os.getpid(), unavailable, problem, list(silent))
    clock.now = NOW + 2
    writer.beat({}, None, ())  # and back again
    assert written(tmp_path) == Heartbeat(NOW + 2, os.getpid(), {}, None, [])


def test_the_order_of_unavailable_backends_is_no_change(tmp_path: Path, clock: Clock) -> None:
    writer = HeartbeatWriter(tmp_path, clock=clock)
    writer.beat({"a": "x", "b": "y"}, None, ())
    clock.now = NOW + 1
    writer.beat({"b": "y", "a": "x"}, None, [])
    assert written(tmp_path).time == NOW


def test_a_failed_write_is_retried_at_the_next_beat(tmp_path: Path, clock: Clock) -> None:
    state_dir = tmp_path / "not-yet"
    writer = HeartbeatWriter(state_dir, clock=clock)
    writer.beat({}, None, ())  # no directory: nothing written, nothing raised
    assert read_heartbeat(state_dir) is None
    state_dir.mkdir()
    clock.now = NOW + 1  # within HEARTBEAT_SECONDS, same content: still written
    writer.beat({}, None, ())
    assert written(state_dir).time == NOW + 1


def test_the_writer_leaves_no_temporary_files(tmp_path: Path, clock: Clock) -> None:
    writer = HeartbeatWriter(tmp_path, clock=clock)
    for offset in range(0, 100, 5):
        clock.now = NOW + offset
        writer.beat({"x": str(offset)}, None, ())
    assert [p.name for p in tmp_path.iterdir()] == [HEARTBEAT]


# --- lmrunner health ------------------------------------------------------------------------

CONFIG = """\
factory:
  space: space.example.com
  hostname: factory.example.com
  state_dir: {state}
  total_processors: 2
  disk_method: none
machinetypes:
  alpha:
    backend: fake
    image: "fake:seconds=3600"
    target_share: 1
"""
LIMITS = Limits(processors=1, memory_bytes=1 << 30, swap_bytes=0, disk_bytes=10**9, hs06=None)


class Statvfs:
    """What os.statvfs answers for the state directory in these tests."""

    def __init__(self, free: int, blocks: int) -> None:
        self.f_bavail = free
        self.f_blocks = blocks
        self.f_frsize = 4096


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state directory with a store, its filesystem 50 % free; the config at tmp/lmrunner.yaml."""
    monkeypatch.delenv("LMRUNNER_CONFIG", raising=False)
    monkeypatch.setattr("socket.getfqdn", lambda: "factory.example.com")
    monkeypatch.setattr(config_mod, "usable_cpus", lambda: 2)
    state_dir = tmp_path / "state"
    (tmp_path / "lmrunner.yaml").write_text(CONFIG.format(state=state_dir))
    Store(state_dir).close()
    free_share(monkeypatch, state_dir, 0.5)
    yield state_dir


def free_share(monkeypatch: pytest.MonkeyPatch, state_dir: Path, share: float) -> None:
    real = os.statvfs

    def statvfs(path: Any) -> Any:
        if Path(path) == state_dir:
            return Statvfs(int(share * 1000), 1000)
        return real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)


def write_beat(state_dir: Path, **fields: Any) -> None:
    (state_dir / HEARTBEAT).write_text(Heartbeat(time.time(), os.getpid(), **fields).to_json())


def run_health(
    capsys: pytest.CaptureFixture[str], config: Path, *extra: str
) -> tuple[int, list[str]]:
    code = main(["health", "--config", str(config), *extra])
    out, err = capsys.readouterr()
    assert err == ""
    return code, out.splitlines()


def record(state_dir: Path, slot: int, uuid: str, state: LmState, processors: int) -> LmRecord:
    return LmRecord(
        uuid=uuid,
        name=f"factory-{slot:02d}.example.com",
        machinetype="alpha",
        backend="fake",
        slot=slot,
        processors=processors,
        limits=LIMITS,
        hs06=1.0,
        shutdown_time=T0 + 86400,
        directory=state_dir / "machines" / uuid,
        created=NOW,
        state=state,
        outcome=None if state is LmState.RUNNING else Outcome(200, "done", OutcomeSource.PAYLOAD),
        finished=None if state is LmState.RUNNING else NOW + 5,
    )


def test_health_ok_exits_0(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(state)
    try:
        store.insert_many(
            [
                record(state, 0, "u0", LmState.RUNNING, 2),
                record(state, 1, "u1", LmState.FINISHED, 1),  # ended: not counted
            ]
        )
    finally:
        store.close()
    write_beat(state)
    code, lines = run_health(capsys, state.parent / "lmrunner.yaml")
    assert code == 0
    assert len(lines) == 1
    assert lines[0].startswith("LMRUNNER OK - 1 LMs on 2 of 2 processors, last pass ")
    assert lines[0].endswith(
        " | lms=1 processors=2;;;0;2 pass_age=0s;150;300 state_dir_free=50.0%;10:;3:"
    )


def test_health_warning_exits_1(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_beat(state, unavailable={"docker": "cannot connect"})
    code, lines = run_health(capsys, state.parent / "lmrunner.yaml")
    assert code == 1
    assert lines == [
        "LMRUNNER WARNING - backend docker unavailable: cannot connect; 0 LMs on 0 of 2 "
        "processors | lms=0 processors=0;;;0;2 pass_age=0s;150;300 state_dir_free=50.0%;10:;3:"
    ]


def test_health_without_a_heartbeat_exits_2(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = run_health(capsys, state.parent / "lmrunner.yaml")
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith("LMRUNNER CRITICAL - no daemon heartbeat")


def test_health_with_a_full_disk_exits_2(
    state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_beat(state)
    free_share(monkeypatch, state, 0.01)
    code, lines = run_health(capsys, state.parent / "lmrunner.yaml")
    assert code == 2
    assert lines[0].startswith("LMRUNNER CRITICAL - state directory 1.0% free; ")


def test_health_of_a_stale_heartbeat_exits_2(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (state / HEARTBEAT).write_text(Heartbeat(time.time() - 3600, os.getpid()).to_json())
    code, lines = run_health(capsys, state.parent / "lmrunner.yaml")
    assert code == 2
    assert lines[0].startswith("LMRUNNER CRITICAL - the daemon has not passed for 3600 s; ")


def test_health_reads_the_state_dir_option(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    Store(other).close()
    write_beat(other, silent=["b.example.com"])
    code, lines = run_health(capsys, state.parent / "lmrunner.yaml", "--state-dir", str(other))
    assert code == 1
    assert "no answer from b.example.com" in lines[0]


@pytest.mark.parametrize(
    "config_text",
    [
        "factory: [this is not\n",
        "factory:\n  total_processors: many\n",
        "machinetypes: {}\nnonsense_key: 1\n",
    ],
)
def test_health_exits_3_when_the_config_cannot_be_loaded(
    state: Path, capsys: pytest.CaptureFixture[str], config_text: str
) -> None:
    write_beat(state)
    bad = state.parent / "bad.yaml"
    bad.write_text(config_text)
    code, lines = run_health(capsys, bad)
    assert code == 3
    assert len(lines) == 1
    assert lines[0].startswith("LMRUNNER UNKNOWN - ")


def test_health_exits_3_without_a_config_file(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = run_health(capsys, state.parent / "missing.yaml")
    assert code == 3
    assert len(lines) == 1
    assert lines[0].startswith("LMRUNNER UNKNOWN - ")


def test_health_without_a_store_judges_the_heartbeat(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No store it can read (no daemon ever ran, or NRPE lacks the rights to its WAL): the
    heartbeat decides (none here: CRITICAL), the LMs are unknown, and no store is made."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code, lines = run_health(capsys, state.parent / "lmrunner.yaml", "--state-dir", str(empty))
    assert code == 2
    assert lines[0].startswith("LMRUNNER CRITICAL - no daemon heartbeat")
    assert "LMs unknown" in lines[0]
    assert not (empty / "lmrunner.db").exists()  # the check made no store
