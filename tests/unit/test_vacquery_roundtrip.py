"""A real Responder on 127.0.0.1 (ephemeral port) over a real Store, asked by client.query; fake
factories (plain UDP sockets) that stay silent or answer wrongly; the responder's rate limit."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner.config import Config
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.payload import lm_name
from lmrunner.state import LmRecord
from lmrunner.vacquery import client, protocol, replies, responder, snapshot
from lmrunner.vacquery.client import Answers
from lmrunner.vacquery.responder import Responder
from tests.unit.test_factory import LONG, Env, bare_record

#: The responder names itself by factory.hostname; an IP literal lets the client reach it.
FACTORY = "127.0.0.1"
#: A second loopback address (Linux answers on all of 127/8): a factory at the same port.
OTHER = "127.0.0.2"
SPACE = "space.example.com"
TIMEOUT = 1.0
DEADLINE = 1.5
SLACK = 0.5


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


@pytest.fixture
def config(env: Env) -> Config:
    kind = {"backend": "fake", "image": LONG, "target_share": 1, "fizzle_seconds": 600}
    return env.config(
        cpus=3,
        factory={"hostname": FACTORY},
        machinetypes={"alpha": {**kind, "accounting_fqan": "/lhcb/Role=pilot"}, "beta": kind},
    )


def lm(env: Env, slot: int, machinetype: str, uuid: str, **changes: Any) -> LmRecord:
    return replace(
        bare_record(env, slot, uuid),
        name=lm_name(FACTORY, slot),
        machinetype=machinetype,
        **changes,
    )


@pytest.fixture
def lms(env: Env, config: Config) -> list[LmRecord]:
    """Slot 0: a running alpha LM; 1: a beta LM being created; 2: empty; and an ended alpha."""
    now = time.time()
    records = [
        lm(
            env,
            0,
            "alpha",
            "00000000-running",
            state=LmState.RUNNING,
            created=now - 200,
            started=now - 100,
            cpu_seconds=20.0,
        ),
        lm(env, 1, "beta", "11111111-creating", created=now - 5),
        lm(
            env,
            2,
            "alpha",
            "22222222-finished",
            state=LmState.FINISHED,
            created=now - 900,
            started=now - 890,
            finished=now - 300,
            outcome=Outcome(300, "Nothing to do", OutcomeSource.PAYLOAD),
        ),
    ]
    env.store.insert_many(records)
    return records


@pytest.fixture
def running(config: Config, lms: list[LmRecord]) -> Iterator[Responder]:
    made = Responder(lambda: config, host=FACTORY, port=0).start()
    yield made
    made.close()


@pytest.fixture
def udp() -> Iterator[Callable[[str], socket.socket]]:
    """Plain UDP sockets bound to a loopback address (port 0 unless given), all closed after."""
    made: list[socket.socket] = []

    def bind(host: str, port: int = 0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        made.append(sock)
        try:
            sock.bind((host, port))
        except OSError as err:
            pytest.skip(f"cannot bind {host}:{port}: {err}")
        return sock

    yield bind
    for sock in made:
        sock.close()


def ask(kind: str, port: int, names: list[str] | None = None, **options: Any) -> Answers:
    settings: dict[str, Any] = {"timeout": TIMEOUT, "deadline": DEADLINE, **options}
    space = settings.pop("space", SPACE)
    return client.query(kind, names or [FACTORY], space, port=port, **settings)


def until(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    """Poll ``condition`` (the responder counts a query just after sending its replies)."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``, without blocking."""
    sock.setblocking(False)
    got = []
    while True:
        try:
            got.append(sock.recv(protocol.REPLY_LIMIT))
        except BlockingIOError:
            return got


# --- a responder answering ------------------------------------------------------------------


def test_machines_query_is_answered_completely(running: Responder, lms: list[LmRecord]) -> None:
    answers = ask(protocol.MACHINES_QUERY, running.port)
    assert answers.kind == "machine_status"
    assert answers.answered() == [FACTORY]
    assert answers.complete(FACTORY)
    assert answers.expected == {FACTORY: 3}
    got = answers.replies[FACTORY]
    assert set(got) == {lm_name(FACTORY, slot) for slot in range(3)}
    states = {name: reply["state"] for name, reply in got.items()}
    assert states == {
        lm_name(FACTORY, 0): "Running",
        lm_name(FACTORY, 1): "Starting",
        lm_name(FACTORY, 2): "Shut down",
    }
    assert got[lm_name(FACTORY, 0)]["uuid"] == lms[0].uuid
    assert got[lm_name(FACTORY, 0)]["fqan"] == "/lhcb/Role=pilot"
    assert (answers.sent, answers.received, answers.dropped) == (1, 3, 0)
    assert answers.seconds < TIMEOUT  # complete: no waiting for silence
    assert until(lambda: running.answered == 1)
    assert running.dropped == 0


def test_machinetypes_query_is_answered_completely(running: Responder) -> None:
    answers = ask(protocol.MACHINETYPES_QUERY, running.port)
    assert answers.expected == {FACTORY: 2}
    got = answers.replies[FACTORY]
    assert set(got) == {"alpha", "beta"}
    alpha, beta = got["alpha"], got["beta"]
    assert (alpha["running_machines"], alpha["num_before_fizzle"]) == (1, 1)
    assert alpha["shutdown_message"] == "300 Nothing to do"
    assert alpha["shutdown_machine"] == lm_name(FACTORY, 2)
    assert (beta["running_machines"], beta["num_before_fizzle"]) == (1, 1)
    assert beta["shutdown_message"] is None
    assert answers.seconds < TIMEOUT


def test_factory_query_is_answered(running: Responder) -> None:
    answers = ask(protocol.FACTORY_QUERY, running.port)
    assert set(answers.replies[FACTORY]) == {""}
    status = answers.replies[FACTORY][""]
    assert status["factory"] == FACTORY
    assert status["space"] == SPACE
    assert (status["running_machines"], status["running_processors"]) == (2, 2)
    assert status["max_machines"] == 3
    assert answers.items() == [status]


@pytest.mark.parametrize(
    ("method", "count"), [("machines", 3), ("machinetypes", 2), ("factories", 1)]
)
def test_a_vac_01_request_with_method_only_is_answered(
    running: Responder, udp: Callable[[str], socket.socket], method: str, count: int
) -> None:
    sock = udp(FACTORY)
    body = {"method": method, "vac_version": "Vac 01.00 vac", "space": SPACE, "cookie": "0"}
    sock.sendto(json.dumps(body).encode(), (FACTORY, running.port))
    sock.settimeout(TIMEOUT)
    got = [protocol.parse_reply(sock.recv(protocol.REPLY_LIMIT)) for _ in range(count)]
    assert {reply["cookie"] for reply in got} == {"0"}
    assert {reply["factory"] for reply in got} == {FACTORY}


def test_a_query_for_another_space_gets_no_reply(running: Responder) -> None:
    started = time.monotonic()
    answers = ask(protocol.FACTORY_QUERY, running.port, space="other.example.com")
    assert time.monotonic() - started <= DEADLINE + SLACK
    assert answers.replies == {FACTORY: {}}
    assert answers.answered() == []
    assert answers.received == 0
    assert answers.sent >= 2  # asked again in later rounds
    assert until(lambda: running.dropped == answers.sent)
    assert running.answered == 0


def test_a_silent_factory_costs_at_most_the_deadline(
    running: Responder, udp: Callable[..., socket.socket]
) -> None:
    silent = udp(OTHER, running.port)  # bound, never answers
    deadline = 1.0
    started = time.monotonic()
    answers = ask(
        protocol.FACTORY_QUERY, running.port, [FACTORY, OTHER], timeout=3.0, deadline=deadline
    )
    elapsed = time.monotonic() - started
    assert elapsed <= deadline + SLACK
    assert answers.seconds <= deadline + SLACK
    assert answers.answered() == [FACTORY]
    assert answers.replies[OTHER] == {}
    assert not answers.complete(OTHER)
    assert answers.replies[FACTORY][""]["factory"] == FACTORY
    asked = [protocol.parse_request(data) for data in drain(silent)]
    assert len(asked) >= 2  # asked again after a silence of timeout / tries
    assert {request.kind for request in asked} == {protocol.FACTORY_QUERY}
    assert until(lambda: running.answered >= 1)
    assert running.answered == 1  # the complete factory is not asked again


def test_a_silent_factory_alone_returns_nothing_in_time(
    udp: Callable[..., socket.socket],
) -> None:
    silent = udp(FACTORY)
    port = int(silent.getsockname()[1])
    started = time.monotonic()
    answers = ask(protocol.MACHINES_QUERY, port, timeout=3.0, deadline=0.5)
    assert time.monotonic() - started <= 0.5 + SLACK
    assert answers.replies == {FACTORY: {}}
    assert drain(silent)


# --- fake factories answering wrongly -------------------------------------------------------


class FakeFactory:
    """A UDP socket answering each request with ``answer(request)``'s datagrams."""

    def __init__(self, answer: Callable[[protocol.Request], list[bytes]]) -> None:
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((FACTORY, 0))
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.requests: list[protocol.Request] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(protocol.REQUEST_LIMIT + 1)
            except TimeoutError:
                continue
            except OSError:
                return
            request = protocol.parse_request(data)
            self.requests.append(request)
            for datagram in self.answer(request):
                self.sock.sendto(datagram, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[protocol.Request], list[bytes]]], FakeFactory]]:
    made: list[FakeFactory] = []

    def start(answer: Callable[[protocol.Request], list[bytes]]) -> FakeFactory:
        made.append(FakeFactory(answer))
        return made[-1]

    yield start
    for one in made:
        one.close()


def status(config: Config, cookie: str, **changes: Any) -> dict[str, Any]:
    """A genuine factory_status of ``config``'s factory, then ``changes``."""
    reply = replies.factory_status(replies.Facts(config, [], {}, time.time()), cookie)
    reply.update(changes)
    return reply


def test_a_fake_echoing_the_cookie_is_heard(
    config: Config, fake: Callable[..., FakeFactory]
) -> None:
    """The control for the tests below: the fake factory itself is understood."""
    factory = fake(lambda request: [protocol.encode(status(config, request.cookie))])
    answers = ask(protocol.FACTORY_QUERY, factory.port)
    assert answers.answered() == [FACTORY]
    assert answers.dropped == 0


BAD_REPLIES: dict[str, Callable[[Config, protocol.Request], bytes]] = {
    "wrong-cookie": lambda config, request: protocol.encode(status(config, "0" * 64)),
    "cookie-of-another-salt": lambda config, request: protocol.encode(
        status(config, protocol.cookie(protocol.new_salt(), FACTORY))
    ),
    "names-another-factory": lambda config, request: protocol.encode(
        status(config, request.cookie, factory="127.0.0.9")
    ),
    "another-space": lambda config, request: protocol.encode(
        status(config, request.cookie, space="other.example.com")
    ),
    "another-reply-type": lambda config, request: protocol.encode(
        status(config, request.cookie, message_type="machinetype_status")
    ),
    "a-key-missing": lambda config, request: protocol.encode(
        {k: v for k, v in status(config, request.cookie).items() if k != "load_average"}
    ),
    "a-boolean-number": lambda config, request: protocol.encode(
        status(config, request.cookie, running_machines=True)
    ),
    "not-json": lambda config, request: b"\x00garbage",
}


@pytest.mark.parametrize("bad", sorted(BAD_REPLIES))
def test_bad_replies_are_dropped(
    config: Config, fake: Callable[..., FakeFactory], bad: str
) -> None:
    factory = fake(lambda request: [BAD_REPLIES[bad](config, request)])
    started = time.monotonic()
    answers = ask(protocol.FACTORY_QUERY, factory.port, timeout=0.5, deadline=1.0)
    assert time.monotonic() - started <= 1.0 + SLACK
    assert answers.replies == {FACTORY: {}}
    assert answers.answered() == []
    assert answers.received >= 1
    assert answers.dropped == answers.received
    assert len(factory.requests) == answers.sent >= 2  # still missing: asked again


def test_a_good_reply_among_bad_ones_is_kept(
    config: Config, fake: Callable[..., FakeFactory]
) -> None:
    def answer(request: protocol.Request) -> list[bytes]:
        return [
            protocol.encode(status(config, "0" * 64)),
            protocol.encode(status(config, request.cookie)),
        ]

    answers = ask(protocol.FACTORY_QUERY, fake(answer).port)
    assert answers.answered() == [FACTORY]
    assert answers.dropped == 1
    assert answers.seconds < TIMEOUT


def test_a_hostile_nested_reply_does_not_abort_the_round(
    fake: Callable[..., FakeFactory],
) -> None:
    factory = fake(lambda request: [b"[" * 5000])
    answers = ask(protocol.FACTORY_QUERY, factory.port)
    assert answers.dropped >= 1
    assert answers.replies == {FACTORY: {}}


# --- the responder's defences ---------------------------------------------------------------


def test_the_rate_limit_drops_a_burst_beyond_burst(
    running: Responder, udp: Callable[..., socket.socket]
) -> None:
    flood = udp(FACTORY)
    total = responder.BURST + 20
    datagram = protocol.request(protocol.FACTORY_QUERY, SPACE, "f" * 64)
    started = time.monotonic()
    for _ in range(total):
        flood.sendto(datagram, (FACTORY, running.port))
    assert until(lambda: running.answered + running.dropped == total, seconds=2.5)
    elapsed = time.monotonic() - started
    # The bucket refills at RATE a second while the responder works through the burst.
    assert responder.BURST <= running.answered <= responder.BURST + responder.RATE * elapsed + 1
    assert running.dropped >= total - running.answered
    assert running.dropped >= 1
    assert len(drain(flood)) == running.answered


def test_the_rate_limit_is_per_source(
    running: Responder, udp: Callable[..., socket.socket]
) -> None:
    flood, other = udp(FACTORY), udp(OTHER)
    total = responder.BURST + 20
    datagram = protocol.request(protocol.FACTORY_QUERY, SPACE, "f" * 64)
    for _ in range(total):
        flood.sendto(datagram, (FACTORY, running.port))
    assert until(lambda: running.answered + running.dropped == total, seconds=2.5)
    assert running.dropped >= 1
    other.sendto(datagram, (FACTORY, running.port))
    other.settimeout(TIMEOUT)
    reply = protocol.parse_reply(other.recv(protocol.REPLY_LIMIT))
    assert reply["factory"] == FACTORY


def test_malformed_requests_are_dropped_and_the_responder_goes_on(
    running: Responder, udp: Callable[..., socket.socket]
) -> None:
    sock = udp(FACTORY)
    good = json.loads(protocol.request(protocol.FACTORY_QUERY, SPACE, "a" * 64))
    bad = [
        b"not json",
        b"[1, 2, 3]",
        json.dumps({**good, "cookie": ""}).encode(),
        json.dumps({**good, "message_type": "census_query"}).encode(),
        json.dumps({**good, "padding": "x" * protocol.REQUEST_LIMIT}).encode(),  # too long
    ]
    for data in bad:
        sock.sendto(data, (FACTORY, running.port))
    answers = ask(protocol.FACTORY_QUERY, running.port)  # queued behind them
    assert answers.answered() == [FACTORY]
    assert until(lambda: running.answered == 1)
    assert running.dropped == len(bad)
    assert drain(sock) == []


def test_an_unhashable_message_type_is_counted_as_dropped(
    running: Responder, udp: Callable[..., socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    sock = udp(FACTORY)
    body = json.loads(protocol.request(protocol.FACTORY_QUERY, SPACE, "a" * 64))
    sock.sendto(json.dumps({**body, "message_type": []}).encode(), (FACTORY, running.port))
    answers = ask(protocol.FACTORY_QUERY, running.port)  # queued behind it
    assert answers.answered() == [FACTORY]
    assert until(lambda: running.answered == 1)
    assert running.dropped == 1
    assert not [record for record in caplog.records if record.exc_info]


def test_no_store_no_answer(env: Env, tmp_path: Path) -> None:
    config = env.config(cpus=1, factory={"hostname": FACTORY, "state_dir": str(tmp_path / "x")})
    made = Responder(lambda: config, host=FACTORY, port=0).start()
    try:
        answers = ask(protocol.FACTORY_QUERY, made.port, deadline=0.5)
        assert answers.replies == {FACTORY: {}}
        assert until(lambda: made.dropped >= 1)
        assert made.answered == 0
    finally:
        made.close()


def test_a_snapshot_serves_until_a_write_a_reload_or_snapshot_seconds(
    env: Env, config: Config, lms: list[LmRecord]
) -> None:
    """Answers come from a snapshot of the store, made anew when the store was written, the
    configuration reloaded, or SNAPSHOT_SECONDS passed (``time_sent`` shows which)."""
    now = [int(time.time()) + 0.9]
    current = [config]
    made = Responder(lambda: current[0], host=FACTORY, port=0, clock=lambda: now[0]).start()

    def machines() -> dict[str, dict[str, Any]]:
        return ask(protocol.MACHINES_QUERY, made.port).replies[FACTORY]

    try:
        first = machines()
        assert first[lm_name(FACTORY, 2)]["state"] == "Shut down"
        assert first[lm_name(FACTORY, 0)]["time_sent"] == int(now[0])

        now[0] += snapshot.SNAPSHOT_SECONDS / 2  # nothing written: the same snapshot
        assert machines()[lm_name(FACTORY, 0)]["time_sent"] == int(now[0]) - 1

        env.store.insert(lm(env, 2, "beta", "33333333-new", created=now[0]))  # seen at once
        written = machines()
        assert written[lm_name(FACTORY, 2)]["state"] == "Starting"
        assert written[lm_name(FACTORY, 2)]["uuid"] == "33333333-new"
        assert written[lm_name(FACTORY, 0)]["time_sent"] == int(now[0])

        current[0] = replace(config, factory=replace(config.factory, gocdb_sitename="SITE"))
        assert machines()[lm_name(FACTORY, 0)]["site"] == "SITE"  # a reload, seen at once

        before = int(now[0])
        now[0] += snapshot.SNAPSHOT_SECONDS
        assert machines()[lm_name(FACTORY, 0)]["time_sent"] == before + 1
    finally:
        made.close()


# --- closing --------------------------------------------------------------------------------


def test_close_returns_promptly(config: Config, lms: list[LmRecord]) -> None:
    made = Responder(lambda: config, host=FACTORY, port=0).start()
    port = made.port
    assert ask(protocol.FACTORY_QUERY, port).answered() == [FACTORY]
    started = time.monotonic()
    made.close()
    assert time.monotonic() - started < 1.0  # the socket timeout (0.5 s) bounds it
    assert not made._thread.is_alive()
    assert made.sock.fileno() == -1
    again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        again.bind((FACTORY, port))  # the port is free again
    finally:
        again.close()
    made.close()  # twice: harmless


def test_close_without_start(config: Config) -> None:
    made = Responder(lambda: config, host=FACTORY, port=0)
    started = time.monotonic()
    made.close()
    assert time.monotonic() - started < 0.1
    assert made.sock.fileno() == -1
