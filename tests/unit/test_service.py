"""lmrunner.service: sd_notify messages on a real notification socket, the watchdog interval, the
journal handler's fields, and where the daemon's logs go."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lmrunner import service
from lmrunner.service import JournalHandler, Notifier

FIELD_NAME = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")  # journald's rule for field names


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named by $NOTIFY_SOCKET."""
    folder = tmp_path
    if len(str(tmp_path / "notify")) > 100:  # sun_path holds 108 bytes
        folder = Path(tempfile.mkdtemp(prefix="lmr-notify-"))
    path = folder / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    yield sock
    sock.close()
    path.unlink()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on the socket now."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(5)


# --- notifications ------------------------------------------------------------------------------


def test_ready_reloading_stopping_and_status_reach_the_socket(
    notify_socket: socket.socket,
) -> None:
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready("2 LMs running, 0 of 2 processors free")
    assert notify_socket.recv(4096) == b"STATUS=2 LMs running, 0 of 2 processors free"
    assert notify_socket.recv(4096) == b"READY=1"
    notifier.reloading()
    assert notify_socket.recv(4096) == b"RELOADING=1"
    notifier.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    notifier.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    notifier.stopping()  # the signal handler, then the way out: said once
    assert received(notify_socket) == []


def test_a_reload_before_start_up_is_done_says_nothing(notify_socket: socket.socket) -> None:
    """A pipe may ask for a reload before the first pass: systemd must see READY=1 only once
    the LMs are adopted and the first pass is done."""
    notifier = Notifier()
    notifier.reloading()
    notifier.reloaded()
    assert received(notify_socket) == []
    notifier.ready()
    notifier.reloading()
    notifier.reloaded()
    assert received(notify_socket) == ["READY=1", "RELOADING=1", "READY=1"]


def test_an_unchanged_status_is_not_sent_again(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    for text in ("a", "a", "b", "b", "a"):
        notifier.status(text)
    assert received(notify_socket) == ["STATUS=a", "STATUS=b", "STATUS=a"]


def test_the_watchdog_is_pinged_after_every_pass_when_configured(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")  # WatchdogSec=4: ping every 2 s
    notifier = Notifier()
    assert notifier.interval == 2.0
    for _ in range(3):
        notifier.watchdog()
    assert received(notify_socket) == ["WATCHDOG=1"] * 3


def test_no_watchdog_no_ping(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.interval is None
    notifier.watchdog()
    assert received(notify_socket) == []


def test_without_a_notify_socket_everything_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sd_notify called without NOTIFY_SOCKET")

    monkeypatch.setattr(service, "notify", never)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.interval is None  # no socket: nobody to feed, and no cap on the loop's wait
    notifier.ready("x")
    notifier.reloading()
    notifier.status("y")
    notifier.watchdog()
    notifier.stopping()


def test_a_socket_that_cannot_be_reached_is_logged_once_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    notifier = Notifier()
    with caplog.at_level(logging.WARNING, logger="lmrunner.service"):
        notifier.ready()
        notifier.stopping()
    warnings = [r.getMessage() for r in caplog.records if r.name == "lmrunner.service"]
    assert len(warnings) == 1
    assert warnings[0].startswith("systemd: cannot send READY")


# --- the watchdog interval ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "<self>"}, 2.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "<other>"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "not a pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "sixty"}, None),
        ({"WATCHDOG_PID": "<self>"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    pids = {"<self>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    env = {key: pids.get(value, value) for key, value in environ.items()}
    assert service.watchdog_interval(env) == interval


# --- where the logs go --------------------------------------------------------------------------


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[Any]:
    with (tmp_path / "stderr").open("w") as handle:
        yield handle


def journal_stream_of(handle: Any) -> str:
    stat = os.fstat(handle.fileno())
    return f"{stat.st_dev}:{stat.st_ino}"


def test_stderr_is_the_journal_only_when_journal_stream_names_it(
    stream: Any, tmp_path: Path
) -> None:
    mine = journal_stream_of(stream)
    assert service.stderr_is_journal({"JOURNAL_STREAM": mine}, stream)
    assert not service.stderr_is_journal({}, stream)
    with (tmp_path / "other").open("w") as other:  # inherited by a redirected child
        assert not service.stderr_is_journal({"JOURNAL_STREAM": journal_stream_of(other)}, stream)
    for malformed in ("", "12", "a:b", "1:2:3"):
        assert not service.stderr_is_journal({"JOURNAL_STREAM": malformed}, stream)
    assert not service.stderr_is_journal({"JOURNAL_STREAM": mine}, object())  # type: ignore[arg-type]


def test_under_systemd_by_either_sign(stream: Any) -> None:
    assert not service.under_systemd({}, stream)
    assert service.under_systemd({"NOTIFY_SOCKET": "/run/systemd/notify"}, stream)
    assert service.under_systemd({"JOURNAL_STREAM": journal_stream_of(stream)}, stream)


@pytest.mark.parametrize(
    ("wanted", "connected", "choice"),
    [
        (None, True, "journal"),
        (None, False, "plain"),
        ("auto", True, "journal"),
        ("journal", False, "journal"),
        ("JOURNAL", False, "journal"),
        ("plain", True, "plain"),
        ("nonsense", False, "plain"),
    ],
)
def test_log_choice(stream: Any, wanted: str | None, connected: bool, choice: str) -> None:
    env = {"JOURNAL_STREAM": journal_stream_of(stream)} if connected else {}
    if wanted is not None:
        env["LMRUNNER_LOG"] = wanted
    assert service.log_choice(env, stream) == choice


@contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger without handlers (as in a fresh daemon), restored afterwards. Inside the
    test's body: pytest adds its capturing handlers to the root for the call only."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    try:
        yield root
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = saved
        root.setLevel(level)


def test_setup_logging_to_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMRUNNER_LOG", "journal")
    with bare_root() as root:
        assert service.setup_logging() == "journal"
        handlers, level = root.handlers[:], root.level
    (handler,) = handlers
    assert isinstance(handler, JournalHandler)
    assert level == logging.INFO


def test_setup_logging_plain_keeps_the_line_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMRUNNER_LOG", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with bare_root() as root:
        assert service.setup_logging() == "plain"
        handlers = root.handlers[:]
    (handler,) = handlers
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is sys.stderr
    assert handler.formatter is not None
    assert handler.formatter._fmt == "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def test_setup_logging_on_the_journal_stream(monkeypatch: pytest.MonkeyPatch, stream: Any) -> None:
    monkeypatch.delenv("LMRUNNER_LOG", raising=False)
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(stream))
    monkeypatch.setattr(sys, "stderr", stream)
    with bare_root():
        assert service.setup_logging() == "journal"
    monkeypatch.setenv("LMRUNNER_LOG", "plain")
    assert service.log_choice() == "plain"


# --- the journal handler ------------------------------------------------------------------------


class Sent:
    """Stands in for cysystemd's journal.send: keeps each entry's fields."""

    def __init__(self, result: int = 0) -> None:
        self.entries: list[dict[str, Any]] = []
        self.result = result

    def __call__(self, **fields: Any) -> int:
        self.entries.append(fields)
        return self.result


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    capture = Sent()
    monkeypatch.setattr(service, "journal_send", capture)
    return capture


@pytest.fixture
def journal_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("lmrunner.test.journal")
    handler = JournalHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger
    logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def test_a_record_becomes_an_entry_with_its_fields(
    sent: Sent, journal_logger: logging.Logger
) -> None:
    journal_logger.info("lm=%s machinetype=%s: finished: %s", "lm-1", "alpha", "200 done",
                        extra={"lm_name": "lm-1", "lm_uuid": "u-1", "machinetype": "alpha",
                               "outcome_code": 200, "outcome_source": "payload"})  # fmt: skip
    (entry,) = sent.entries
    assert entry["MESSAGE"] == "lm=lm-1 machinetype=alpha: finished: 200 done"
    assert entry["PRIORITY"] == 6
    assert entry["SYSLOG_IDENTIFIER"] == "lmrunner"
    assert entry["LOGGER"] == "lmrunner.test.journal"
    assert entry["CODE_FILE"] == __file__
    assert isinstance(entry["CODE_LINE"], int)
    assert entry["CODE_FUNC"] == "test_a_record_becomes_an_entry_with_its_fields"
    assert (entry["LM_NAME"], entry["LM_UUID"], entry["MACHINETYPE"]) == ("lm-1", "u-1", "alpha")
    assert (entry["OUTCOME_CODE"], entry["OUTCOME_SOURCE"]) == (200, "payload")
    assert all(FIELD_NAME.match(name) for name in entry)


def test_fields_a_record_does_not_carry_are_left_out(
    sent: Sent, journal_logger: logging.Logger
) -> None:
    journal_logger.warning("plain line")
    journal_logger.info("started", extra={"lm_name": "lm-2", "lm_uuid": "u-2"})
    first, second = sent.entries
    assert not set(service.LM_FIELDS.values()) & set(first)
    assert {"LM_NAME", "LM_UUID"} <= set(second)
    assert not {"MACHINETYPE", "OUTCOME_CODE", "OUTCOME_SOURCE"} & set(second)


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (logging.INFO + 5, 6),
        (logging.ERROR + 5, 3),
    ],
)
def test_priority_from_the_level(
    sent: Sent, journal_logger: logging.Logger, level: int, priority: int
) -> None:
    journal_logger.log(level, "x")
    assert sent.entries[-1]["PRIORITY"] == priority
    assert service.priority(level) == priority


def test_a_traceback_goes_into_the_message(sent: Sent, journal_logger: logging.Logger) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        journal_logger.exception("pass failed")
    message = sent.entries[-1]["MESSAGE"]
    assert message.startswith("pass failed\nTraceback")
    assert "ValueError: boom" in message
    assert sent.entries[-1]["PRIORITY"] == 3


def test_a_failing_send_never_raises_out_of_emit(
    monkeypatch: pytest.MonkeyPatch,
    journal_logger: logging.Logger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(**fields: Any) -> int:
        raise OSError("journal gone")

    monkeypatch.setattr(service, "journal_send", broken)
    journal_logger.error("still fine")
    monkeypatch.setattr(service, "journal_send", Sent(result=-11))  # sd_journal_sendv: -EAGAIN
    journal_logger.error("still fine")
    monkeypatch.setattr(logging, "raiseExceptions", False)  # production: silent
    journal_logger.error("still fine")
    err = capsys.readouterr().err
    assert err.count("--- Logging error ---") == 2
    assert "journal gone" in err
    assert "sd_journal_sendv" in err


def test_the_real_sender_takes_our_field_names(journal_logger: logging.Logger) -> None:
    """cysystemd upper-cases names and refuses bad ones (ValueError); without journald it
    returns 0. An entry with every field must not be refused."""
    handler = JournalHandler()
    record = journal_logger.makeRecord(
        journal_logger.name, logging.INFO, __file__, 1, "lm=%s: started", ("x",), None,
        extra={"lm_name": "x", "lm_uuid": "u", "machinetype": "alpha", "outcome_code": 0,
               "outcome_source": "payload"},
    )  # fmt: skip
    fields = handler.fields(record)
    assert set(service.LM_FIELDS.values()) <= set(fields)
    if not Path("/run/systemd/journal/socket").exists():  # never write to a real journal
        result = service.journal_send(**fields)
        assert isinstance(result, int)
