"""The daemon's HTTP endpoint (``factory.metrics_listen``): ``/metrics`` for Prometheus and
``/``, the read-only status page. Beside the loop: each connection gets a thread (at most
:data:`MAX_CLIENTS`; more are closed at once), so a client that stalls or trickles holds only
its own: dropped after :data:`TIMEOUT_SECONDS` without a byte, or :data:`LIFETIME_SECONDS` in
all; the answers themselves
are made one at a time (each opens its own store connection). Nothing here writes anything.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder

from lmrunner.errors import ConfigError
from lmrunner.metrics import Metrics
from lmrunner.statuspage import StatusPage

LOG = logging.getLogger(__name__)
TIMEOUT_SECONDS = 10.0
#: The longest any connection lives, however slowly it trickles bytes in.
LIFETIME_SECONDS = 30.0
#: Connections served at once; a flood beyond is closed without an answer.
MAX_CLIENTS = 16


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (every interface) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any (tests)
        raise ConfigError(f"metrics_listen: expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a trickling client never holds up the daemon's exit

    def __init__(self, address: tuple[str, int], app: Endpoint) -> None:
        self.app = app
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self.work = threading.Lock()  # one scrape or page at a time: bounded CPU
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.clients.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: this one is dropped
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.clients.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.clients.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer is its business: no traceback on stderr.
        LOG.debug("http: %s: request failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = TIMEOUT_SECONDS  # a stalled client is dropped, the next one served
    server_version = "lmrunner"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # A client sending a byte now and then never meets the read timeout: a timer ends it.
        self._expiry = threading.Timer(LIFETIME_SECONDS, self._expire)
        self._expiry.daemon = True
        self._expiry.start()

    def _expire(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._expiry.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        try:
            self._route(body)
        except (BrokenPipeError, ConnectionResetError):
            raise  # the client went away: handle_error notes it quietly
        except Exception:  # our bug or a store in trouble: said loudly, answered 500
            self.server.app.failed()
            data = b"internal error; see the daemon's log\n"
            self.send_response(500)
            self._send(data, "text/plain; charset=utf-8", body)

    def _route(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        app = self.server.app
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            with self.server.work:
                data = encoder(app.metrics.registry)
        elif path == "/" and app.page is not None:
            with self.server.work:
                data, content_type = app.page(), "text/html; charset=utf-8"
        else:
            data, content_type = b"not found\n", "text/plain; charset=utf-8"
            self.send_response(404)
            self._send(data, content_type, body)
            return
        self.send_response(200)
        self._send(data, content_type, body)

    def _send(self, data: bytes, content_type: str, body: bool) -> None:
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("http: %s %s", self.address_string(), format % args)


class Endpoint:
    """Serves ``/metrics`` (and ``page`` at ``/``) on ``listen`` until :meth:`close`."""

    def __init__(self, listen: str, metrics: Metrics, page: StatusPage | None = None) -> None:
        self.metrics = metrics
        self.page = page
        self._httpd = _Server(parse_listen(listen), self)
        self.port = int(self._httpd.server_address[1])
        self.failures = 0
        self._told = 0.0
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)

    def failed(self) -> None:
        """An answer failed: logged with its traceback, at most once a minute."""
        self.failures += 1
        now = time.monotonic()
        if now - self._told >= 60:
            self._told = now
            LOG.exception("http: an answer failed (%d so far)", self.failures)

    def start(self) -> Endpoint:
        self._thread.start()
        return self

    def _serve(self) -> None:
        self._httpd.serve_forever(poll_interval=0.5)

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()
