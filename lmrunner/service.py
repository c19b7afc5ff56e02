"""``lmrunner daemon`` as a systemd service: the one module that talks to systemd.

Two questions, answered apart, because systemd answers them apart:

- **Does a service manager want notifications?** Only when ``$NOTIFY_SOCKET`` is set
  (``Type=notify``, sd_notify(3)). Then :class:`Notifier` sends ``READY=1`` once the running LMs
  are adopted and the first pass is done, ``RELOADING=1``/``READY=1`` around a reload,
  ``STOPPING=1`` on the way out, ``STATUS=`` after passes, and ``WATCHDOG=1`` after every pass
  when ``WatchdogSec=`` is set (:func:`watchdog_interval`). Without the socket it does nothing.
- **Where do the logs go?** To the journal, with structured fields (:class:`JournalHandler`), when
  stderr *is* the journal: ``$JOURNAL_STREAM`` names the ``device:inode`` of the stream systemd
  connected, and it must match stderr's, since a child whose stderr was redirected inherits the
  variable too (systemd.exec(5)). ``LMRUNNER_LOG=journal`` or ``plain`` overrides the choice.

The calls into libsystemd go through ``cysystemd`` (its wheels bundle libsystemd, so hosts need
no ``-dev`` package). Children the daemon starts inherit ``$NOTIFY_SOCKET``; the unit's
``NotifyAccess=main`` makes systemd ignore anything but the daemon itself.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any, Literal

from cysystemd import journal
from cysystemd.daemon import Notification, notify

LOG = logging.getLogger("lmrunner.service")
IDENTIFIER = "lmrunner"
PLAIN_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"

# Structured fields: the ``extra=`` attribute on a log record -> the journal field.
# ``journalctl -u lmrunner MACHINETYPE=example LM_UUID=...`` selects by them.
LM_FIELDS = {
    "lm_name": "LM_NAME",
    "lm_uuid": "LM_UUID",
    "machinetype": "MACHINETYPE",
    "outcome_code": "OUTCOME_CODE",
    "outcome_source": "OUTCOME_SOURCE",
}

LogChoice = Literal["journal", "plain"]

# The journal's sender, looked up at each record (tests replace it): sd_journal_sendv(3)
# through cysystemd, which upper-cases the keyword names into field names. It returns a
# negative errno on failure instead of raising.
journal_send: Callable[..., Any] = journal.send


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


# --- the two questions --------------------------------------------------------------------------


def notify_socket(environ: Mapping[str, str] | None = None) -> str | None:
    """The service manager's notification socket (``$NOTIFY_SOCKET``), or None."""
    return _environ(environ).get("NOTIFY_SOCKET") or None


def stderr_is_journal(
    environ: Mapping[str, str] | None = None, stderr: IO[Any] | None = None
) -> bool:
    """Whether ``stderr`` is the stream systemd connected to the journal: ``$JOURNAL_STREAM``
    (``device:inode``) matches its ``fstat`` (systemd.exec(5), "$JOURNAL_STREAM")."""
    value = _environ(environ).get("JOURNAL_STREAM", "")
    stream = sys.stderr if stderr is None else stderr
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset, malformed, no file descriptor
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def under_systemd(environ: Mapping[str, str] | None = None, stderr: IO[Any] | None = None) -> bool:
    """Whether systemd runs this process as a service, by either sign: a notification socket
    (what :class:`Notifier` needs) or stderr connected to the journal (what
    :func:`log_choice` needs). For messages only: each decision asks its own question."""
    return notify_socket(environ) is not None or stderr_is_journal(environ, stderr)


# --- notifications --------------------------------------------------------------------------


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings, or None when no watchdog watches this process.

    That is half of ``$WATCHDOG_USEC`` (the unit's ``WatchdogSec=``), as sd_watchdog_enabled(3)
    recommends; ``$WATCHDOG_PID``, when set, must be this process (else the variables were
    inherited from a parent that is being watched)."""
    env = _environ(environ)
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2


class Notifier:
    """sd_notify(3) messages for the daemon's life; all no-ops without ``$NOTIFY_SOCKET``.

    A message that cannot be sent is logged (once) and never raised: the factory's work matters
    more than systemd's view of it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.enabled = notify_socket(environ) is not None
        #: Seconds between two watchdog pings (:func:`watchdog_interval`); None: no watchdog.
        self.interval = watchdog_interval(environ) if self.enabled else None
        self._status: str | None = None
        self._failed = False
        self._stopping = False
        self.was_ready = False  # READY=1 sent once (start-up done)

    def _send(self, notification: Notification, value: str | None = None) -> None:
        if not self.enabled:
            return
        try:
            if value is None:
                notify(notification, return_exceptions=False)
            else:
                notify(notification, value, return_exceptions=False)
        except Exception as err:  # sd_notify's errors: RuntimeError, ValueError, OSError
            if not self._failed:
                self._failed = True
                LOG.warning("systemd: cannot send %s: %s", notification.name, err)

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) is complete: ``READY=1``, after the status if given."""
        if status is not None:
            self.status(status)
        self.was_ready = True
        self._send(Notification.READY)

    def reloaded(self) -> None:
        """A reload is complete: ``READY=1`` again, but only once start-up said it first (a
        reload asked before the first pass, e.g. by a pipe, must not make systemd think the
        daemon has adopted its LMs)."""
        if self.was_ready:
            self._send(Notification.READY)

    def reloading(self) -> None:
        """A reload begins; :meth:`ready` ends it. (Plain ``RELOADING=1``: without the
        ``MONOTONIC_USEC=`` that only ``Type=notify-reload`` requires.)"""
        if self.was_ready:  # before start-up is done, systemd is waiting for READY only
            self._send(Notification.RELOADING)

    def stopping(self) -> None:
        """The daemon is leaving: ``STOPPING=1`` (once)."""
        if not self._stopping:
            self._stopping = True
            self._send(Notification.STOPPING)

    def status(self, text: str) -> None:
        """``STATUS=text`` (``systemctl status`` shows it); an unchanged text is not sent again."""
        if text != self._status:
            self._status = text
            self._send(Notification.STATUS, text)

    def watchdog(self) -> None:
        """``WATCHDOG=1``, when a watchdog is configured. Sent on every call (after every pass),
        not throttled: a skipped ping would add to the longest gap systemd may see, which is
        the loop's wait (at most :attr:`interval`) plus one pass (and a reload)."""
        if self.interval is not None:
            self._send(Notification.WATCHDOG)


# --- the journal ---------------------------------------------------------------------------


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (syslog(3): 2 crit ... 7 debug)."""
    if levelno >= logging.CRITICAL:
        return int(journal.Priority.CRITICAL)
    if levelno >= logging.ERROR:
        return int(journal.Priority.ERROR)
    if levelno >= logging.WARNING:
        return int(journal.Priority.WARNING)
    if levelno >= logging.INFO:
        return int(journal.Priority.INFO)
    return int(journal.Priority.DEBUG)


class JournalHandler(logging.Handler):
    """Sends each record to the journal as one entry with fields: ``MESSAGE`` (with any
    traceback), ``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``LOGGER``, ``CODE_FILE``/``CODE_LINE``/
    ``CODE_FUNC``, and the LM fields of :data:`LM_FIELDS` that the record carries."""

    def __init__(self, identifier: str = IDENTIFIER, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.identifier = identifier

    def fields(self, record: logging.LogRecord) -> dict[str, str | int]:
        fields: dict[str, str | int] = {
            "MESSAGE": self.format(record),
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        for attribute, field in LM_FIELDS.items():
            value = record.__dict__.get(attribute)
            if value is not None:
                fields[field] = value if isinstance(value, int) else str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            result = journal_send(**self.fields(record))
            if isinstance(result, int) and result < 0:
                raise OSError(-result, f"sd_journal_sendv: {os.strerror(-result)}")
        except Exception:
            self.handleError(record)


def log_choice(
    environ: Mapping[str, str] | None = None, stderr: IO[Any] | None = None
) -> LogChoice:
    """``LMRUNNER_LOG=journal`` or ``plain`` if set so; otherwise the journal exactly when
    stderr is connected to it (:func:`stderr_is_journal`)."""
    wanted = _environ(environ).get("LMRUNNER_LOG", "").strip().lower()
    if wanted == "journal":
        return "journal"
    if wanted == "plain":
        return "plain"
    return "journal" if stderr_is_journal(environ, stderr) else "plain"


def setup_logging(level: int = logging.INFO) -> LogChoice:
    """Configure the root logger for the daemon (as :func:`logging.basicConfig`: not when it
    has handlers already); returns the choice made."""
    choice = log_choice()
    if choice == "journal":
        # The level and the logger are fields of their own (PRIORITY, LOGGER): the message
        # stays the message (basicConfig would prefix "LEVEL:name:").
        logging.basicConfig(level=level, handlers=[JournalHandler()], format="%(message)s")
    else:
        logging.basicConfig(stream=sys.stderr, level=level, format=PLAIN_FORMAT)
    wanted = os.environ.get("LMRUNNER_LOG", "").strip().lower()
    if wanted not in ("", "auto", "journal", "plain"):
        LOG.warning("LMRUNNER_LOG=%s: not journal, plain or auto; logging to %s", wanted, choice)
    return choice
