"""VacMon (lmrunner.vacquery.vacmon): receivers parsed from the configuration, ended LMs' and
the factory's status sent to a UDP socket on 127.0.0.1 standing for the monitor, with a fake
clock; send_due called directly, then the thread with start/passed/ended/close."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner.config import Config
from lmrunner.errors import ConfigError
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.state import LmRecord
from lmrunner.vacquery import protocol, replies, vacmon
from lmrunner.vacquery.vacmon import MIN_PERIOD_SECONDS, VacMon, receivers
from tests.unit.test_factory import HOST, LONG, T0, Clock, Env, bare_record

SPACE = "space.example.com"
KIND = {"backend": "fake", "image": LONG, "target_share": 1, "fizzle_seconds": 600}
#: What one status send holds: a factory_status and a machinetype_status per machinetype.
STATUS = ["factory_status", "machinetype_status", "machinetype_status"]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


@pytest.fixture
def monitor() -> Iterator[socket.socket]:
    """The VacMon receiver: a UDP socket on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def hostport(sock: socket.socket) -> str:
    return f"127.0.0.1:{sock.getsockname()[1]}"


def configured(env: Env, *hostports: str, **factory: Any) -> Config:
    return env.config(
        cpus=2,
        factory={"disk_method": "none", "vacmon_hostport": list(hostports), **factory},
        machinetypes={"alpha": KIND, "beta": KIND},
    )


@pytest.fixture
def make() -> Iterator[Callable[..., VacMon]]:
    """VacMons whose thread-less store snapshots are closed after the test."""
    made: list[VacMon] = []

    def build(config: Callable[[], Config], clock: Callable[[], float]) -> VacMon:
        made.append(VacMon(config, clock))
        return made[-1]

    yield build
    for one in made:
        one.close()
        one._snapshots.close()


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    """The sending socket of send_due (the thread makes its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as made:
        yield made


def received(sock: socket.socket) -> list[dict[str, Any]]:
    """Every message waiting on the monitor, each checked as a client checks a reply."""
    sock.setblocking(False)
    got: list[dict[str, Any]] = []
    while True:
        try:
            data = sock.recv(protocol.REPLY_LIMIT)
        except BlockingIOError:
            return got
        got.append(protocol.parse_reply(data))


def receive(sock: socket.socket, count: int, seconds: float = 1.0) -> list[dict[str, Any]]:
    """``count`` messages, each within ``seconds``."""
    sock.settimeout(seconds)
    return [protocol.parse_reply(sock.recv(protocol.REPLY_LIMIT)) for _ in range(count)]


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [message["message_type"] for message in messages]


def ended(env: Env, slot: int, uuid: str, **changes: Any) -> LmRecord:
    """An LM that ran from T0 - 500 to T0 - 100 and told why it ended, in the store."""
    record = replace(
        bare_record(env, slot, uuid),
        state=LmState.FINISHED,
        created=T0 - 600,
        started=T0 - 500,
        finished=T0 - 100.7,
        cpu_seconds=200.0,
        outcome=Outcome(300, "Nothing to do", OutcomeSource.PAYLOAD),
    )
    record = replace(record, **changes)
    env.store.insert(record)
    return record


def never_started(env: Env, slot: int, uuid: str) -> LmRecord:
    return ended(
        env,
        slot,
        uuid,
        state=LmState.FAILED,
        created=T0 - 700,  # before the one that ran: not the machinetype's last
        started=None,
        outcome=Outcome(500, "cannot start", OutcomeSource.START_FAILED),
    )


# --- receivers ------------------------------------------------------------------------------


def test_receivers() -> None:
    assert receivers([]) == []
    assert receivers(["vacmon.gridpp.ac.uk:8884", "127.0.0.1:9", "x:0", "y:65536"]) == [
        ("vacmon.gridpp.ac.uk", 8884),
        ("127.0.0.1", 9),
    ]  # ports outside 1-65535 are none
    assert receivers(("a.example.com:1", "a.example.com:1")) == [("a.example.com", 1)] * 2


@pytest.mark.parametrize("entry", ["", "host", "host:", ":8884", "host:88x4", "host:-1", "h: 1"])
def test_receivers_skip_what_is_no_host_and_port(entry: str) -> None:
    assert receivers([entry, "ok.example.com:1"]) == [("ok.example.com", 1)]


def test_receivers_from_the_configuration(env: Env) -> None:
    config = configured(env, "vacmon.gridpp.ac.uk:8884", "127.0.0.1:9")
    assert receivers(config.factory.vacmon_hostport) == [
        ("vacmon.gridpp.ac.uk", 8884),
        ("127.0.0.1", 9),
    ]


# --- send_due -------------------------------------------------------------------------------


def test_only_lms_that_started_are_told_when_they_end(
    env: Env, monitor: socket.socket, sock: socket.socket, make: Callable[..., VacMon]
) -> None:
    config = configured(env, hostport(monitor))
    clock = Clock(T0)
    mon = make(lambda: config, clock)
    ran = ended(env, 0, "00000000-ran")
    failed = never_started(env, 1, "11111111-failed")
    mon.ended(failed)
    mon.ended(ran)
    mon.send_due(sock)
    got = received(monitor)
    assert kinds(got) == ["machine_status", *STATUS]
    assert (mon.sent, mon.failed) == (4, 0)

    status = got[0]
    assert status["machine"] == ran.name
    assert status["uuid"] == ran.uuid
    assert status["state"] == replies.SHUT_DOWN == "Shut down"
    assert status["shutdown_message"] == "300 Nothing to do"
    assert status["shutdown_time"] == int(T0 - 100.7)
    assert (status["created_time"], status["started_time"]) == (T0 - 600, T0 - 500)
    assert status["machinetype"] == "alpha"
    assert status["machine_model"] == "fake"
    assert status["num_machines"] == 2
    assert status["cpu_seconds"] == 200.0
    assert status["cpu_percentage"] == pytest.approx(100.0 * 200.0 / (500 - 100.7))
    for message in got:
        assert message["cookie"] == vacmon.COOKIE == "0"
        assert message["space"] == SPACE
        assert message["factory"] == HOST
        assert message["time_sent"] == T0
        assert message["daemon_version"] == protocol.daemon_version("factory")
        assert message["vacquery_version"] == protocol.VACQUERY_VERSION

    by_type = {message["machinetype"]: message for message in got[2:]}
    assert set(by_type) == {"alpha", "beta"}
    assert by_type["alpha"]["shutdown_message"] == "300 Nothing to do"
    assert by_type["alpha"]["shutdown_machine"] == ran.name
    assert got[1]["max_machines"] == 2


def test_never_started_lms_alone_send_nothing_of_theirs(
    env: Env, monitor: socket.socket, sock: socket.socket, make: Callable[..., VacMon]
) -> None:
    config = configured(env, hostport(monitor))
    mon = make(lambda: config, Clock(T0))
    for slot in range(2):
        mon.ended(never_started(env, slot, f"{slot}0000000-failed"))
    mon.ended(replace(bare_record(env, 0, "22222222-creating"), started=None))
    mon.send_due(sock)
    assert kinds(received(monitor)) == STATUS


def test_status_is_sent_at_most_every_min_period(
    env: Env, monitor: socket.socket, sock: socket.socket, make: Callable[..., VacMon]
) -> None:
    config = configured(env, hostport(monitor))
    clock = Clock(T0)
    mon = make(lambda: config, clock)
    mon.send_due(sock)
    assert kinds(received(monitor)) == STATUS

    clock.now = T0 + MIN_PERIOD_SECONDS - 0.001
    mon.send_due(sock)
    assert received(monitor) == []
    mon.ended(ended(env, 0, "00000000-ran"))
    mon.send_due(sock)  # an end is told at once, without the status
    assert kinds(received(monitor)) == ["machine_status"]

    clock.now = T0 + MIN_PERIOD_SECONDS
    mon.send_due(sock)
    assert kinds(received(monitor)) == STATUS

    clock.now = T0 + 2 * MIN_PERIOD_SECONDS - 0.001  # counted from the last status sent
    mon.send_due(sock)
    assert received(monitor) == []
    clock.now = T0 + 2 * MIN_PERIOD_SECONDS
    mon.send_due(sock)
    assert kinds(received(monitor)) == STATUS
    assert (mon.sent, mon.failed) == (3 * len(STATUS) + 1, 0)


def test_every_receiver_gets_every_message(
    env: Env, sock: socket.socket, make: Callable[..., VacMon]
) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second,
    ):
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", 0))
        config = configured(env, hostport(first), hostport(second))
        mon = make(lambda: config, Clock(T0))
        mon.ended(ended(env, 0, "00000000-ran"))
        mon.send_due(sock)
        assert kinds(received(first)) == kinds(received(second)) == ["machine_status", *STATUS]
        assert mon.sent == 2 * (1 + len(STATUS))


def test_no_receivers_sends_nothing_and_forgets_the_ended(
    env: Env, monitor: socket.socket, sock: socket.socket, make: Callable[..., VacMon]
) -> None:
    current = [configured(env)]
    mon = make(lambda: current[0], Clock(T0))
    mon.ended(ended(env, 0, "00000000-ran"))
    mon.ended(ended(env, 1, "11111111-ran"))
    mon.send_due(sock)
    assert (mon.sent, mon.failed) == (0, 0)
    assert received(monitor) == []

    current[0] = configured(env, hostport(monitor))  # a receiver configured by a reload
    mon.send_due(sock)
    assert kinds(received(monitor)) == STATUS  # the ends from before are not told


@pytest.mark.parametrize("host", ["nonexistent.invalid", "a..b"])
def test_an_unresolvable_receiver_counts_failed_and_the_next_still_gets_all(
    env: Env,
    monitor: socket.socket,
    sock: socket.socket,
    make: Callable[..., VacMon],
    host: str,
) -> None:
    config = configured(env, f"{host}:8884", hostport(monitor))
    mon = make(lambda: config, Clock(T0))
    mon.ended(ended(env, 0, "00000000-ran"))
    started = time.monotonic()
    mon.send_due(sock)
    assert kinds(received(monitor)) == ["machine_status", *STATUS]
    assert mon.failed == 1  # its first message: the others are not tried
    assert mon.sent == 1 + len(STATUS)
    mon.ended(ended(env, 1, "11111111-ran"))
    mon.send_due(sock)
    assert kinds(received(monitor)) == ["machine_status"]
    assert (mon.sent, mon.failed) == (2 + len(STATUS), 2)
    assert time.monotonic() - started < 5


def test_a_port_out_of_range_is_refused_by_the_configuration(env: Env) -> None:
    with pytest.raises(ConfigError, match=r"vacmon_hostport.*port 1-65535"):
        configured(env, "127.0.0.1:70000")


def test_a_burst_of_ends_keeps_the_latest(
    env: Env,
    monitor: socket.socket,
    sock: socket.socket,
    make: Callable[..., VacMon],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vacmon, "QUEUE", 3)
    config = configured(env, hostport(monitor))
    mon = make(lambda: config, Clock(T0))
    records = [ended(env, slot % 2, f"{slot}0000000-ran") for slot in range(5)]
    for record in records:
        mon.ended(record)
    mon.send_due(sock)
    got = received(monitor)
    assert kinds(got) == ["machine_status"] * 3 + STATUS
    assert [message["uuid"] for message in got[:3]] == [r.uuid for r in records[2:]]


def test_without_a_store_nothing_is_sent_and_the_ended_wait(
    env: Env,
    monitor: socket.socket,
    sock: socket.socket,
    make: Callable[..., VacMon],
    tmp_path: Path,
) -> None:
    record = ended(env, 0, "00000000-ran")
    good = configured(env, hostport(monitor))
    current = [configured(env, hostport(monitor), state_dir=str(tmp_path / "nowhere"))]
    mon = make(lambda: current[0], Clock(T0))
    mon.ended(record)
    mon.send_due(sock)
    assert received(monitor) == []
    assert mon.sent == 0
    current[0] = good
    mon.send_due(sock)
    got = received(monitor)
    assert kinds(got) == ["machine_status", *STATUS]
    assert got[0]["uuid"] == record.uuid


# --- the thread -----------------------------------------------------------------------------


class Watched(threading.Event):
    """VacMon's wake-up event, telling when its thread waits for the next wake-up."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_the_thread_sends_after_passes_and_ends_and_once_more_on_close(
    env: Env, monitor: socket.socket, make: Callable[..., VacMon]
) -> None:
    config = configured(env, hostport(monitor))
    clock = Clock(T0)
    mon = make(lambda: config, clock)
    due = mon._due = Watched()
    mon.start()
    assert due.waiting.wait(1.0)
    assert received(monitor) == []  # nothing before a pass

    due.waiting.clear()
    started = time.monotonic()
    mon.passed()
    assert kinds(receive(monitor, len(STATUS))) == STATUS
    assert time.monotonic() - started < 1.0

    assert due.waiting.wait(1.0)
    due.waiting.clear()
    record = ended(env, 0, "00000000-ran")
    mon.ended(record)
    (status,) = receive(monitor, 1)
    assert (status["machine"], status["state"]) == (record.name, "Shut down")
    mon.ended(never_started(env, 1, "11111111-failed"))  # wakes nobody

    assert due.waiting.wait(1.0)
    clock.now = T0 + MIN_PERIOD_SECONDS  # status due again: sent by close
    started = time.monotonic()
    mon.close()
    assert time.monotonic() - started < 1.0
    assert not mon._thread.is_alive()
    assert kinds(received(monitor)) == STATUS
    assert (mon.sent, mon.failed) == (2 * len(STATUS) + 1, 0)
    mon.close()  # twice: harmless


def test_close_without_start_returns_at_once(env: Env, make: Callable[..., VacMon]) -> None:
    config = configured(env, "127.0.0.1:9")
    mon = make(lambda: config, Clock(T0))
    started = time.monotonic()
    mon.close()
    assert time.monotonic() - started < 0.1
    assert mon.sent == 0


def test_a_failing_send_does_not_stop_the_thread(
    env: Env,
    monitor: socket.socket,
    make: Callable[..., VacMon],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = configured(env, hostport(monitor))
    clock = Clock(T0)
    mon = make(lambda: config, clock)
    real = replies.factory_status
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(replies, "factory_status", flaky)
    mon.start()
    mon.passed()
    assert until(lambda: len(calls) == 1)
    assert until(lambda: any(r.exc_info for r in caplog.records))
    clock.now = T0 + MIN_PERIOD_SECONDS
    mon.passed()
    assert kinds(receive(monitor, len(STATUS))) == STATUS


def until(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_an_end_queued_while_sending_is_sent_on_close(
    env: Env, monitor: socket.socket, make: Callable[..., VacMon], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = configured(env, hostport(monitor))
    mon = make(lambda: config, Clock(T0))
    real = replies.factory_status
    inside, release = threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inside.set()  # the ended queue was drained just before
        assert release.wait(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(replies, "factory_status", slow)
    mon.start()
    mon.passed()
    assert inside.wait(1.0)
    record = ended(env, 0, "00000000-ran")
    mon.ended(record)  # the loop's last pass ended an LM
    closer = threading.Thread(target=mon.close)
    closer.start()  # the daemon shuts down
    assert until(mon._closed.is_set)
    release.set()
    closer.join(2.0)
    assert not closer.is_alive()
    got = received(monitor)
    assert kinds(got)[: len(STATUS)] == STATUS
    assert [message["uuid"] for message in got if message["message_type"] == "machine_status"] == [
        record.uuid
    ]
