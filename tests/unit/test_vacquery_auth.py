"""Authenticated VacQuery (lmrunner.vacquery.auth): the space secret file's checks, signing and
verifying through real JSON, the responder's replay table, AuthFor's re-reading and failing
closed, a real Responder asked by client.query with and without the secret, replayed request
datagrams from raw sockets, and the configuration's checks of the two options."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from lmrunner.config import Config
from lmrunner.errors import ConfigError
from lmrunner.loader import load_config
from lmrunner.vacquery import client, protocol, replies
from lmrunner.vacquery.auth import (
    HMAC_KEY,
    MAX_SECRET_FILE,
    MIN_SECRET,
    RESENDS,
    TIME_KEY,
    WINDOW_SECONDS,
    AuthFor,
    SpaceAuth,
    canonical,
    from_config,
    is_signed,
    load_secret,
)
from lmrunner.vacquery.client import Answers
from lmrunner.vacquery.responder import Responder
from tests.unit.test_factory import Clock, Env

#: The responder names itself by factory.hostname; an IP literal lets the client reach it.
FACTORY = "127.0.0.1"
#: A second loopback address (Linux answers on all of 127/8): another source.
OTHER = "127.0.0.2"
SPACE = "space.example.com"
SECRET = b"0123456789abcdef0123456789abcdef"
OTHER_SECRET = b"the-other-space-secret-0123456789"
T0 = 1_700_000_000.0
#: A round that gets an answer ends as soon as it is complete; one that gets none costs this.
TIMEOUT = 1.0
DEADLINE = 1.5
SILENT_TIMEOUT = 0.3
SILENT_DEADLINE = 0.4
AUTH_LOG = "lmrunner.vacquery.auth"


def write_secret(path: Path, data: bytes = SECRET + b"\n", mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def error_of(path: Path) -> str:
    """load_secret's error for ``path``: one line, naming the file first."""
    with pytest.raises(ConfigError) as caught:
        load_secret(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert caught.value.errors == (message,)
    return message


def forge(message: dict[str, Any], secret: bytes = SECRET) -> dict[str, Any]:
    """``message`` with an HMAC made over it as it is (whatever its time)."""
    message[HMAC_KEY] = hmac.new(secret, canonical(message), hashlib.sha256).hexdigest()
    return message


def through_json(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` as the other end reads it off the wire."""
    loaded = json.loads(protocol.encode(message))
    assert isinstance(loaded, dict)
    return loaded


def until(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    """Poll ``condition`` (the responder counts a datagram just after deciding on it)."""
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


def one_reply(sock: socket.socket) -> dict[str, Any]:
    sock.settimeout(TIMEOUT)
    return protocol.parse_reply(sock.recv(protocol.REPLY_LIMIT))


# --- the secret file ------------------------------------------------------------------------


def test_a_good_secret_is_read_without_surrounding_whitespace(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "secret", b" \t" + SECRET + b" \r\n\n")
    assert load_secret(path) == SECRET


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_taken(tmp_path: Path, mode: int) -> None:
    assert load_secret(write_secret(tmp_path / "secret", mode=mode)) == SECRET


def test_a_missing_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    expected = f"{path}: cannot open the space secret: {os.strerror(errno.ENOENT)}"
    assert error_of(path) == expected


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_is_refused(tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "target"
    if not dangling:
        write_secret(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    expected = f"{link}: cannot open the space secret: {os.strerror(errno.ELOOP)}"
    assert error_of(link) == expected


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    assert error_of(path) == f"{path}: the space secret must be a regular file"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "folder"
    path.mkdir(mode=0o700)
    assert error_of(path) == f"{path}: the space secret must be a regular file"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o610, 0o601, 0o660])
def test_group_or_other_bits_are_refused(tmp_path: Path, mode: int) -> None:
    path = write_secret(tmp_path / "secret", mode=mode)
    expected = (
        f"{path}: the space secret must be readable by its owner only (mode 0600), not {mode:04o}"
    )
    assert error_of(path) == expected


def test_a_secret_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a file away")
    path = write_secret(tmp_path / "secret")
    os.chown(path, 65534, -1)
    expected = f"{path}: the space secret must be owned by uid 0, not 65534"
    assert error_of(path) == expected


@pytest.mark.parametrize(
    ("data", "length"), [(b"", 0), (b"x" * 15, 15), (b"  " + b"x" * 15 + b"\n\n  ", 15)]
)
def test_a_short_secret_is_refused(tmp_path: Path, data: bytes, length: int) -> None:
    path = write_secret(tmp_path / "secret", data)
    expected = (
        f"{path}: the space secret must hold at least {MIN_SECRET} bytes, got {length} "
        f"(e.g. openssl rand -hex 32 > {path})"
    )
    assert error_of(path) == expected


def test_the_shortest_and_the_longest_secret_are_taken(tmp_path: Path) -> None:
    short = write_secret(tmp_path / "short", b"s" * MIN_SECRET)
    assert load_secret(short) == b"s" * MIN_SECRET
    longest = write_secret(tmp_path / "long", b"L" * MAX_SECRET_FILE)
    assert load_secret(longest) == b"L" * MAX_SECRET_FILE


@pytest.mark.parametrize("data", [b"L" * (MAX_SECRET_FILE + 1), b"L" * 100_000])
def test_a_file_over_the_limit_is_refused(tmp_path: Path, data: bytes) -> None:
    path = write_secret(tmp_path / "secret", data)
    assert error_of(path) == f"{path}: the space secret is over {MAX_SECRET_FILE} bytes"


def test_an_error_stays_one_line_whatever_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "new\nline"
    with pytest.raises(ConfigError) as caught:
        load_secret(path)
    assert "\n" not in str(caught.value)


def test_from_config() -> None:
    assert from_config(None, False) is None
    assert from_config(None, True) is None


def test_from_config_reads_the_file(tmp_path: Path) -> None:
    clock = Clock(T0)
    made = from_config(write_secret(tmp_path / "secret"), True, clock)
    assert made is not None
    assert (made.secret, made.answer_vac, made.clock) == (SECRET, True, clock)
    assert SECRET.decode() not in repr(made)  # never logged by accident
    with pytest.raises(ConfigError, match="cannot open the space secret"):
        from_config(tmp_path / "missing", False)


# --- signing and verifying ------------------------------------------------------------------

NASTY: dict[str, Any] = {
    "message_type": "factory_status",
    "floats": [0.1, 1e-7, 1e300, -0.0, 3.0, 2.5e-308, 123456789.123456789],
    "ints": [0, -1, 2**53 + 1, 10**30],
    "text": 'é 日本 \u2028 \U0001f600 "quoted" back\\slash \x00 tab\t',
    "nested": {"z": [1, {"b": None, "a": [True, False, {}]}], "a": {"ü": "ß"}},
    "empty": "",
}


def test_canonical_is_sorted_compact_and_without_the_hmac() -> None:
    assert canonical({"b": 1, "a": "é", HMAC_KEY: "x", TIME_KEY: 2.5}) == (
        b'{"a":"\\u00e9","b":1,"lmrunner_time":2.5}'
    )


def test_is_signed() -> None:
    assert not is_signed({"cookie": "0"})
    assert is_signed({TIME_KEY: 1})
    assert is_signed({HMAC_KEY: ""})


def test_sign_adds_the_time_and_the_hmac() -> None:
    auth = SpaceAuth(SECRET, clock=lambda: T0 + 0.123456)
    message: dict[str, Any] = {"cookie": "0"}
    signed = auth.sign(message)
    assert signed is message  # in place
    assert signed[TIME_KEY] == T0 + 0.123
    assert (
        signed[HMAC_KEY]
        == hmac.new(
            SECRET, b'{"cookie":"0","lmrunner_time":1700000000.123}', hashlib.sha256
        ).hexdigest()
    )
    assert auth.verify(signed)


@pytest.mark.parametrize(
    "spell",
    [
        protocol.encode,
        lambda m: json.dumps(m).encode(),
        lambda m: json.dumps(m, ensure_ascii=False, indent=2).encode(),
        lambda m: json.dumps(dict(reversed(list(m.items())))).encode("utf-8"),
    ],
    ids=["encode", "dumps", "unicode-indented", "reordered"],
)
def test_sign_verify_round_trip_through_json(spell: Callable[[dict[str, Any]], bytes]) -> None:
    clock = Clock(T0 + 0.5)
    sender, receiver = SpaceAuth(SECRET, clock=clock), SpaceAuth(SECRET, clock=clock)
    sent = sender.sign(json.loads(json.dumps(NASTY)))
    got = json.loads(spell(sent))
    assert got == sent
    assert receiver.verify(got)


def test_a_signed_request_verifies_after_parse_request() -> None:
    auth = SpaceAuth(SECRET, clock=Clock(T0))
    datagram = protocol.request(protocol.MACHINES_QUERY, SPACE, "c" * 64, "factory", auth.sign)
    request = protocol.parse_request(datagram)
    assert request.cookie == "c" * 64
    assert set(request.body) >= {TIME_KEY, HMAC_KEY, "method", "cookie"}
    assert auth.verify(request.body)
    assert not SpaceAuth(OTHER_SECRET, clock=Clock(T0)).verify(request.body)


TAMPER: dict[str, Callable[[dict[str, Any]], None]] = {
    "a-value": lambda m: m.update(cookie="1"),
    "a-nested-value": lambda m: m["nested"]["a"].update({"ü": "ss"}),
    "a-float": lambda m: m["floats"].__setitem__(0, 0.1000000001),
    "an-int-for-a-float": lambda m: m["floats"].__setitem__(4, 3),
    "a-key-added": lambda m: m.update(extra=None),
    "a-key-removed": lambda m: m.pop("text"),
    "the-time-within-the-window": lambda m: m.update({TIME_KEY: m[TIME_KEY] + 1}),
    "the-hmac-changed": lambda m: m.update(
        {HMAC_KEY: m[HMAC_KEY][:-1] + ("1" if m[HMAC_KEY].endswith("0") else "0")}
    ),
    "the-hmac-upper-case": lambda m: m.update({HMAC_KEY: m[HMAC_KEY].upper()}),
    "the-hmac-truncated": lambda m: m.update({HMAC_KEY: m[HMAC_KEY][:32]}),
    "the-hmac-missing": lambda m: m.pop(HMAC_KEY),
    "the-time-missing": lambda m: m.pop(TIME_KEY),
    "the-hmac-a-number": lambda m: m.update({HMAC_KEY: 0}),
    "the-hmac-null": lambda m: m.update({HMAC_KEY: None}),
    "the-hmac-a-list": lambda m: m.update({HMAC_KEY: [m[HMAC_KEY]]}),
}


@pytest.mark.parametrize("change", sorted(TAMPER))
def test_a_tampered_message_is_not_verified(change: str) -> None:
    auth = SpaceAuth(SECRET, clock=Clock(T0))
    message = through_json(auth.sign({**json.loads(json.dumps(NASTY)), "cookie": "0"}))
    assert auth.verify(message)  # the control
    TAMPER[change](message)
    assert not auth.verify(through_json(message))


def test_another_secret_does_not_verify() -> None:
    clock = Clock(T0)
    message = through_json(SpaceAuth(SECRET, clock=clock).sign({"cookie": "0"}))
    assert not SpaceAuth(OTHER_SECRET, clock=clock).verify(message)
    assert not SpaceAuth(SECRET + b"x", clock=clock).verify(message)
    assert SpaceAuth(SECRET, clock=clock).verify(message)


@pytest.mark.parametrize(
    ("offset", "verified"),
    [
        (0.0, True),
        (WINDOW_SECONDS, True),
        (-WINDOW_SECONDS, True),
        (WINDOW_SECONDS + 0.001, False),  # the receiver's clock ahead: signed too long ago
        (-WINDOW_SECONDS - 0.001, False),  # behind: signed in its future
        (3600.0, False),
        (-3600.0, False),
    ],
)
def test_the_time_window(offset: float, verified: bool) -> None:
    clock = Clock(T0)
    message = through_json(SpaceAuth(SECRET, clock=clock).sign({"cookie": "0"}))
    clock.now = T0 + offset
    assert SpaceAuth(SECRET, clock=clock).verify(message) is verified


@pytest.mark.parametrize(
    "when",
    [float("nan"), float("inf"), float("-inf"), True, False, str(int(T0)), None, [T0], {"t": T0}],
    ids=repr,
)
def test_a_time_that_is_no_number_is_refused(when: object) -> None:
    """Each signed with the right secret: only the time is wrong."""
    auth = SpaceAuth(SECRET, clock=Clock(T0))
    assert auth.verify(through_json(forge({"cookie": "0", TIME_KEY: T0})))  # the control
    message = forge({"cookie": "0", TIME_KEY: when})
    assert not auth.verify(message)
    assert not auth.verify(json.loads(json.dumps(message)))  # NaN and Infinity spelled too


def test_an_integer_time_is_taken() -> None:
    auth = SpaceAuth(SECRET, clock=Clock(T0))
    assert auth.verify(through_json(forge({"cookie": "0", TIME_KEY: int(T0) - 5})))


HOSTILE: dict[str, Callable[[], dict[str, Any]]] = {
    # hmac.compare_digest raises TypeError for str holding non-ASCII characters.
    "non-ascii-hmac": lambda: {"cookie": "0", TIME_KEY: T0, HMAC_KEY: "é" * 64},
    # JSON reads a 401-digit integer; clock() - it raises OverflowError.
    "huge-integer-time": lambda: {"cookie": "0", TIME_KEY: 10**400, HMAC_KEY: "0" * 64},
    # json.dumps in canonical() raises RecursionError (not TypeError/ValueError).
    "deep-nesting": lambda: {"cookie": "0", TIME_KEY: T0, HMAC_KEY: "0" * 64, "x": _deep(50_000)},
}


def _deep(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
def test_verify_refuses_hostile_values_without_raising(hostile: str) -> None:
    auth = SpaceAuth(SECRET, clock=Clock(T0))
    assert auth.verify(HOSTILE[hostile]()) is False


# --- the responder's table of request cookies -----------------------------------------------


def test_retransmissions_from_one_source_are_answered_up_to_resends() -> None:
    auth = SpaceAuth(SECRET, clock=Clock(T0))
    assert [auth.fresh_request("c", FACTORY) for _ in range(RESENDS)] == [True] * RESENDS
    assert not auth.fresh_request("c", FACTORY)
    assert not auth.fresh_request("c", FACTORY)
    assert auth.fresh_request("d", FACTORY)  # another cookie: its own count


def test_a_cookie_from_another_source_is_refused() -> None:
    auth = SpaceAuth(SECRET, clock=Clock(T0))
    assert auth.fresh_request("c", FACTORY)
    assert not auth.fresh_request("c", OTHER)
    assert not auth.fresh_request("c", OTHER)
    assert auth.fresh_request("c", FACTORY)  # the first source goes on
    assert auth.fresh_request("d", OTHER)


def test_a_cookie_is_forgotten_after_twice_the_window() -> None:
    clock = Clock(T0)
    auth = SpaceAuth(SECRET, clock=clock)
    for _ in range(RESENDS):
        assert auth.fresh_request("c", FACTORY)
    assert not auth.fresh_request("c", FACTORY)
    clock.now = T0 + 2 * WINDOW_SECONDS  # not yet
    assert not auth.fresh_request("c", OTHER)
    assert not auth.fresh_request("c", FACTORY)
    clock.now = T0 + 2 * WINDOW_SECONDS + 0.001
    assert auth.fresh_request("c", OTHER)  # anew, now OTHER's
    assert not auth.fresh_request("c", FACTORY)
    assert auth.fresh_request("c", OTHER)


def test_the_table_is_pruned_beyond_4096_keeping_recent_cookies() -> None:
    clock = Clock(T0)
    auth = SpaceAuth(SECRET, clock=clock)
    for index in range(4000):
        assert auth.fresh_request(f"old-{index}", FACTORY)
    clock.now = T0 + 100
    for index in range(97):
        assert auth.fresh_request(f"new-{index}", FACTORY)
    assert len(auth._cookies) == 4097
    clock.now = T0 + 2 * WINDOW_SECONDS + 10  # the old ones are out of the window, not the new
    assert auth.fresh_request("trigger", FACTORY)
    assert len(auth._cookies) == 97 + 1
    assert not auth.fresh_request("new-0", OTHER)  # kept: still the first source's
    assert auth.fresh_request("new-0", FACTORY)
    assert auth.fresh_request("old-0", OTHER)


def test_recent_cookies_are_all_kept_beyond_4096() -> None:
    clock = Clock(T0)
    auth = SpaceAuth(SECRET, clock=clock)
    for index in range(4200):
        clock.now = T0 + index * 0.01
        assert auth.fresh_request(f"c-{index}", FACTORY)
    assert len(auth._cookies) == 4200
    assert not auth.fresh_request("c-0", OTHER)
    assert not auth.fresh_request("c-4199", OTHER)


# --- AuthFor --------------------------------------------------------------------------------


def test_auth_for_without_a_secret_is_none(caplog: pytest.LogCaptureFixture) -> None:
    made = AuthFor(Clock(T0))
    assert made(None, False) is None
    assert made(None, True) is None
    assert not caplog.records


def test_auth_for_is_cached_until_the_options_or_the_file_change(tmp_path: Path) -> None:
    clock = Clock(T0)
    path = write_secret(tmp_path / "secret")
    made = AuthFor(clock)
    first = made(path, False)
    assert first is not None
    assert (first.secret, first.answer_vac, first.clock) == (SECRET, False, clock)
    assert made(path, False) is first
    vac = made(path, True)
    assert vac is not None and vac is not first
    assert vac.answer_vac
    assert made(path, True) is vac
    os.utime(path, ns=(1, 1))  # touched, same secret: read again, still verifies
    again = made(path, True)
    assert again is not None and again is not vac
    assert again.verify(first.sign({"cookie": "0"}))


def test_auth_for_reads_a_rewritten_secret(tmp_path: Path) -> None:
    clock = Clock(T0)
    path = write_secret(tmp_path / "secret")
    made = AuthFor(clock)
    old = made(path, False)
    assert old is not None
    signed_before = old.sign({"cookie": "0"})
    write_secret(path, OTHER_SECRET)  # in place (another size)
    new = made(path, False)
    assert new is not None and new.secret == OTHER_SECRET
    assert not new.verify(signed_before)
    assert new.verify(new.sign({"cookie": "1"}))


def test_auth_for_reads_a_secret_replaced_by_rename(tmp_path: Path) -> None:
    clock = Clock(T0)
    path = write_secret(tmp_path / "secret")
    made = AuthFor(clock)
    old = made(path, False)
    assert old is not None
    signed_before = old.sign({"cookie": "0"})
    rotated = SECRET[::-1]  # the same size
    write_secret(tmp_path / "secret.new", rotated).replace(path)
    new = made(path, False)
    assert new is not None and new.secret == rotated
    assert not new.verify(signed_before)


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == AUTH_LOG and r.levelno >= logging.ERROR]


@pytest.mark.parametrize("breakage", ["removed", "group-readable", "a-symlink", "too-short"])
def test_auth_for_fails_closed_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, breakage: str
) -> None:
    caplog.set_level(logging.ERROR, logger=AUTH_LOG)
    clock = Clock(T0)
    path = write_secret(tmp_path / "secret")
    made = AuthFor(clock)
    good = made(path, True)
    assert good is not None
    signed = good.sign({"cookie": "0"})
    if breakage == "removed":
        path.unlink()
    elif breakage == "group-readable":
        path.chmod(0o640)
    elif breakage == "a-symlink":
        path.unlink()
        path.symlink_to(write_secret(tmp_path / "elsewhere"))
    else:
        write_secret(path, b"short\n")
    closed = made(path, True)
    assert closed is not None and closed is not good  # never None: nothing is trusted
    assert closed.secret not in (SECRET, b"short")
    assert len(closed.secret) == 32
    assert not closed.answer_vac  # not even Vac's plain queries
    assert closed.clock is clock
    assert not closed.verify(signed)
    for _ in range(5):
        assert made(path, True) is closed
    logged = failures(caplog)
    assert len(logged) == 1
    text = logged[0].getMessage()
    assert text.startswith(f"space: {path}: ")
    assert "nothing is signed or trusted until it is fixed" in text
    assert "\n" not in text

    if path.is_symlink():
        path.unlink()
    write_secret(path)  # fixed: trusted again, nothing more logged
    fixed = made(path, True)
    assert fixed is not None and fixed.answer_vac
    assert fixed.verify(signed)
    assert len(failures(caplog)) == 1


def test_auth_for_logs_again_for_a_new_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=AUTH_LOG)
    path = tmp_path / "secret"
    made = AuthFor(Clock(T0))
    made(path, False)
    made(path, False)
    assert len(failures(caplog)) == 1
    write_secret(path, mode=0o644)
    made(path, False)
    made(path, False)
    assert len(failures(caplog)) == 2
    assert "mode 0600" in failures(caplog)[1].getMessage()


# --- a real responder, a real client --------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


def configured(
    env: Env, secret: bytes | None = SECRET, answer_vac: bool = False, cpus: int = 2
) -> Config:
    factory: dict[str, Any] = {"hostname": FACTORY, "disk_method": "none"}
    if secret is not None:
        path = env.tmp_path / f"space-{hashlib.sha256(secret).hexdigest()[:8]}.secret"
        factory["space_secret_file"] = str(write_secret(path, secret))
    if answer_vac:
        factory["space_answer_vac"] = True
    return env.config(cpus=cpus, factory=factory)


@pytest.fixture
def serve() -> Iterator[Callable[[Config], Responder]]:
    made: list[Responder] = []

    def start(config: Config) -> Responder:
        made.append(Responder(lambda: config, host=FACTORY, port=0).start())
        return made[-1]

    yield start
    for one in made:
        close_now(one)


def close_now(responder: Responder) -> None:
    """Close ``responder`` without waiting out its socket timeout: datagrams wake it."""
    closer = threading.Thread(target=responder.close)
    closer.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as poke:
        while closer.is_alive():
            poke.sendto(b"", (FACTORY, responder.port))
            closer.join(0.01)


@pytest.fixture
def udp() -> Iterator[Callable[[str], socket.socket]]:
    """Plain UDP sockets bound to a loopback address, all closed after."""
    made: list[socket.socket] = []

    def bind(host: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        made.append(sock)
        try:
            sock.bind((host, 0))
        except OSError as err:
            pytest.skip(f"cannot bind {host}: {err}")
        return sock

    yield bind
    for sock in made:
        sock.close()


def ask(
    port: int,
    auth: SpaceAuth | None,
    *,
    unsigned: bool = False,
    kind: str = protocol.FACTORY_QUERY,
    silent: bool = False,
) -> Answers:
    return client.query(
        kind,
        [FACTORY],
        SPACE,
        port=port,
        timeout=SILENT_TIMEOUT if silent else TIMEOUT,
        deadline=SILENT_DEADLINE if silent else DEADLINE,
        resolve=lambda name: name,
        auth=auth,
        unsigned=unsigned,
    )


def test_the_same_secret_is_answered_and_verified(
    env: Env, serve: Callable[[Config], Responder]
) -> None:
    running = serve(configured(env))
    auth = SpaceAuth(SECRET)
    answers = ask(running.port, auth)
    assert answers.answered() == [FACTORY]
    assert answers.signed
    assert answers.unsigned == set()
    assert answers.verified(FACTORY)
    reply = answers.replies[FACTORY][""]
    assert set(reply) >= {TIME_KEY, HMAC_KEY}
    assert auth.verify(reply)
    assert not SpaceAuth(OTHER_SECRET).verify(reply)
    assert (answers.sent, answers.dropped) == (1, 0)
    assert until(lambda: running.answered == 1)
    assert running.dropped == 0


def test_every_machine_status_is_signed(env: Env, serve: Callable[[Config], Responder]) -> None:
    running = serve(configured(env, cpus=2))
    auth = SpaceAuth(SECRET)
    answers = ask(running.port, auth, kind=protocol.MACHINES_QUERY)
    assert answers.expected == {FACTORY: 2}
    got = answers.replies[FACTORY]
    assert len(got) == 2
    assert all(auth.verify(reply) for reply in got.values())
    assert answers.verified(FACTORY)


def test_a_client_without_the_secret_gets_nothing(
    env: Env, serve: Callable[[Config], Responder]
) -> None:
    running = serve(configured(env))
    answers = ask(running.port, None, silent=True)
    assert answers.replies == {FACTORY: {}}
    assert answers.received == 0
    assert answers.sent >= 2
    assert until(lambda: running.dropped == answers.sent)
    assert running.answered == 0


def test_answer_vac_answers_a_plain_client_unsigned(
    env: Env, serve: Callable[[Config], Responder]
) -> None:
    running = serve(configured(env, answer_vac=True))
    answers = ask(running.port, None)
    assert answers.answered() == [FACTORY]
    assert not answers.signed
    assert not answers.verified(FACTORY)
    reply = answers.replies[FACTORY][""]
    assert HMAC_KEY not in reply
    assert TIME_KEY not in reply
    assert not is_signed(reply)
    # A signing client still gets signed replies.
    auth = SpaceAuth(SECRET)
    signed = ask(running.port, auth)
    assert signed.verified(FACTORY)
    assert auth.verify(signed.replies[FACTORY][""])
    assert until(lambda: running.answered == 2)


def test_answer_vac_still_drops_a_bad_signature(
    env: Env, serve: Callable[[Config], Responder], udp: Callable[[str], socket.socket]
) -> None:
    """Only plain queries are Vac's: anything claiming a signature must carry a good one."""
    running = serve(configured(env, answer_vac=True))
    sock = udp(FACTORY)
    plain = json.loads(protocol.request(protocol.FACTORY_QUERY, SPACE, "a" * 64))
    bad = [
        {**plain, TIME_KEY: time.time()},  # a time and no HMAC
        {**plain, HMAC_KEY: "0" * 64},  # an HMAC and no time
        forge({**plain, TIME_KEY: time.time()}, OTHER_SECRET),
    ]
    for body in bad:
        sock.sendto(json.dumps(body).encode(), (FACTORY, running.port))
    assert until(lambda: running.dropped == len(bad))
    assert drain(sock) == []
    assert ask(running.port, None).answered() == [FACTORY]  # the control


def test_a_client_with_another_secret_gets_nothing(
    env: Env, serve: Callable[[Config], Responder]
) -> None:
    running = serve(configured(env, answer_vac=True))
    answers = ask(running.port, SpaceAuth(OTHER_SECRET), unsigned=True, silent=True)
    assert answers.replies == {FACTORY: {}}
    assert answers.received == 0
    assert until(lambda: running.dropped == answers.sent)
    assert running.answered == 0


def test_a_stale_signed_query_gets_nothing(env: Env, serve: Callable[[Config], Responder]) -> None:
    running = serve(configured(env))
    late = SpaceAuth(SECRET, clock=lambda: time.time() - WINDOW_SECONDS - 30)
    answers = ask(running.port, late, silent=True)
    assert answers.replies == {FACTORY: {}}
    assert until(lambda: running.dropped == answers.sent)


@pytest.mark.parametrize("unsigned", [True, False])
def test_a_plain_vac_responder(
    env: Env, serve: Callable[[Config], Responder], unsigned: bool
) -> None:
    running = serve(configured(env, secret=None))
    answers = ask(running.port, SpaceAuth(SECRET), unsigned=unsigned, silent=not unsigned)
    assert answers.signed
    assert answers.received >= 1
    if unsigned:  # inspection: kept, and marked
        assert answers.answered() == [FACTORY]
        assert answers.unsigned == {FACTORY}
        assert not answers.verified(FACTORY)
        assert HMAC_KEY not in answers.replies[FACTORY][""]
        assert answers.dropped == 0
    else:  # planning: never used, but known to have answered (not silent, not asked again)
        assert answers.replies == {FACTORY: {}}
        assert answers.unsigned == {FACTORY}
        assert answers.dropped == answers.received
        assert answers.sent == 1
    assert until(lambda: running.answered == answers.sent)  # the responder did answer


def test_a_replayed_request_gets_no_reply(
    env: Env, serve: Callable[[Config], Responder], udp: Callable[[str], socket.socket]
) -> None:
    running = serve(configured(env))
    first, second = udp(FACTORY), udp(OTHER)
    auth = SpaceAuth(SECRET)
    datagram = protocol.request(
        protocol.FACTORY_QUERY, SPACE, "c" * 64, "factory", partial(auth.sign, to=FACTORY)
    )
    target = (FACTORY, running.port)

    first.sendto(datagram, target)
    reply = one_reply(first)
    assert reply["cookie"] == "c" * 64
    assert auth.verify(reply)

    second.sendto(datagram, target)  # captured and replayed from elsewhere
    assert until(lambda: running.dropped == 1)
    assert drain(second) == []

    for _ in range(RESENDS - 1):  # the first source's retransmissions
        first.sendto(datagram, target)
        assert one_reply(first)["cookie"] == "c" * 64
    assert until(lambda: running.answered == RESENDS)
    for count in range(2, 5):  # and no more
        first.sendto(datagram, target)
        assert until(lambda: running.dropped == count)  # noqa: B023 - used at once
    assert drain(first) == []
    assert running.answered == RESENDS

    fresh = protocol.request(
        protocol.FACTORY_QUERY, SPACE, "d" * 64, "factory", partial(auth.sign, to=FACTORY)
    )
    second.sendto(fresh, target)  # a new cookie from the second source is answered
    assert one_reply(second)["cookie"] == "d" * 64


@pytest.mark.parametrize("change", ["space", "cookie", "message_type", "time"])
def test_a_tampered_request_gets_no_reply(
    env: Env, serve: Callable[[Config], Responder], udp: Callable[[str], socket.socket], change: str
) -> None:
    running = serve(configured(env))
    sock = udp(FACTORY)
    body = json.loads(
        protocol.request(
            protocol.FACTORY_QUERY,
            SPACE,
            "c" * 64,
            sign=partial(SpaceAuth(SECRET).sign, to=FACTORY),
        )
    )
    body.update(
        {
            "space": {"space": SPACE.upper()},
            "cookie": {"cookie": "e" * 64},
            "message_type": {"message_type": protocol.MACHINES_QUERY, "method": "machines"},
            "time": {TIME_KEY: body[TIME_KEY] + 1},
        }[change]
    )
    sock.sendto(json.dumps(body).encode(), (FACTORY, running.port))
    assert until(lambda: running.dropped == 1)
    assert drain(sock) == []
    assert running.answered == 0


HOSTILE_REQUEST: dict[str, Callable[[dict[str, Any]], None]] = {
    "non-ascii-hmac": lambda body: body.update({HMAC_KEY: "é" * 64}),
    "huge-integer-time": lambda body: body.update({TIME_KEY: 10**400}),
}


@pytest.mark.parametrize("hostile", sorted(HOSTILE_REQUEST))
def test_a_hostile_signed_request_is_dropped_quietly(
    env: Env,
    serve: Callable[[Config], Responder],
    udp: Callable[[str], socket.socket],
    caplog: pytest.LogCaptureFixture,
    hostile: str,
) -> None:
    running = serve(configured(env))
    sock = udp(FACTORY)
    auth = SpaceAuth(SECRET)
    body = json.loads(
        protocol.request(
            protocol.FACTORY_QUERY, SPACE, "c" * 64, sign=partial(auth.sign, to=FACTORY)
        )
    )
    HOSTILE_REQUEST[hostile](body)
    data = json.dumps(body).encode()
    assert len(data) <= protocol.REQUEST_LIMIT
    sock.sendto(data, (FACTORY, running.port))
    good = protocol.request(
        protocol.FACTORY_QUERY, SPACE, "d" * 64, sign=partial(auth.sign, to=FACTORY)
    )
    sock.sendto(good, (FACTORY, running.port))  # answered after the hostile one was handled
    assert one_reply(sock)["cookie"] == "d" * 64
    assert not [record for record in caplog.records if record.exc_info]
    assert running.dropped == 1


# --- a client reading signed replies from a fake factory ------------------------------------


class FakeFactory:
    """A UDP socket on FACTORY answering each request with ``answer(request)``'s datagrams."""

    def __init__(
        self, answer: Callable[[protocol.Request], list[bytes]], pause: float = 0.0
    ) -> None:
        self.answer = answer
        self.pause = pause
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
                if self.pause:
                    time.sleep(self.pause)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeFactory]]:
    made: list[FakeFactory] = []

    def start(answer: Callable[[protocol.Request], list[bytes]], pause: float = 0.0) -> FakeFactory:
        made.append(FakeFactory(answer, pause))
        return made[-1]

    yield start
    for one in made:
        one.close()


def status(config: Config, cookie: str) -> dict[str, Any]:
    """A genuine factory_status of ``config``'s factory."""
    return replies.factory_status(replies.Facts(config, [], {}, time.time()), cookie)


def test_a_reply_signed_with_the_secret_is_verified(
    env: Env, fake: Callable[..., FakeFactory]
) -> None:
    config, signer = configured(env, secret=None), SpaceAuth(SECRET)
    factory = fake(lambda request: [protocol.encode(signer.sign(status(config, request.cookie)))])
    answers = ask(factory.port, SpaceAuth(SECRET))
    assert answers.verified(FACTORY)
    assert all(signer.verify(request.body) for request in factory.requests)


@pytest.mark.parametrize("how", ["another-secret", "stale", "time-only", "hmac-only"])
def test_a_badly_signed_reply_is_dropped_even_when_unsigned_ones_are_kept(
    env: Env, fake: Callable[..., FakeFactory], how: str
) -> None:
    config = configured(env, secret=None)

    def answer(request: protocol.Request) -> list[bytes]:
        reply = status(config, request.cookie)
        if how == "another-secret":
            SpaceAuth(OTHER_SECRET).sign(reply)
        elif how == "stale":
            SpaceAuth(SECRET, clock=lambda: time.time() - 2 * WINDOW_SECONDS).sign(reply)
        elif how == "time-only":
            reply[TIME_KEY] = time.time()
        else:
            reply[HMAC_KEY] = "0" * 64
        return [protocol.encode(reply)]

    answers = ask(fake(answer).port, SpaceAuth(SECRET), unsigned=True, silent=True)
    assert answers.replies == {FACTORY: {}}
    assert answers.received >= 1
    assert answers.dropped == answers.received
    assert answers.unsigned == set()


HOSTILE_REPLY: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "non-ascii-hmac": lambda reply: protocol.encode(
        {**reply, TIME_KEY: time.time(), HMAC_KEY: "é" * 64}
    ),
    "huge-integer-time": lambda reply: protocol.encode(
        {**reply, TIME_KEY: 10**400, HMAC_KEY: "0" * 64}
    ),
}


@pytest.mark.parametrize("hostile", sorted(HOSTILE_REPLY))
def test_a_hostile_signed_reply_does_not_abort_the_round(
    env: Env, fake: Callable[..., FakeFactory], hostile: str
) -> None:
    config = configured(env, secret=None)
    factory = fake(lambda request: [HOSTILE_REPLY[hostile](status(config, request.cookie))])
    answers = ask(factory.port, SpaceAuth(SECRET), unsigned=True, silent=True)
    assert answers.replies == {FACTORY: {}}
    assert answers.dropped >= 1


@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11),
    reason="the nesting json.loads takes and json.dumps refuses a few frames deeper depends "
    "on how this Python counts C recursion",
)
def test_a_deeply_nested_signed_reply_does_not_abort_the_round(
    env: Env, fake: Callable[..., FakeFactory]
) -> None:
    config = configured(env, secret=None)

    def answer(request: protocol.Request) -> list[bytes]:
        signed = {**status(config, request.cookie), TIME_KEY: time.time(), HMAC_KEY: "0" * 64}
        base = protocol.encode(signed)[:-1] + b',"x":'
        # One of them is at the edge, wherever the test's stack is.
        return [base + b"[" * depth + b"]" * depth + b"}" for depth in range(600, 1000)]

    factory = fake(answer, 0.0001)  # paced: the client's buffer keeps up
    answers = ask(factory.port, SpaceAuth(SECRET), unsigned=True, silent=True)
    assert answers.replies == {FACTORY: {}}


# --- the configuration ----------------------------------------------------------------------

CONFIG = """\
factory:
  space: space.example.com
  state_dir: {state}
  disk_method: none
{extra}machinetypes:
  alpha:
    backend: fake
    image: "fake:seconds=3600"
    target_share: 1
"""


def write_config(tmp_path: Path, **options: object) -> Path:
    extra = "".join(f"  {key}: {json.dumps(value)}\n" for key, value in options.items())
    path = tmp_path / "lmrunner.yaml"
    path.write_text(CONFIG.format(state=json.dumps(str(tmp_path / "state")), extra=extra))
    return path


def load(path: Path, check_files: bool = True) -> Config:
    return load_config(path, hostname="factory.example.com", cpus=2, check_files=check_files)


def errors_of(path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load(path)
    return caught.value.errors


def test_the_loader_takes_a_good_secret(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "secret")
    config = load(write_config(tmp_path, space_secret_file=str(secret)))
    assert config.factory.space_secret_file == secret
    assert config.factory.space_answer_vac is False
    both = load(write_config(tmp_path, space_secret_file=str(secret), space_answer_vac=True))
    assert both.factory.space_answer_vac is True


def test_no_secret_is_plain_vac(tmp_path: Path) -> None:
    config = load(write_config(tmp_path))
    assert config.factory.space_secret_file is None
    assert config.factory.space_answer_vac is False


BAD_FILES: dict[str, Callable[[Path], Path]] = {
    "missing": lambda d: d / "missing",
    "group-readable": lambda d: write_secret(d / "secret", mode=0o640),
    "other-readable": lambda d: write_secret(d / "secret", mode=0o604),
    "short": lambda d: write_secret(d / "secret", b"tiny\n"),
    "too-long": lambda d: write_secret(d / "secret", b"x" * (MAX_SECRET_FILE + 1)),
    "a-directory": lambda d: _folder(d / "folder"),
    "a-symlink": lambda d: _link(d / "link", write_secret(d / "secret")),
}


def _folder(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_a_bad_secret_file_is_a_one_line_config_error(tmp_path: Path, bad: str) -> None:
    secret = BAD_FILES[bad](tmp_path)
    with pytest.raises(ConfigError) as direct:
        load_secret(secret)
    path = write_config(tmp_path, space_secret_file=str(secret))
    line = 5  # after space, state_dir and disk_method
    assert errors_of(path) == (f"{path}:{line}: factory.space_secret_file: {direct.value}",)
    assert str(secret) in str(direct.value)
    # Not checked when files are not (lmrunner check --no-files and the like).
    assert load(path, check_files=False).factory.space_secret_file == secret


def test_answer_vac_without_a_secret_is_an_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, space_answer_vac=True)
    assert errors_of(path) == (
        f"{path}:5: factory.space_answer_vac: expected only with factory.space_secret_file "
        "(without a secret every query is answered, as Vac does)",
    )


def test_answer_vac_false_without_a_secret_is_fine(tmp_path: Path) -> None:
    assert not load(write_config(tmp_path, space_answer_vac=False)).factory.space_answer_vac


def test_a_request_signed_for_another_factory_gets_no_reply(
    env: Env, serve: Callable[[Config], Responder], udp: Callable[[str], socket.socket]
) -> None:
    """Captured on its way to one member and replayed to another: refused (reflection)."""
    running = serve(configured(env))
    sock = udp(FACTORY)
    auth = SpaceAuth(SECRET)
    for to in ("other.example.com", None):
        datagram = protocol.request(protocol.FACTORY_QUERY, SPACE, "e" * 64, "factory",
                                    partial(auth.sign, to=to))  # fmt: skip
        sock.sendto(datagram, (FACTORY, running.port))
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
    assert until(lambda: running.dropped >= 2)
