"""The VacQuery responder: a thread answering other factories' (and Vac's) queries on UDP.

It never touches the factory loop: it reads the store through its own read-only connection
(SQLite WAL lets it read while the loop writes), again only when the store changed (and at
least once a second), whatever the query rate, and answers from that snapshot. Every request is
read bounded (Vac's 1024 bytes), checked, and rate-limited per source address; anything else is
dropped without a reply.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmrunner.config import Config
from lmrunner.state import Store, StoreError
from lmrunner.vacquery import protocol, replies

LOG = logging.getLogger(__name__)
#: A snapshot serves every query for this long.
SNAPSHOT_SECONDS = 1.0
#: Per source address: this many queries at once, refilled at RATE a second.
BURST = 50
RATE = 20.0


@dataclass
class _Bucket:
    tokens: float = BURST
    at: float = field(default_factory=time.monotonic)


class Responder:
    """Answers VacQuery on ``factory.vacquery_port`` until :meth:`close`."""

    def __init__(
        self,
        config: Callable[[], Config],
        host: str = "",
        port: int = protocol.DEFAULT_PORT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.settimeout(0.5)  # a close is noticed within this
        self.port = int(self.sock.getsockname()[1])
        self._closed = threading.Event()
        self._buckets: dict[str, _Bucket] = {}
        self._facts: replies.Facts | None = None
        self._version = -1  # the store's data_version when _facts were read
        self._store: Store | None = None
        self.answered = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._serve, name="vacquery", daemon=True)

    def start(self) -> Responder:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        try:
            self._loop()
        finally:
            if self._store is not None:  # made in this thread: closed in it
                self._store.close()

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                data, addr = self.sock.recvfrom(protocol.REQUEST_LIMIT + 1)
            except TimeoutError:
                continue
            except OSError as err:
                if not self._closed.is_set():
                    LOG.error("vacquery: cannot read a request: %s", err)
                    time.sleep(0.5)
                continue
            try:
                self._answer(data, addr)
            except Exception:  # a bug answering one query must not stop the responder
                LOG.exception("vacquery: answering %s failed", addr[0])

    def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self._allowed(addr[0]):
            self.dropped += 1
            return
        try:
            request = protocol.parse_request(data)
        except protocol.ProtocolError as err:
            self.dropped += 1
            LOG.debug("vacquery: dropped a datagram from %s: %s", addr[0], err)
            return
        facts = self._snapshot()
        if facts is None or request.space != facts.config.factory.space:
            self.dropped += 1
            return
        for reply in self.answer_to(facts, request):
            try:
                self.sock.sendto(protocol.encode(reply), addr)
            except OSError as err:
                LOG.debug("vacquery: cannot answer %s: %s", addr[0], err)
                return
        self.answered += 1

    @staticmethod
    def answer_to(facts: replies.Facts, request: protocol.Request) -> list[dict[str, Any]]:
        if request.kind == protocol.MACHINES_QUERY:
            return replies.machines(facts, request.cookie)
        if request.kind == protocol.MACHINETYPES_QUERY:
            return replies.machinetypes(facts, request.cookie)
        return [replies.factory_status(facts, request.cookie)]

    def _allowed(self, source: str) -> bool:
        """A token bucket per source address: a flood costs one dict entry and no work."""
        now = time.monotonic()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) > 10000:  # spoofed sources: forget the idle ones
                self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < 10}
            bucket = self._buckets[source] = _Bucket(at=now)
        bucket.tokens = min(BURST, bucket.tokens + (now - bucket.at) * RATE)
        bucket.at = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def _snapshot(self) -> replies.Facts | None:
        now = self.clock()
        config = self.config()
        try:
            if self._store is None:
                self._store = Store(config.factory.state_dir, readonly=True)
            version = self._store.data_version()
            if (
                self._facts is not None
                and version == self._version
                and config is self._facts.config
                and now - self._facts.now < SNAPSHOT_SECONDS
            ):
                return self._facts  # nothing was written since: the same answers
            self._version = version
            active = self._store.active()
            last = self._store.last_finished(config.machinetypes)
        except StoreError as err:
            LOG.error("vacquery: cannot read the store: %s", err)
            if self._store is not None:
                self._store.close()
                self._store = None
            return None
        self._facts = replies.Facts(config, active, last, now)
        return self._facts
