"""The image download cache (lmrunner.images) against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import importlib
import io
import ipaddress
import json
import logging
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
from requests.adapters import BaseAdapter

from lmrunner.fetch import FetchError, fetch_bytes, url_problem
from lmrunner.images import (
    META_NAME,
    DownloadSettings,
    ImageCache,
    ImageState,
    entry_key,
    file_name,
    is_remote,
    size_text,
)

T0 = 1_700_000_000.0
BODY = b"CernVM 4 ISO " * 1000
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()
ETAG = '"v1"'
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


# --- a real HTTP(S) server ----------------------------------------------------------------------


@dataclass
class Resource:
    """What the server answers for one path."""

    body: bytes = BODY
    etag: str | None = ETAG
    last_modified: str | None = LAST_MODIFIED
    status: int = 200
    chunked: bool = False  # Transfer-Encoding: chunked, no Content-Length
    length: int | None = None  # a Content-Length to claim instead of the body's
    location: str | None = None  # answer 302 to there
    gate: threading.Event | None = None  # the body waits for it (a download in progress)
    drip: float = 0.0  # seconds between 64 KiB pieces of the body


@dataclass
class Request:
    path: str
    headers: dict[str, str] = field(default_factory=dict)


class ImageServer:
    """A ThreadingHTTPServer on 127.0.0.1 (TLS when given a context) that records every GET."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.resources: dict[str, Resource] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked bodies need it

            def do_GET(self) -> None:
                with state._lock:
                    state.requests.append(Request(self.path, dict(self.headers.items())))
                    res = state.resources.get(self.path)
                # The client may give up (a size cap, close()).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.answer(res)

            def answer(self, res: Resource | None) -> None:
                if res is None or res.status != 200 or res.location:
                    status = 404 if res is None else 302 if res.location else res.status
                    self.send_response(status)
                    if res is not None and res.location:
                        self.send_header("Location", res.location)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                fresh = (res.etag is not None and self.headers["If-None-Match"] == res.etag) or (
                    self.headers["If-None-Match"] is None
                    and res.last_modified is not None
                    and self.headers["If-Modified-Since"] == res.last_modified
                )
                self.send_response(304 if fresh else 200)
                if res.etag:
                    self.send_header("ETag", res.etag)
                if res.last_modified:
                    self.send_header("Last-Modified", res.last_modified)
                self.send_header("Connection", "close")
                if fresh:
                    self.end_headers()
                    return
                if res.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    length = len(res.body) if res.length is None else res.length
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                if res.gate is not None:
                    res.gate.wait(10)
                for start in range(0, len(res.body), 65536):
                    piece = res.body[start : start + 65536]
                    if res.chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    else:
                        self.wfile.write(piece)
                    if res.drip:
                        time.sleep(res.drip)
                if res.chunked:
                    self.wfile.write(b"0\r\n\r\n")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if context is not None else "http"
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.running = True

    def url(self, path: str = "/cernvm4.iso") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def count(self, path: str = "/cernvm4.iso") -> int:
        with self._lock:
            return sum(1 for request in self.requests if request.path == path)

    def last(self, path: str = "/cernvm4.iso") -> Request:
        with self._lock:
            return [request for request in self.requests if request.path == path][-1]

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)


Maker = Callable[..., ImageCache]


class Clock:
    """A settable clock for the cache (the back-off, revalidation and prune times)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[ImageServer]:
    httpd = ImageServer()
    httpd.resources["/cernvm4.iso"] = Resource()
    yield httpd
    httpd.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def caches() -> Iterator[list[ImageCache]]:
    made: list[ImageCache] = []
    yield made
    for cache in made:
        cache.close()


def settings(**changes: Any) -> DownloadSettings:
    values: dict[str, Any] = {
        "ca_path": None,
        "allow_http": True,
        "max_bytes": 10_000_000,
        "timeout": 5.0,
        "keep_seconds": 7 * 86400.0,
        "revalidate_seconds": 300.0,
    }
    values.update(changes)
    return DownloadSettings(**values)


@pytest.fixture
def make(tmp_path: Path, clock: Clock, caches: list[ImageCache]) -> Callable[..., ImageCache]:
    def make_cache(**changes: Any) -> ImageCache:
        factory = changes.pop("session_factory", requests.Session)
        cache = ImageCache(
            tmp_path / "images", settings(**changes), clock=clock, session_factory=factory
        )
        caches.append(cache)
        return cache

    return make_cache


def ready(state: ImageState) -> Path:
    assert state.status == "ready", state
    assert state.path is not None
    return state.path


# --- one download, shared -------------------------------------------------------------------


def test_many_gets_share_one_download_and_never_block(make: Maker, server: ImageServer) -> None:
    gate = threading.Event()
    server.resources["/cernvm4.iso"] = Resource(gate=gate)
    cache = make()
    began = time.monotonic()
    states = [cache.get(server.url()) for _ in range(50)]
    assert time.monotonic() - began < 2.0  # the body is held back: get() did not wait for it
    assert {state.status for state in states} == {"downloading"}
    assert states[0].path is None
    assert states[0].detail.startswith(f"downloading {server.url()}: ")
    gate.set()
    path = ready(cache.wait(server.url(), 10))
    assert server.count() == 1
    assert path.name == "cernvm4.iso"
    assert path.read_bytes() == BODY
    assert path.parent == cache.root / entry_key(server.url())
    assert ready(cache.get(server.url())) == path
    assert server.count() == 1
    assert cache.get(server.url()).detail == f"downloaded {size_text(len(BODY))}"


def test_files_are_readable_by_others_and_described_by_metadata(
    make: Maker, server: ImageServer, clock: Clock
) -> None:
    cache = make()
    path = ready(cache.wait(server.url(), 10))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(cache.root.stat().st_mode) == 0o755
    meta = json.loads((path.parent / META_NAME).read_text())
    assert meta["url"] == server.url()
    assert meta["file"] == "cernvm4.iso"
    assert meta["etag"] == ETAG
    assert meta["last_modified"] == LAST_MODIFIED
    assert meta["sha256"] == DIGEST.removeprefix("sha256:")
    assert meta["size"] == len(BODY)
    assert meta["fetched_at"] == T0
    assert sorted(p.name for p in path.parent.iterdir()) == [META_NAME, "cernvm4.iso"]
    [row] = cache.entries()
    assert row == {
        "url": server.url(),
        "path": str(path),
        "size": len(BODY),
        "sha256": DIGEST.removeprefix("sha256:"),
        "fetched": T0,
        "last_used": T0,
        "status": "ready",
        "detail": f"downloaded {size_text(len(BODY))}",
    }


def test_file_names_are_the_sanitised_basename() -> None:
    assert size_text(13_000) == "13.0 kB"
    assert size_text(12_345_678) == "12.3 MB"
    assert size_text(999) == "999 bytes"
    assert file_name("https://example.org/cernvm/cernvm4-micro-2020.07-1.iso") == (
        "cernvm4-micro-2020.07-1.iso"
    )
    assert file_name("https://example.org/a/vo%20image.sif?x=1#y") == "vo_image.sif"
    assert file_name("https://example.org/a/..") == "image"
    assert file_name("https://example.org/") == "image"
    assert file_name("https://example.org/.hidden") == "hidden"
    assert file_name("https://example.org/" + "x" * 300 + ".qcow2").endswith("x.qcow2")
    assert len(file_name("https://example.org/" + "x" * 300 + ".qcow2")) == 128
    assert is_remote("https://example.org/a.iso")
    assert is_remote("HTTP://example.org/a.iso")
    assert not is_remote("docker://registry/vo:1")
    assert not is_remote("/cvmfs/unpacked.cern.ch/vo")
    assert not is_remote("cernvm4.iso")


# --- revalidation ---------------------------------------------------------------------------


def test_revalidation_is_a_conditional_get_and_304_refreshes_fetched_at(
    make: Maker, server: ImageServer, clock: Clock
) -> None:
    cache = make()
    path = ready(cache.wait(server.url(), 10))
    clock.now += 299
    assert ready(cache.get(server.url())) == path
    assert server.count() == 1  # not due yet
    clock.now += 1
    gate = threading.Event()
    server.resources["/cernvm4.iso"].gate = gate  # a 304 has no body: the gate is not reached
    during = cache.get(server.url())
    assert ready(during) == path  # the copy stays in use while it is revalidated
    assert ready(cache.wait(server.url(), 10)) == path
    assert server.count() == 2
    sent = server.last().headers
    assert sent["If-None-Match"] == ETAG
    assert sent["If-Modified-Since"] == LAST_MODIFIED
    assert cache.get(server.url()).detail == "cached copy, not modified on the server"
    assert cache.entries()[0]["fetched"] == T0 + 300
    clock.now += 299
    cache.get(server.url())
    assert server.count() == 2  # fetched_at moved on: the next check is 300 s later


def test_revalidation_with_new_content_replaces_the_copy(
    make: Maker, server: ImageServer, clock: Clock
) -> None:
    cache = make()
    path = ready(cache.wait(server.url(), 10))
    server.resources["/cernvm4.iso"] = Resource(body=b"version 2", etag='"v2"')
    clock.now += 300
    assert ready(cache.wait(server.url(), 10)) == path
    assert path.read_bytes() == b"version 2"
    assert cache.entries()[0]["sha256"] == hashlib.sha256(b"version 2").hexdigest()
    assert json.loads((path.parent / META_NAME).read_text())["etag"] == '"v2"'


def test_a_server_without_validators_sending_the_same_bytes_keeps_the_file(
    make: Maker, server: ImageServer, clock: Clock
) -> None:
    server.resources["/cernvm4.iso"] = Resource(etag=None, last_modified=None)
    cache = make()
    path = ready(cache.wait(server.url(), 10))
    inode = path.stat().st_ino
    clock.now += 300
    assert ready(cache.wait(server.url(), 10)) == path
    assert server.count() == 2
    assert "If-None-Match" not in server.last().headers
    assert path.stat().st_ino == inode  # running LMs hold this very file open
    assert cache.get(server.url()).detail == "cached copy, not modified on the server"


# --- pinned digests -------------------------------------------------------------------------


def test_a_matching_digest_is_ready_and_never_revalidated(
    make: Maker, server: ImageServer, clock: Clock
) -> None:
    cache = make()
    path = ready(cache.wait(server.url(), 10, DIGEST))
    clock.now += 10_000
    assert ready(cache.get(server.url(), DIGEST)) == path
    assert server.count() == 1


def test_a_mismatching_download_is_discarded(make: Maker, server: ImageServer) -> None:
    cache = make()
    wrong = "sha256:" + "0" * 64
    state = cache.wait(server.url(), 10, wrong)
    assert state.status == "failed"
    assert state.path is None
    got = DIGEST.removeprefix("sha256:")
    assert f"sha256 mismatch: expected {'0' * 64}, got {got}" in state.detail
    assert "\n" not in state.detail
    folder = cache.root / entry_key(server.url())
    assert not (folder / "cernvm4.iso").exists()
    assert [p.name for p in folder.iterdir()] == []  # the temporary file went too


def test_a_copy_of_other_content_is_never_ready_for_a_pinned_digest(
    make: Maker, server: ImageServer
) -> None:
    cache = make()
    path = ready(cache.wait(server.url(), 10))  # no pin: this content
    other = "sha256:" + "1" * 64
    state = cache.wait(server.url(), 10, other)
    assert state.status == "failed"
    assert "sha256 mismatch" in state.detail
    assert server.count() == 2  # fetched again unconditionally: the pin may be the newer one
    # The older copy stays for those it matches, and on disk.
    assert ready(cache.get(server.url())) == path
    assert ready(cache.get(server.url(), DIGEST)) == path
    assert path.read_bytes() == BODY


def test_a_malformed_digest_is_refused(make: Maker, server: ImageServer) -> None:
    state = make().get(server.url(), "md5:abc")
    assert state.status == "failed"
    assert "is not sha256: and 64 hex digits" in state.detail
    assert server.count() == 0


# --- size caps ------------------------------------------------------------------------------


def test_content_length_over_the_cap_fails_at_once(make: Maker, server: ImageServer) -> None:
    server.resources["/cernvm4.iso"] = Resource(body=b"x" * 5000)
    cache = make(max_bytes=1000)
    state = cache.wait(server.url(), 10)
    assert state.status == "failed"
    assert "Content-Length 5000 is over the 1000-byte cap" in state.detail
    assert not (cache.root / entry_key(server.url())).exists()  # nothing was written


def test_a_chunked_body_over_the_cap_is_aborted(make: Maker, server: ImageServer) -> None:
    server.resources["/cernvm4.iso"] = Resource(body=b"x" * 300_000, chunked=True)
    cache = make(max_bytes=100_000)
    state = cache.wait(server.url(), 10)
    assert state.status == "failed"
    assert "more than the 100000-byte cap; download aborted" in state.detail
    assert list((cache.root / entry_key(server.url())).iterdir()) == []


def test_a_chunked_body_under_the_cap_is_fine(make: Maker, server: ImageServer) -> None:
    server.resources["/cernvm4.iso"] = Resource(chunked=True)
    path = ready(make().wait(server.url(), 10))
    assert path.read_bytes() == BODY


def test_a_body_shorter_than_announced_fails(make: Maker, server: ImageServer) -> None:
    server.resources["/cernvm4.iso"] = Resource(length=len(BODY) + 100)
    state = make().wait(server.url(), 10)
    assert state.status == "failed"
    assert server.url() in state.detail


# --- failures: the stale copy, back-off -----------------------------------------------------


def test_a_stopped_server_leaves_the_stale_copy_in_use(
    make: Maker, server: ImageServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make()
    path = ready(cache.wait(server.url(), 10))
    server.stop()
    clock.now += 300
    with caplog.at_level(logging.WARNING, logger="lmrunner.images"):
        state = cache.wait(server.url(), 10)
    assert ready(state) == path
    assert state.detail.startswith(f"stale copy in use: {server.url()}: ConnectionError")
    assert "\n" not in state.detail
    assert path.read_bytes() == BODY
    [record] = caplog.records
    assert "ConnectionError" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_an_http_error_leaves_the_stale_copy_in_use(
    make: Maker, server: ImageServer, clock: Clock
) -> None:
    cache = make()
    path = ready(cache.wait(server.url(), 10))
    server.resources["/cernvm4.iso"].status = 503
    clock.now += 300
    state = cache.wait(server.url(), 10)
    assert ready(state) == path
    assert "stale copy in use" in state.detail
    assert "503" in state.detail
    server.resources["/cernvm4.iso"].status = 200
    clock.now += 30  # the back-off of the failed revalidation
    state = cache.wait(server.url(), 10)
    assert ready(state) == path
    assert state.detail == "cached copy, not modified on the server"


def test_no_copy_fails_then_backs_off(make: Maker, server: ImageServer, clock: Clock) -> None:
    server.resources["/cernvm4.iso"].status = 500
    cache = make()
    state = cache.wait(server.url(), 10)
    assert state.status == "failed"
    assert state.path is None
    assert state.detail.startswith(f"{server.url()}: HTTPError: 500 Server Error")
    assert state.detail.endswith("; next try in 30 s")
    assert server.count() == 1
    for step in (1, 10, 18):  # 29 s: still backing off, no request at all
        clock.now += step
        assert cache.get(server.url()).status == "failed"
    assert server.count() == 1
    clock.now += 1  # 30 s
    assert cache.wait(server.url(), 10).status == "failed"
    assert server.count() == 2
    clock.now += 59  # the second back-off is 60 s
    assert cache.get(server.url()).status == "failed"
    assert server.count() == 2
    clock.now += 1
    assert cache.wait(server.url(), 10).detail.endswith("; next try in 120 s")
    assert server.count() == 3
    server.resources["/cernvm4.iso"].status = 200  # the server is back
    clock.now += 120
    ready(cache.wait(server.url(), 10))
    assert server.count() == 4


def test_back_off_stops_doubling_at_an_hour(make: Maker, server: ImageServer, clock: Clock) -> None:
    server.resources["/cernvm4.iso"].status = 500
    cache = make()
    delays = []
    for _ in range(10):
        state = cache.wait(server.url(), 10)
        delays.append(int(state.detail.rsplit("next try in ", 1)[1].split()[0]))
        clock.now += delays[-1]
    assert delays == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert server.count() == 10


def test_a_session_factory_raising_becomes_a_detail(make: Maker, server: ImageServer) -> None:
    def broken() -> requests.Session:
        raise RuntimeError("no sessions today")

    state = make(session_factory=broken).wait(server.url(), 10)
    assert state.status == "failed"
    assert "unexpected RuntimeError: no sessions today" in state.detail


# --- URLs and redirects ---------------------------------------------------------------------


def test_http_is_refused_unless_allowed(make: Maker, server: ImageServer) -> None:
    cache = make(allow_http=False)
    state = cache.get(server.url())
    assert state.status == "failed"
    assert "expected an https:// URL (or allow_http)" in state.detail
    assert not [t for t in threading.enumerate() if t.name.startswith("image-")]
    assert cache.wait(server.url(), 1).status == "failed"
    assert server.count() == 0
    assert cache.entries() == []
    ready(make(allow_http=True).wait(server.url(), 10))


@pytest.mark.parametrize(
    "url", ["ftp://example.org/a.iso", "file:///etc/passwd", "https://", "https://a b/c.iso"]
)
def test_other_schemes_and_odd_urls_are_refused(make: Maker, url: str) -> None:
    state = make().get(url)
    assert state.status == "failed"
    assert state.path is None
    assert "\n" not in state.detail


def test_redirects_are_followed_when_allowed(make: Maker, server: ImageServer) -> None:
    server.resources["/old.iso"] = Resource(location=server.url())
    cache = make()
    path = ready(cache.wait(server.url("/old.iso"), 10))
    assert path.name == "old.iso"  # named after the URL asked for, whatever it redirected to
    assert path.read_bytes() == BODY
    assert (server.count("/old.iso"), server.count()) == (1, 1)


class Redirector(BaseAdapter):
    """A transport answering every https request with a redirect (no TLS server needed)."""

    def __init__(self, location: str) -> None:
        super().__init__()
        self.location = location
        self.sent: list[str] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(str(request.url))
        reply = requests.Response()
        reply.status_code = 302
        reply.headers["Location"] = self.location
        reply.url = str(request.url)
        reply.request = request
        reply.raw = io.BytesIO()
        return reply

    def close(self) -> None:
        pass


def test_a_redirect_from_https_to_http_is_refused_before_any_http_request(
    make: Maker, server: ImageServer
) -> None:
    redirector = Redirector(server.url())

    def session() -> requests.Session:
        made = requests.Session()
        made.mount("https://", redirector)
        return made

    cache = make(allow_http=True, session_factory=session)  # even with http allowed
    state = cache.wait("https://images.example.org/cernvm4.iso", 10)
    assert state.status == "failed"
    assert state.detail.startswith(
        f"https://images.example.org/cernvm4.iso: redirected to {server.url()}, which is not https"
    )
    assert redirector.sent == ["https://images.example.org/cernvm4.iso"]
    assert server.count() == 0  # never contacted


def test_endless_redirects_fail(make: Maker) -> None:
    redirector = Redirector("https://images.example.org/again.iso")

    def session() -> requests.Session:
        made = requests.Session()
        made.mount("https://", redirector)
        return made

    state = make(session_factory=session).wait("https://images.example.org/a.iso", 10)
    assert state.status == "failed"
    assert "more than 10 redirects" in state.detail
    assert len(redirector.sent) == 11


# --- restarts, leftovers, corrupt metadata --------------------------------------------------


def test_a_restart_finds_the_copy(
    tmp_path: Path, make: Maker, server: ImageServer, clock: Clock
) -> None:
    first = make()
    path = ready(first.wait(server.url(), 10))
    first.close()
    second = make()
    state = second.get(server.url())
    assert ready(state) == path
    assert state.detail == f"cached copy ({size_text(len(BODY))})"
    assert server.count() == 1
    clock.now += 300
    ready(second.wait(server.url(), 10))
    assert server.count() == 2
    assert server.last().headers["If-None-Match"] == ETAG  # the validators were kept too


def test_leftover_temporary_files_are_removed_unless_being_written(
    make: Maker, server: ImageServer
) -> None:
    first = make()
    path = ready(first.wait(server.url(), 10))
    first.close()
    folder = path.parent
    (folder / ".part-abc123").write_bytes(b"half an image")
    (folder / ".part-meta").write_text("{")
    orphan = folder.parent / entry_key("https://example.org/never-finished.iso")
    orphan.mkdir()
    (orphan / ".part-xyz").write_bytes(b"half")
    busy = folder / ".part-busy"
    with busy.open("wb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process's download in progress
        second = make()
        assert busy.exists()
    assert sorted(p.name for p in folder.iterdir()) == [META_NAME, ".part-busy", "cernvm4.iso"]
    assert list(orphan.iterdir()) == []
    assert ready(second.get(server.url())) == path
    assert server.count() == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: meta.write_text("{not json"),
        lambda meta: meta.write_bytes(b"\xff\xfe"),
        lambda meta: meta.write_text("[]"),
        lambda meta: meta.write_text(json.dumps({"url": "https://elsewhere.org/x.iso"})),
        lambda meta: meta.write_text(
            json.dumps({**json.loads(meta.read_text()), "file": "../../etc/passwd"})
        ),
        lambda meta: meta.write_text(json.dumps({**json.loads(meta.read_text()), "size": "12"})),
        lambda meta: (meta.parent / "cernvm4.iso").write_bytes(b"changed behind our back"),
        lambda meta: (meta.parent / "cernvm4.iso").unlink(),
    ],
)
def test_corrupt_metadata_is_no_copy(
    make: Maker, server: ImageServer, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    first = make()
    path = ready(first.wait(server.url(), 10))
    first.close()
    damage(path.parent / META_NAME)
    with caplog.at_level(logging.WARNING, logger="lmrunner.images"):
        second = make()
    assert "treated as no copy" in caplog.text
    assert second.get(server.url()).status == "downloading"
    assert ready(second.wait(server.url(), 10)) == path
    assert path.read_bytes() == BODY
    assert server.count() == 2


def test_a_cached_file_removed_behind_our_back_is_fetched_again(
    make: Maker, server: ImageServer, clock: Clock
) -> None:
    cache = make()
    path = ready(cache.wait(server.url(), 10))
    path.unlink()
    clock.now += 300
    ready(cache.wait(server.url(), 10))
    assert "If-None-Match" not in server.last().headers  # not a conditional GET: no copy
    assert path.read_bytes() == BODY


def test_last_used_reaches_the_metadata_rarely_and_on_close(
    make: Maker, server: ImageServer, clock: Clock
) -> None:
    cache = make()
    path = ready(cache.wait(server.url(), 10, DIGEST))
    meta = path.parent / META_NAME
    clock.now += 60
    cache.get(server.url(), DIGEST)
    assert json.loads(meta.read_text())["last_used"] == T0  # not on every get()
    clock.now += 600
    cache.get(server.url(), DIGEST)
    assert json.loads(meta.read_text())["last_used"] == T0 + 660
    clock.now += 5
    cache.get(server.url(), DIGEST)
    cache.close()
    assert json.loads(meta.read_text())["last_used"] == T0 + 665


# --- prune and close ------------------------------------------------------------------------


def test_prune_removes_only_unused_entries_not_in_use(
    make: Maker, server: ImageServer, clock: Clock
) -> None:
    server.resources["/old.iso"] = Resource(body=b"old")
    server.resources["/recent.iso"] = Resource(body=b"recent")
    cache = make(keep_seconds=3600.0)
    kept = ready(cache.wait(server.url(), 10))
    old = ready(cache.wait(server.url("/old.iso"), 10))
    clock.now += 3000
    recent = ready(cache.wait(server.url("/recent.iso"), 10, None))
    stray = cache.root / entry_key("https://example.org/gone.iso")
    stray.mkdir()
    (stray / "gone.iso").write_bytes(b"no metadata")
    in_use_elsewhere = cache.root / entry_key("https://example.org/in-use.iso")
    in_use_elsewhere.mkdir()
    assert cache.prune([server.url(), "https://example.org/in-use.iso"]) == [stray]
    clock.now += 600  # old: unused for 3600 s now; recent: for 600 s
    removed = cache.prune([server.url(), "https://example.org/in-use.iso"])
    assert removed == [old.parent]
    assert not old.parent.exists()
    assert kept.exists() and recent.exists() and in_use_elsewhere.exists()
    assert [row["url"] for row in cache.entries()] == [server.url(), server.url("/recent.iso")]
    state = cache.get(server.url("/old.iso"))  # asked for again: downloaded again
    assert state.status == "downloading"
    ready(cache.wait(server.url("/old.iso"), 10))
    assert server.count("/old.iso") == 2


def test_prune_leaves_a_running_download(make: Maker, server: ImageServer, clock: Clock) -> None:
    gate = threading.Event()
    server.resources["/cernvm4.iso"] = Resource(gate=gate)
    cache = make(keep_seconds=0.0)
    assert cache.get(server.url()).status == "downloading"
    deadline = time.monotonic() + 5
    folder = cache.root / entry_key(server.url())
    while not (folder.exists() and any(folder.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.01)  # the temporary file exists once the headers are in
    clock.now += 10
    assert cache.prune([]) == []
    gate.set()
    ready(cache.wait(server.url(), 10))


def test_close_stops_a_download_and_removes_its_temporary_file(
    make: Maker, server: ImageServer
) -> None:
    server.resources["/big.iso"] = Resource(body=b"y" * 8_000_000, drip=0.02)
    cache = make()
    assert cache.get(server.url("/big.iso")).status == "downloading"
    folder = cache.root / entry_key(server.url("/big.iso"))
    deadline = time.monotonic() + 5
    while ": 0 bytes of" in cache.entries()[0]["detail"] and time.monotonic() < deadline:
        time.sleep(0.01)
    began = time.monotonic()
    cache.close()
    assert time.monotonic() - began < 3.0
    assert list(folder.iterdir()) == []
    state = cache.get(server.url("/big.iso"))
    assert state.status == "failed"
    assert "closed" in state.detail
    assert server.count("/big.iso") == 1


# --- https ----------------------------------------------------------------------------------


@dataclass
class Pki:
    ca_pem: Path  # the throwaway CA, for ca_path
    context: ssl.SSLContext  # the server's, with a certificate for 127.0.0.1 signed by it


def make_pki(folder: Path) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1: with ``cryptography``, else with
    ``trustme``, else the test is skipped."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        crypto: ModuleType | None = importlib.import_module("cryptography.x509")
    except ImportError:
        crypto = None
    if crypto is None:
        try:
            trustme = importlib.import_module("trustme")
        except ImportError:
            pytest.skip("neither cryptography nor trustme is installed: no throwaway CA")
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        ca.issue_cert("127.0.0.1").configure_cert(context)
        return Pki(folder / "ca.pem", context)
    x509 = crypto
    oid = importlib.import_module("cryptography.x509.oid")
    hashes = importlib.import_module("cryptography.hazmat.primitives.hashes")
    ec = importlib.import_module("cryptography.hazmat.primitives.asymmetric.ec")
    serialization = importlib.import_module("cryptography.hazmat.primitives.serialization")
    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> Any:
        return x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("lmrunner test CA"))
        .issuer_name(name("lmrunner test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    (folder / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context.load_cert_chain(folder / "server.pem", folder / "server.key")
    return Pki(folder / "ca.pem", context)


def test_https_is_verified_against_ca_path(
    tmp_path: Path, make: Maker, caches: list[ImageCache]
) -> None:
    pki = make_pki(tmp_path)
    tls = ImageServer(pki.context)
    try:
        tls.resources["/cernvm4.iso"] = Resource()
        # Trusted through ca_path: downloaded, with http not even allowed.
        path = ready(make(ca_path=pki.ca_pem, allow_http=False).wait(tls.url(), 10, DIGEST))
        assert path.read_bytes() == BODY
        # Not trusted by the default CAs: refused, one line.
        other = ImageCache(
            tmp_path / "other", settings(ca_path=tmp_path / "missing-ca.pem"), clock=Clock()
        )
        caches.append(other)
        state = other.wait(tls.url(), 10)
        assert state.status == "failed"
        assert "\n" not in state.detail
        untrusted = ImageCache(tmp_path / "untrusted", settings(), clock=Clock())
        caches.append(untrusted)
        state = untrusted.wait(tls.url(), 10)
        assert state.status == "failed"
        assert "SSLError" in state.detail
    finally:
        tls.stop()


# --- lmrunner.fetch additions ---------------------------------------------------------------


def test_url_problem() -> None:
    assert url_problem("https://example.org/a.iso", allow_http=False) is None
    assert url_problem("http://example.org/a.iso", allow_http=True) is None
    assert "allow_http" in str(url_problem("http://example.org/a.iso", allow_http=False))
    assert url_problem("https://exa\nmple.org/a", allow_http=False) is not None


def test_fetch_bytes_checks_the_scheme_when_told(server: ImageServer) -> None:
    with pytest.raises(FetchError, match="allow_http"):
        fetch_bytes(server.url(), max_bytes=10**6, timeout=5, allow_http=False)
    assert server.count() == 0
    assert fetch_bytes(server.url(), max_bytes=10**6, timeout=5, allow_http=True) == BODY
    assert fetch_bytes(server.url(), max_bytes=10**6, timeout=5, verify=True) == BODY
