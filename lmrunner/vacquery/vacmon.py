"""VacMon: this factory's status, fire-and-forget, to the space's monitors (vac.md §8.5).

After each pass, one ``factory_status`` and every ``machinetype_status`` go to each
``factory.vacmon_hostport`` (no more often than :data:`MIN_PERIOD_SECONDS`: lmrunner passes on
every event, Vac once a cycle); when an LM that ran ends, its ``machine_status`` (Vac's
``sendVacMon``). Cookie ``"0"`` as Vac's. A thread does the work, with its own store
snapshot, and resolves names there: the loop only sets a flag or queues an ended LM, so an
unreachable or unresolvable monitor costs it nothing. Messages are never retried (UDP, as in
Vac); a full queue drops the oldest.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from lmrunner.config import Config
from lmrunner.observe import Observer
from lmrunner.state import LmRecord
from lmrunner.vacquery import protocol, replies
from lmrunner.vacquery.snapshot import Snapshots

LOG = logging.getLogger(__name__)
#: The least time between two status sends after passes.
MIN_PERIOD_SECONDS = 10.0
#: Ended LMs waiting to be told (a burst of ends beyond this loses the oldest).
QUEUE = 1000
COOKIE = "0"
CLIENT = "factory"


def receivers(hostports: Iterable[str]) -> list[tuple[str, int]]:
    """``host:port`` entries as addresses (the config checked their form)."""
    out = []
    for entry in hostports:
        host, _, port = entry.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            out.append((host, int(port)))
    return out


class VacMon(Observer):
    """Sends to ``factory.vacmon_hostport`` beside the loop until :meth:`close`."""

    def __init__(
        self, config: Callable[[], Config], clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.clock = clock
        self._snapshots = Snapshots(config, clock)
        self._ended: collections.deque[LmRecord] = collections.deque(maxlen=QUEUE)
        self._due = threading.Event()
        self._closed = threading.Event()
        self._last_status = float("-inf")
        self.sent = 0  # datagrams
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="vacmon", daemon=True)

    def start(self) -> VacMon:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._due.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # --- called by the loop: never blocks --------------------------------------------------

    def passed(self, seconds: float = 0.0, blocked: str | None = None) -> None:
        self._due.set()

    def ended(self, record: LmRecord) -> None:
        if record.started is not None:  # Vac tells VacMon only of LMs that ran
            self._ended.append(record)
            self._due.set()

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._due.wait()
                self._due.clear()
                self._send_once()
            if self._ended:  # ends told while the last send ran: they are due too
                self._send_once()
        finally:
            self._snapshots.close()

    def _send_once(self) -> None:
        try:  # a socket per send: no descriptor held, none to lose for good
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                self.send_due(sock)
        except Exception:  # monitoring must never stop: next time again
            LOG.exception("vacmon: sending failed")

    def send_due(self, sock: socket.socket) -> None:
        """Send what is due now (the thread's work; tests call it directly)."""
        targets = receivers(self.config().factory.vacmon_hostport)
        if not targets:
            self._ended.clear()
            return
        facts = self._snapshots.facts()
        if facts is None:
            return
        messages: list[dict[str, Any]] = []
        while self._ended:
            record = self._ended.popleft()
            messages.append(replies.ended_machine(facts, record, COOKIE, CLIENT))
        now = self.clock()
        if now - self._last_status >= MIN_PERIOD_SECONDS:
            self._last_status = now
            messages.append(replies.factory_status(facts, COOKIE, CLIENT))
            messages.extend(replies.machinetypes(facts, COOKIE, CLIENT))
        for address in targets:
            for message in messages:
                try:
                    sock.sendto(protocol.encode(message), address)
                    self.sent += 1
                except (OSError, UnicodeError, OverflowError, ValueError) as err:
                    self.failed += 1
                    LOG.debug("vacmon: cannot send to %s:%d: %s", *address, err)
                    break  # this receiver now: the next one still gets its messages
