"""The VacQuery responder: a thread answering other factories' (and Vac's) queries on UDP.

It never touches the factory loop: it reads the store through its own read-only connection
(SQLite WAL lets it read while the loop writes), again only when the store changed (and at
least once a second), whatever the query rate, and answers from that snapshot. Every request is
read bounded (Vac's 1024 bytes), checked, and rate-limited per source address; anything else is
dropped without a reply. In a space with a secret, requests must be signed (or plain from Vac
where ``factory.space_answer_vac`` allows) and replies to signed ones are signed
(:mod:`lmrunner.vacquery.auth`).
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
from lmrunner.vacquery import protocol, replies
from lmrunner.vacquery.auth import TO_KEY, AuthFor, is_signed
from lmrunner.vacquery.snapshot import Snapshots

LOG = logging.getLogger(__name__)
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
        self._snapshots = Snapshots(config, clock)
        self._auth = AuthFor(clock)
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
            self._snapshots.close()  # made in this thread: closed in it

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
        facts = self._snapshots.facts()
        if facts is None or request.space != facts.config.factory.space:
            self.dropped += 1
            return
        factory = facts.config.factory
        auth = self._auth(factory.space_secret_file, factory.space_answer_vac)
        signed = auth is not None and auth.verify(request.body)
        # Forged, replayed or stale signatures get nothing; plain (Vac's) queries an answer
        # only where the site lets Vac read this factory.
        if (auth is not None and not signed
                and (is_signed(request.body) or not auth.answer_vac)):  # fmt: skip
            self.dropped += 1
            return
        if signed and request.body.get(TO_KEY) != factory.hostname:
            self.dropped += 1  # signed for another factory: a replay
            return
        if signed and auth is not None and not auth.fresh_request(request.cookie, addr[0]):
            self.dropped += 1
            return
        for reply in self.answer_to(facts, request):
            if signed and auth is not None:
                auth.sign(reply)
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
