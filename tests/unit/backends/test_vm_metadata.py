"""The VM metadata service (``backends/vm/metadata.py``) in process.

slirp gives the handler the guest's TCP connection as its standard input and output; here
:func:`metadata.serve` gets one end of a ``socketpair()`` in a thread, and the other end talks
HTTP/1.1 as the guest would: through :mod:`http.client` (which never connects anywhere by itself
here) or as raw bytes where a client library would hide what is tested (``Expect:
100-continue``, a body that is never sent, a guest that goes away mid-body). One test runs the
handler as the child process QEMU starts.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmrunner.backends.vm import metadata
from lmrunner.untrusted import UntrustedFileError

UUID = "6f1e2d3c-4b5a-4968-8776-655443322110"
HOSTNAME = "factory-00.example.com"
ZONE = "factory.example.com"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx5 root@factory"
USER_DATA = b"#!/bin/sh\nexport JOBOUTPUTS='http://169.254.169.253/joboutputs'\necho hi\n"
MACHINEFEATURES = {"total_cpu": "2", "shutdowntime": "1700086400", "hs06": "20.0"}
JOBFEATURES = {"allocated_cpu": "2\n", "wall_limit_secs": "86400", "job_id": UUID}
TIMEOUT = 10.0  # no socket operation of a test waits longer: a blocked handler fails, not hangs
NOBODY = (65534, 65534)


# --- an LM folder and a connection to its handler -------------------------------------------


def make_lm(top: Path, *, public_key: str | None = KEY) -> Path:
    """An LM folder as the core and the VM backend make it."""
    lm = top / "lm"
    for folder in ("machinefeatures", "jobfeatures", "joboutputs"):
        (lm / folder).mkdir(parents=True)
    (lm / "user_data").write_bytes(USER_DATA)
    for key, value in MACHINEFEATURES.items():
        (lm / "machinefeatures" / key).write_text(value)
    for key, value in JOBFEATURES.items():
        (lm / "jobfeatures" / key).write_text(value)
    facts = metadata.describe(
        uuid=UUID,
        hostname=HOSTNAME,
        machinetype="atlas",
        availability_zone=ZONE,
        public_key=public_key,
    )
    (lm / metadata.METADATA_FILE).write_text(json.dumps(facts))
    return lm


class GuestConnection(http.client.HTTPConnection):
    """http.client over the socket it is given: it must never open a connection of its own (it
    would try the real 169.254.169.254)."""

    def connect(self) -> None:
        raise AssertionError("the service closed the connection and the client would reconnect")


@dataclass
class Service:
    """One guest connection served by :func:`metadata.serve` in a thread."""

    lm: Path
    guest: socket.socket
    thread: threading.Thread
    errors: list[BaseException]

    def http(self) -> GuestConnection:
        conn = GuestConnection(metadata.METADATA_ADDRESS, timeout=TIMEOUT)
        conn.sock = self.guest
        return conn

    def finish(self) -> None:
        """The guest hangs up; the handler must end, having raised nothing."""
        self.guest.close()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the handler did not end when the guest hung up"
        if self.errors:
            raise self.errors[0]

    def ended(self) -> bool:
        self.thread.join(TIMEOUT)
        return not self.thread.is_alive()


def start(lm: Path) -> Service:
    host, guest = socket.socketpair()
    guest.settimeout(TIMEOUT)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            metadata.serve(host, lm)
        except BaseException as err:  # handed to the test
            errors.append(err)
        finally:
            host.close()  # as main() does: slirp sees the connection end

    thread = threading.Thread(target=run, name="metadata-handler", daemon=True)
    thread.start()
    return Service(lm, guest, thread, errors)


@pytest.fixture
def lm(tmp_path: Path) -> Path:
    return make_lm(tmp_path)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host folder outside the LM folder, with a file no guest may read or write."""
    made = tmp_path / "host"
    made.mkdir()
    (made / "secret").write_text("root's secret\n")
    return made


@pytest.fixture
def serve(lm: Path) -> Iterator[Callable[..., Service]]:
    """Start a handler on ``lm`` (or another folder); every one is finished at the end."""
    started: list[Service] = []

    def make(folder: Path = lm) -> Service:
        service = start(folder)
        started.append(service)
        return service

    yield make
    for service in started:
        service.finish()


@pytest.fixture
def conn(serve: Callable[..., Service]) -> GuestConnection:
    return serve().http()


def fetch(
    conn: http.client.HTTPConnection,
    path: str,
    method: str = "GET",
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn.request(method, path, body=body, headers=headers or {})  # type: ignore[arg-type]
    response = conn.getresponse()
    return response.status, response.read(), response


def leftovers(lm: Path) -> list[str]:
    return [p.name for p in (lm / "joboutputs").iterdir() if p.name.startswith(".lmrunner-")]


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]


def raw_response(guest: socket.socket) -> Answer:
    """The next response on a raw connection, read whole. Its reader is closed, so that closing
    ``guest`` really hangs up (a reader left open keeps the descriptor)."""
    response = http.client.HTTPResponse(guest, method="PUT")
    try:
        response.begin()
        return Answer(response.status, response.read(), dict(response.getheaders()))
    finally:
        response.close()


def put_raw(
    guest: socket.socket, path: str, body: bytes = b"", chunks: list[bytes] | None = None
) -> Answer:
    """A PUT written in one piece, then its response. For answers given before the body is
    read: http.client sends the head and the body apart, and a service that answered and closed
    in between would break its second send."""
    if chunks is None:
        head = f"Content-Length: {len(body)}\r\n\r\n".encode()
    else:
        head = b"Transfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [*chunks, b""])
    guest.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\n".encode() + head + body)
    return raw_response(guest)


def read_all(guest: socket.socket) -> bytes:
    """Everything until the service closes the connection."""
    data = b""
    while chunk := guest.recv(65536):
        data += chunk
    return data


def read_head(guest: socket.socket) -> bytes:
    """Bytes up to the end of one response head (a ``100 Continue`` has no body)."""
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        chunk = guest.recv(1)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


# --- pure parts -----------------------------------------------------------------------------


def facts(public_key: str | None = KEY) -> dict[str, object]:
    return metadata.describe(
        uuid=UUID, hostname=HOSTNAME, machinetype="atlas", availability_zone=ZONE,
        public_key=public_key,
    )  # fmt: skip


def test_describe_is_what_metadata_json_holds() -> None:
    assert facts() == {
        "uuid": UUID,
        "hostname": HOSTNAME,
        "machinetype": "atlas",
        "availability_zone": ZONE,
        "public_key": KEY,
    }
    assert json.loads(json.dumps(facts(None)))["public_key"] is None


def test_meta_data_json_names_the_mjf_urls_on_169_254_169_253() -> None:
    body = metadata.meta_data_json(facts())
    assert body == {
        "uuid": UUID,
        "hostname": HOSTNAME,
        "name": HOSTNAME,
        "availability_zone": ZONE,
        "launch_index": 0,
        "meta": {
            "machinetype": "atlas",
            "machinefeatures": "http://169.254.169.253/machinefeatures",
            "jobfeatures": "http://169.254.169.253/jobfeatures",
            "joboutputs": "http://169.254.169.253/joboutputs",
        },
        "public_keys": {"0": KEY},
    }
    assert metadata.MJF_URL == f"http://{metadata.MJF_ADDRESS}" == "http://169.254.169.253"
    assert metadata.METADATA_ADDRESS == "169.254.169.254"


@pytest.mark.parametrize("key", [None, ""])
def test_meta_data_json_without_a_key_has_no_public_keys(key: str | None) -> None:
    body = metadata.meta_data_json(facts(key))
    assert "public_keys" not in body
    assert all(isinstance(v, str) for v in body["meta"].values())  # OpenStack's: strings only


def test_ec2_tree() -> None:
    assert metadata.ec2_tree(facts()) == {
        "ami-id": UUID,
        "instance-id": UUID,
        "hostname": HOSTNAME,
        "local-hostname": HOSTNAME,
        "placement/availability-zone": ZONE,
        "public-keys/0/openssh-key": KEY,
        "public-keys/": "0=lmrunner",
    }
    tree = metadata.ec2_tree(facts(None))
    assert not [key for key in tree if key.startswith("public-keys")]


# --- GET: EC2 and OpenStack metadata ----------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/latest/user-data",
        "/2009-04-04/user-data",
        "/openstack/latest/user_data",
        "/openstack/latest/user-data",
        "/openstack/2012-08-10/user_data",
        "/latest/user-data?ignored=1",
    ],
)
def test_user_data(conn: GuestConnection, path: str) -> None:
    status, body, response = fetch(conn, path)
    assert (status, body) == (200, USER_DATA)
    assert response.getheader("Content-Type") == "application/octet-stream"
    assert response.getheader("Content-Length") == str(len(USER_DATA))
    assert response.version == 11


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data.json",
        "/2009-04-04/meta-data.json",
        "/latest/meta_data.json",
        "/openstack/latest/meta_data.json",
        "/openstack/latest/meta-data.json",
        "/openstack/2012-08-10/meta_data.json",
    ],
)
def test_meta_data_json(conn: GuestConnection, path: str) -> None:
    status, body, response = fetch(conn, path)
    assert status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(body) == metadata.meta_data_json(facts())


def test_openstack_vendor_data_is_empty(conn: GuestConnection) -> None:
    assert fetch(conn, "/openstack/latest/vendor_data.json")[:2] == (200, b"{}")


@pytest.mark.parametrize(
    ("path", "listing"),
    [
        ("/", b"latest\nopenstack"),
        ("/latest", b"meta-data\nuser-data"),
        ("/latest/", b"meta-data\nuser-data"),
        ("/openstack", b"latest"),
        ("/openstack/", b"latest"),
        ("/openstack/latest", b"meta_data.json\nuser_data\nvendor_data.json"),
        ("/openstack/latest/", b"meta_data.json\nuser_data\nvendor_data.json"),
    ],
)
def test_top_listings(conn: GuestConnection, path: str, listing: bytes) -> None:
    assert fetch(conn, path)[:2] == (200, listing)


TOP = b"ami-id\nhostname\ninstance-id\nlocal-hostname\nplacement/\npublic-keys/"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/latest/meta-data", TOP),
        ("/latest/meta-data/", TOP),
        ("/2009-04-04/meta-data/", TOP),
        ("/latest/meta-data/instance-id", UUID.encode()),
        ("/latest/meta-data/ami-id", UUID.encode()),
        ("/latest/meta-data/hostname", HOSTNAME.encode()),
        ("/latest/meta-data/local-hostname", HOSTNAME.encode()),
        ("/latest/meta-data/placement", b"availability-zone"),
        ("/latest/meta-data/placement/", b"availability-zone"),
        ("/latest/meta-data/placement/availability-zone", ZONE.encode()),
        ("/latest/meta-data/public-keys", b"0=lmrunner"),
        ("/latest/meta-data/public-keys/", b"0=lmrunner"),
        ("/latest/meta-data/public-keys/0", b"openssh-key"),
        ("/latest/meta-data/public-keys/0/", b"openssh-key"),
        ("/latest/meta-data/public-keys/0/openssh-key", KEY.encode()),
        ("/2009-04-04/meta-data/public-keys/0/openssh-key", KEY.encode()),
    ],
)
def test_ec2_meta_data_tree(conn: GuestConnection, path: str, body: bytes) -> None:
    status, got, response = fetch(conn, path)
    assert (status, got) == (200, body)
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"


def test_ec2_tree_without_a_public_key(tmp_path: Path, serve: Callable[..., Service]) -> None:
    conn = serve(make_lm(tmp_path / "keyless", public_key=None)).http()
    assert fetch(conn, "/latest/meta-data/")[:2] == (
        200,
        b"ami-id\nhostname\ninstance-id\nlocal-hostname\nplacement/",
    )
    for path in (
        "/latest/meta-data/public-keys",
        "/latest/meta-data/public-keys/",
        "/latest/meta-data/public-keys/0",
        "/latest/meta-data/public-keys/0/openssh-key",
    ):
        assert fetch(conn, path)[0] == 404, path
    meta = json.loads(fetch(conn, "/openstack/latest/meta_data.json")[1])
    assert "public_keys" not in meta and meta["uuid"] == UUID


# --- GET: machine and job features ---------------------------------------------------------


@pytest.mark.parametrize(("folder", "keys"), [("machinefeatures", MACHINEFEATURES),
                                              ("jobfeatures", JOBFEATURES)])  # fmt: skip
def test_features_index_and_keys(conn: GuestConnection, folder: str, keys: dict[str, str]) -> None:
    for path in (f"/{folder}", f"/{folder}/"):
        status, body, response = fetch(conn, path)
        assert status == 200
        assert response.getheader("Content-Type") == "text/html; charset=utf-8"
        items = "".join(f'<li><a href="{k}">{k}</a></li>\n' for k in sorted(keys))
        assert body.decode() == f"<html><body><ul>\n{items}</ul></body></html>\n"
    for key, value in keys.items():
        status, body, response = fetch(conn, f"/{folder}/{key}")
        assert (status, body.decode()) == (200, value)
        assert response.getheader("Content-Type") == "text/plain; charset=utf-8"


def test_features_index_escapes_names(lm: Path, conn: GuestConnection) -> None:
    (lm / "machinefeatures" / 'a&b<"c>').write_text("x")
    body = fetch(conn, "/machinefeatures")[1].decode()
    assert '<a href="a&amp;b&lt;&quot;c&gt;">a&amp;b&lt;&quot;c&gt;</a>' in body
    assert '<"c>' not in body


def test_features_are_read_at_each_request(lm: Path, conn: GuestConnection) -> None:
    """shutdowntime is rewritten in place while the LM runs: the new value is served."""
    assert fetch(conn, "/machinefeatures/shutdowntime")[1] == b"1700086400"
    (lm / "machinefeatures" / "shutdowntime").write_text("1700000000")
    assert fetch(conn, "/machinefeatures/shutdowntime")[1] == b"1700000000"


def test_an_empty_or_missing_features_folder(lm: Path, conn: GuestConnection) -> None:
    shutil.rmtree(lm / "jobfeatures")
    assert fetch(conn, "/jobfeatures")[:2] == (200, b"<html><body><ul>\n</ul></body></html>\n")
    assert fetch(conn, "/jobfeatures/job_id")[0] == 404


# --- HEAD and keep-alive --------------------------------------------------------------------


def test_head_gives_the_length_and_no_body(conn: GuestConnection) -> None:
    status, body, response = fetch(conn, "/latest/user-data", "HEAD")
    assert (status, body) == (200, b"")
    assert response.getheader("Content-Length") == str(len(USER_DATA))
    status, body, response = fetch(conn, "/nowhere", "HEAD")
    assert (status, body) == (404, b"")
    # the connection is still in step: the next answer is the next request's
    assert fetch(conn, "/machinefeatures/total_cpu")[:2] == (200, b"2")


def test_many_requests_on_one_connection(lm: Path, serve: Callable[..., Service]) -> None:
    service = serve()
    conn = service.http()
    for round_ in range(20):
        assert fetch(conn, "/latest/meta-data/instance-id")[:2] == (200, UUID.encode())
        assert fetch(conn, "/jobfeatures/wall_limit_secs")[:2] == (200, b"86400")
        assert fetch(conn, "/no/such/thing")[0] == 404
        assert fetch(conn, "/joboutputs/heartbeat", "PUT", str(round_).encode())[0] == 201
        assert fetch(conn, "/latest/user-data", "HEAD")[0] == 200
        assert service.thread.is_alive()
    assert (lm / "joboutputs" / "heartbeat").read_text() == "19"
    assert service.guest is conn.sock  # never closed, never reconnected


def test_both_addresses_and_any_host_header_serve_the_same(conn: GuestConnection) -> None:
    for host in (metadata.METADATA_ADDRESS, metadata.MJF_ADDRESS, "elsewhere.example"):
        got = fetch(conn, "/machinefeatures/total_cpu", headers={"Host": host})
        assert got[:2] == (200, b"2")


# --- 404s -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/nowhere",
        "/latest/meta-data/nothing",
        "/latest/meta-data/placement/region",
        "/latest/meta-data/public-keys/1/openssh-key",
        "/latest/meta-data/instance-id/",
        "/latest/meta-data/../../metadata.json",
        "/openstack/latest/network_data.json",
        "/openstack/latest/../../user_data",
        "/1.0/user-data",
        "/machinefeatures/absent",
        "/machinefeatures/..",
        "/machinefeatures/.",
        "/machinefeatures/../metadata.json",
        "/machinefeatures/../user_data",
        "/machinefeatures/%2e%2e/metadata.json",
        "/jobfeatures/../../../../etc/passwd",
        "/jobfeatures//etc/passwd",
        "/jobfeatures/./job_id",
        "/joboutputs",
        "/joboutputs/shutdown_message",
        "/metadata.json",
        "/user_data",
        "/lm/metadata.json",
    ],
)
def test_not_found(lm: Path, conn: GuestConnection, path: str) -> None:
    (lm / "joboutputs" / "shutdown_message").write_text("200 done\n")
    status, body, _ = fetch(conn, path)
    assert (status, body) == (404, b"not found\n")


def test_a_key_that_is_a_symlink_to_a_host_file_is_not_served(
    lm: Path, outside: Path, conn: GuestConnection
) -> None:
    (lm / "jobfeatures" / "leak").symlink_to(outside / "secret")
    (lm / "machinefeatures" / "inside").symlink_to(lm / "machinefeatures" / "total_cpu")
    assert fetch(conn, "/jobfeatures/leak")[0] == 404
    assert fetch(conn, "/machinefeatures/inside")[0] == 404  # no link is followed, even inward
    assert fetch(conn, "/machinefeatures/total_cpu")[:2] == (200, b"2")


def test_a_symlinked_features_folder_or_user_data_is_not_served(
    lm: Path, outside: Path, conn: GuestConnection
) -> None:
    shutil.rmtree(lm / "jobfeatures")
    (lm / "jobfeatures").symlink_to(outside)
    (lm / "user_data").unlink()
    (lm / "user_data").symlink_to(outside / "secret")
    assert fetch(conn, "/jobfeatures/secret")[0] == 404
    assert b"secret" not in fetch(conn, "/jobfeatures")[1]
    assert fetch(conn, "/latest/user-data")[0] == 404


def test_a_fifo_key_does_not_block(lm: Path, conn: GuestConnection) -> None:
    os.mkfifo(lm / "machinefeatures" / "pipe")
    assert fetch(conn, "/machinefeatures/pipe")[0] == 404  # within the guest's TIMEOUT
    assert fetch(conn, "/machinefeatures/total_cpu")[:2] == (200, b"2")


def test_a_folder_key_is_not_found(lm: Path, conn: GuestConnection) -> None:
    (lm / "jobfeatures" / "sub").mkdir()
    (lm / "jobfeatures" / "sub" / "x").write_text("x")
    assert fetch(conn, "/jobfeatures/sub")[0] == 404
    assert fetch(conn, "/jobfeatures/sub/x")[0] == 404  # no subfolders, as Vac's


def test_a_missing_user_data_is_not_found(lm: Path, conn: GuestConnection) -> None:
    (lm / "user_data").unlink()
    assert fetch(conn, "/latest/user-data")[0] == 404
    assert fetch(conn, "/openstack/latest/user_data")[0] == 404


def test_other_methods_are_not_implemented(lm: Path, serve: Callable[..., Service]) -> None:
    (lm / "joboutputs" / "log").write_text("kept")
    for method in ("DELETE", "POST"):
        status, _, response = fetch(serve().http(), "/joboutputs/log", method)
        assert status == 501
        assert response.getheader("Connection") == "close"
    assert (lm / "joboutputs" / "log").read_text() == "kept"


# --- PUT /joboutputs/NAME -------------------------------------------------------------------


def test_put_writes_the_file(lm: Path, conn: GuestConnection) -> None:
    status, body, response = fetch(conn, "/joboutputs/shutdown_message", "PUT", b"200 ok\n")
    assert (status, body) == (201, b"")
    assert response.getheader("Content-Length") == "0"
    written = lm / "joboutputs" / "shutdown_message"
    assert written.read_bytes() == b"200 ok\n"
    info = written.lstat()
    assert stat.S_ISREG(info.st_mode) and info.st_nlink == 1
    assert stat.S_IMODE(info.st_mode) & 0o044 == 0o044  # readable by tools, as 9p files are
    assert leftovers(lm) == []


def test_put_to_the_mjf_address_and_a_query(lm: Path, conn: GuestConnection) -> None:
    headers = {"Host": metadata.MJF_ADDRESS}
    assert fetch(conn, "/joboutputs/a.log?x=1", "PUT", b"x", headers)[0] == 201
    assert (lm / "joboutputs" / "a.log").read_bytes() == b"x"


def test_put_replaces_an_existing_file(lm: Path, conn: GuestConnection) -> None:
    (lm / "joboutputs" / "heartbeat").write_text("an old and longer heartbeat\n")
    assert fetch(conn, "/joboutputs/heartbeat", "PUT", b"1")[0] == 201
    assert (lm / "joboutputs" / "heartbeat").read_bytes() == b"1"


@pytest.mark.parametrize("headers", [{}, {"Content-Length": "0"}])
def test_put_of_an_empty_body(lm: Path, conn: GuestConnection, headers: dict[str, str]) -> None:
    conn.putrequest("PUT", "/joboutputs/empty")
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    assert (response.status, response.read()) == (201, b"")
    assert (lm / "joboutputs" / "empty").read_bytes() == b""


def test_put_of_a_large_body(lm: Path, conn: GuestConnection) -> None:
    data = os.urandom(3_000_000)
    assert fetch(conn, "/joboutputs/big", "PUT", data)[0] == 201
    assert (lm / "joboutputs" / "big").read_bytes() == data
    assert leftovers(lm) == []


def test_put_replaces_a_planted_symlink_and_leaves_its_target(
    lm: Path, outside: Path, conn: GuestConnection
) -> None:
    (lm / "joboutputs" / "heartbeat").symlink_to(outside / "secret")
    (lm / "joboutputs" / "to-folder").symlink_to(outside)
    (lm / "joboutputs" / "dangling").symlink_to(outside / "new")
    for name in ("heartbeat", "to-folder", "dangling"):
        assert fetch(conn, f"/joboutputs/{name}", "PUT", b"guest's")[0] == 201
        written = lm / "joboutputs" / name
        assert not written.is_symlink()
        assert written.read_bytes() == b"guest's"
    assert (outside / "secret").read_text() == "root's secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert leftovers(lm) == []


def test_put_refuses_a_name_that_is_a_folder(lm: Path, conn: GuestConnection) -> None:
    (lm / "joboutputs" / "logs").mkdir()
    (lm / "joboutputs" / "logs" / "one").write_text("kept")
    (lm / "joboutputs" / "void").mkdir()
    for name in ("logs", "void"):
        status, body, _ = fetch(conn, f"/joboutputs/{name}", "PUT", b"x")
        assert (status, body) == (403, b"a folder of that name exists\n")
    assert (lm / "joboutputs" / "logs" / "one").read_text() == "kept"
    assert (lm / "joboutputs" / "void").is_dir()
    assert leftovers(lm) == []
    assert fetch(conn, "/machinefeatures/total_cpu")[0] == 200  # the connection goes on


@pytest.mark.parametrize(
    "path",
    [
        "/joboutputs/../escaped",
        "/joboutputs/..",
        "/joboutputs/.",
        "/joboutputs/",
        "/joboutputs",
        "/joboutputs/sub/escaped",
        "/joboutputs//escaped",
        "/joboutputs/.hidden",
        "/joboutputs/.lmrunner-0123456789abcdef",
        "/joboutputs/-dash",
        "/joboutputs/a%2f..%2fescaped",
        "/joboutputs/" + "a" * 256,
        "/machinefeatures/total_cpu",
        "/jobfeatures/escaped",
        "/escaped",
        "/metadata.json",
        "/user_data",
        "/latest/user-data",
        "/lm/joboutputs/escaped",
    ],
)
def test_put_refuses_other_names_and_folders(lm: Path, conn: GuestConnection, path: str) -> None:
    before = {p: p.read_bytes() for p in lm.rglob("*") if p.is_file()}
    status, body, _ = fetch(conn, path, "PUT", b"escaped")
    assert (status, body) == (403, b"one name under /joboutputs/ only\n")
    after = {p: p.read_bytes() for p in lm.rglob("*") if p.is_file()}
    assert after == before
    assert not (lm.parent / "escaped").exists()
    # a small refused body was read: the connection stays usable
    assert fetch(conn, "/machinefeatures/total_cpu")[:2] == (200, b"2")


def test_put_accepts_the_longest_name_and_dots_inside(lm: Path, conn: GuestConnection) -> None:
    for name in ("a" * 255, "job.1+2_3-4.log", "0", "a..b"):
        assert fetch(conn, f"/joboutputs/{name}", "PUT", b"x")[0] == 201, name
        assert (lm / "joboutputs" / name).read_bytes() == b"x"


def test_a_refused_put_with_a_big_body_closes_the_connection(
    lm: Path, serve: Callable[..., Service]
) -> None:
    answer = put_raw(serve().guest, "/joboutputs/../x", b"x" * 70000)
    assert (answer.status, answer.body) == (403, b"one name under /joboutputs/ only\n")
    assert answer.headers["Connection"] == "close"


def test_put_through_a_symlinked_joboutputs_writes_nothing(
    lm: Path, outside: Path, serve: Callable[..., Service]
) -> None:
    shutil.rmtree(lm / "joboutputs")
    (lm / "joboutputs").symlink_to(outside)
    answer = put_raw(serve().guest, "/joboutputs/secret", b"overwritten")
    assert (answer.status, answer.body) == (403, b"cannot write it\n")
    assert answer.headers["Connection"] == "close"
    assert (outside / "secret").read_text() == "root's secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_put_without_a_joboutputs_folder_is_refused(
    lm: Path, serve: Callable[..., Service]
) -> None:
    shutil.rmtree(lm / "joboutputs")
    assert put_raw(serve().guest, "/joboutputs/x", b"x").status == 403
    assert not (lm / "joboutputs").exists()


def test_put_with_expect_100_continue(lm: Path, serve: Callable[..., Service]) -> None:
    """curl sends ``Expect: 100-continue`` for bodies above 1 MiB and waits for the 100."""
    guest = serve().guest
    data = b"y" * 2_000_000
    guest.sendall(
        b"PUT /joboutputs/big HTTP/1.1\r\nHost: 169.254.169.253\r\n"
        + f"Content-Length: {len(data)}\r\n".encode()
        + b"Expect: 100-continue\r\n\r\n"
    )
    assert read_head(guest) == b"HTTP/1.1 100 Continue\r\n\r\n"
    guest.sendall(data)
    assert raw_response(guest).status == 201
    assert (lm / "joboutputs" / "big").read_bytes() == data


def test_put_chunked(lm: Path, conn: GuestConnection) -> None:
    parts = [b"first line\n", b"", b"x" * 100_000, b"last\n"]
    status, _, _ = fetch(conn, "/joboutputs/log", "PUT", iter(parts))  # http.client: chunked
    assert status == 201
    assert (lm / "joboutputs" / "log").read_bytes() == b"".join(parts)
    assert fetch(conn, "/jobfeatures/job_id")[:2] == (200, UUID.encode())  # still in step


def test_put_chunked_with_extensions_and_trailers(lm: Path, serve: Callable[..., Service]) -> None:
    guest = serve().guest
    guest.sendall(
        b"PUT /joboutputs/log HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\nA\r\n, world!!\n\r\n0\r\nX-Trailer: 1\r\n\r\n"
        b"GET /machinefeatures/total_cpu HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answers = read_all(guest)  # both, pipelined: the body was read exactly to its end
    assert answers.startswith(b"HTTP/1.1 201 Created\r\n")
    assert answers.count(b"HTTP/1.1 ") == 2
    assert answers.partition(b"\r\n\r\n")[2].startswith(b"HTTP/1.1 200 OK\r\n")
    assert answers.endswith(b"\r\n\r\n2")
    assert (lm / "joboutputs" / "log").read_bytes() == b"hello, world!!\n"


@pytest.mark.parametrize("size", [0, 1, 999, 1000])
def test_put_up_to_the_limit_is_written(
    lm: Path, conn: GuestConnection, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(metadata, "PUT_LIMIT", 1000)
    assert fetch(conn, "/joboutputs/f", "PUT", b"z" * size)[0] == 201
    assert (lm / "joboutputs" / "f").stat().st_size == size


@pytest.mark.parametrize("chunked", [False, True])
def test_put_over_the_limit_is_413_and_writes_nothing(
    lm: Path, serve: Callable[..., Service], monkeypatch: pytest.MonkeyPatch, chunked: bool
) -> None:
    monkeypatch.setattr(metadata, "PUT_LIMIT", 1000)
    (lm / "joboutputs" / "f").write_text("before")
    guest = serve().guest
    if chunked:  # the first chunk is read and written, the second is one byte too many
        answer = put_raw(guest, "/joboutputs/f", chunks=[b"z" * 600, b"z" * 401])
    else:
        answer = put_raw(guest, "/joboutputs/f", b"z" * 1001)
    assert (answer.status, answer.body) == (413, b"too large\n")
    assert answer.headers["Connection"] == "close"
    assert (lm / "joboutputs" / "f").read_text() == "before"
    assert leftovers(lm) == []


def test_a_content_length_over_the_limit_is_refused_without_reading(
    lm: Path, serve: Callable[..., Service]
) -> None:
    """The body is never sent: a handler that waited for it would never answer."""
    guest = serve().guest
    guest.sendall(
        b"PUT /joboutputs/huge HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Length: {metadata.PUT_LIMIT + 1}\r\n\r\n".encode()
    )
    answer = raw_response(guest)
    assert (answer.status, answer.body) == (413, b"too large\n")
    assert answer.headers["Connection"] == "close"
    assert guest.recv(1) == b""  # closed, the rest unread
    assert not (lm / "joboutputs" / "huge").exists()
    assert leftovers(lm) == []


@pytest.mark.parametrize("length", ["-5", "abc", "1e3"])
def test_a_bad_content_length_is_refused(
    lm: Path, serve: Callable[..., Service], length: str
) -> None:
    guest = serve().guest
    guest.sendall(
        b"PUT /joboutputs/f HTTP/1.1\r\nHost: x\r\n" + f"Content-Length: {length}\r\n\r\n".encode()
    )
    assert raw_response(guest).status == 403
    assert not (lm / "joboutputs" / "f").exists()
    assert leftovers(lm) == []


@pytest.mark.parametrize("how", ["close", "shutdown"])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_guest_that_goes_away_mid_body_leaves_no_file(
    lm: Path, serve: Callable[..., Service], how: str, chunked: bool
) -> None:
    service = serve()
    guest = service.guest
    if chunked:
        head = b"Transfer-Encoding: chunked\r\n\r\n"
        partial = b"400\r\n" + b"p" * 100
    else:
        head = b"Content-Length: 1000\r\n\r\n"
        partial = b"p" * 100
    guest.sendall(b"PUT /joboutputs/partial HTTP/1.1\r\nHost: x\r\n" + head + partial)
    if how == "shutdown":
        guest.shutdown(socket.SHUT_WR)
        assert raw_response(guest).status == 403
    else:
        guest.close()
    assert service.ended()
    assert sorted(p.name for p in (lm / "joboutputs").iterdir()) == []


def test_put_of_a_name_the_guest_also_writes_through_9p(lm: Path, conn: GuestConnection) -> None:
    """The folder is shared: a name written both ways ends with the last complete write."""
    (lm / "joboutputs" / "heartbeat").write_text("from 9p")
    assert fetch(conn, "/joboutputs/heartbeat", "PUT", b"from http")[0] == 201
    assert (lm / "joboutputs" / "heartbeat").read_text() == "from http"


# --- robustness ------------------------------------------------------------------------------


def test_nothing_is_written_to_standard_error(
    lm: Path, serve: Callable[..., Service], capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Under slirp standard error is the guest's connection: a log line would corrupt it."""
    monkeypatch.setattr(metadata, "IDLE_SECONDS", 0.3)
    conn = serve().http()
    fetch(conn, "/latest/user-data")
    fetch(conn, "/nowhere")
    fetch(conn, "/nowhere", "HEAD")
    fetch(conn, "/joboutputs/x", "PUT", b"x")
    fetch(conn, "/joboutputs/../x", "PUT", b"x")
    fetch(conn, "/joboutputs/x", "DELETE")  # 501 (send_error logs)
    for request in (b"NONSENSE\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
        guest = serve().guest
        guest.sendall(request)
        assert b"Error code: 4" in read_all(guest)  # 400 and 414
    idle = serve()  # times out after IDLE_SECONDS (logged as an error by http.server)
    assert idle.ended()
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_an_idle_connection_is_closed(
    serve: Callable[..., Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metadata, "IDLE_SECONDS", 0.2)
    service = serve()
    conn = service.http()
    assert fetch(conn, "/machinefeatures/total_cpu")[0] == 200
    assert service.ended()  # the guest said nothing more
    assert service.guest.recv(1) == b""


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (b"GET\r\n\r\n", b"400"),
        (b"GET / HTTP/x.y\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\n\r\n", b"505"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"GET / HTTP/1.1\r\n" + b"H: v\r\n" * 101 + b"\r\n", b"431"),
    ],
)
def test_a_bad_request_is_answered_and_the_connection_ends(
    serve: Callable[..., Service], request_: bytes, code: bytes
) -> None:
    """http.server's own answers (an unparsable request line gets an HTTP/0.9-style body)."""
    service = serve()
    service.guest.sendall(request_)
    assert b"Error code: " + code in read_all(service.guest)
    assert service.ended()


def test_serve_needs_the_metadata_file(lm: Path, outside: Path) -> None:
    (lm / metadata.METADATA_FILE).unlink()
    host, guest = socket.socketpair()
    with host, guest, pytest.raises(FileNotFoundError):
        metadata.serve(host, lm)
    (lm / metadata.METADATA_FILE).symlink_to(outside / "secret")
    host, guest = socket.socketpair()
    with host, guest, pytest.raises(UntrustedFileError):
        metadata.serve(host, lm)


def test_each_lm_sees_its_own_folder_only(tmp_path: Path, serve: Callable[..., Service]) -> None:
    one = make_lm(tmp_path / "one")
    two = make_lm(tmp_path / "two", public_key=None)
    other = metadata.describe(
        uuid="other-uuid",
        hostname="factory-01.example.com",
        machinetype="lhcb",
        availability_zone=ZONE,
        public_key=None,
    )
    (two / metadata.METADATA_FILE).write_text(json.dumps(other))
    (two / "machinefeatures" / "total_cpu").write_text("8")
    first, second = serve(one).http(), serve(two).http()
    assert fetch(first, "/latest/meta-data/instance-id")[1] == UUID.encode()
    assert fetch(second, "/latest/meta-data/instance-id")[1] == b"other-uuid"
    assert fetch(first, "/machinefeatures/total_cpu")[1] == b"2"
    assert fetch(second, "/machinefeatures/total_cpu")[1] == b"8"
    assert fetch(second, "/joboutputs/mine", "PUT", b"2")[0] == 201
    assert not (one / "joboutputs" / "mine").exists()
    assert (two / "joboutputs" / "mine").read_bytes() == b"2"


# --- command() and reachable() --------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """A 0755 folder outside pytest's 0700 tree, so other accounts can reach into it."""
    top = Path(tempfile.mkdtemp(prefix="lmrunner-metadata-test-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def folder(path: Path, mode: int, owner: tuple[int, int] = (0, 0)) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, *owner)
    path.chmod(mode)
    return path


def test_root_reaches_everything(site: Path) -> None:
    lm = folder(folder(site / "state", 0o700) / "lm", 0o700)
    assert metadata.reachable(lm, (0, 0))
    assert not metadata.reachable(site / "absent", (0, 0))


@pytest.mark.parametrize(
    ("state_mode", "lm_mode", "owner", "expected"),
    [
        (0o755, 0o755, NOBODY, True),
        (0o711, 0o755, NOBODY, True),  # parents: traversable is enough
        (0o700, 0o755, NOBODY, False),  # a parent it cannot pass
        (0o744, 0o755, NOBODY, False),  # readable is not traversable
        (0o755, 0o711, NOBODY, False),  # the LM folder itself must be listable
        (0o755, 0o751, NOBODY, False),
        (0o755, 0o705, NOBODY, True),
        (0o750, 0o750, (1000, 0), True),  # by its group
        (0o705, 0o755, (1000, 0), False),  # the group's bits count, not the others'
        (0o755, 0o705, (1000, 0), False),
    ],
)
def test_reachable_by_the_mode_bits(
    site: Path, state_mode: int, lm_mode: int, owner: tuple[int, int], expected: bool
) -> None:
    state = folder(site / "state", state_mode)
    lm = folder(state / "lm", lm_mode)
    assert metadata.reachable(lm, owner) is expected


def test_reachable_by_the_owner_bits(site: Path) -> None:
    account = (1000, 1000)
    state = folder(site / "state", 0o700, account)
    assert metadata.reachable(folder(state / "lm", 0o500, account), account)
    assert not metadata.reachable(folder(state / "lm2", 0o077, account), account)  # owner: none
    lm = folder(folder(site / "closed", 0o755, account) / "lm", 0o755)
    assert metadata.reachable(lm, account)
    (site / "closed").chmod(0o077)  # its owner may not pass, whatever the others may
    assert not metadata.reachable(lm, account)
    assert not metadata.reachable(state / "lm", (1001, 1001))  # another account: 0700 parent
    assert not metadata.reachable(state / "lm", (1001, 1000))  # its group: no bits either


def test_command_is_this_interpreter_running_this_file(lm: Path) -> None:
    argv = metadata.command(lm, (0, 0))
    assert argv is not None
    python, isolated, script, lm_dir, package_root = argv
    assert python == sys.executable
    assert isolated == "-I"
    assert script == str(Path(metadata.__file__).resolve())
    assert script.endswith("metadata.py")
    assert lm_dir == str(lm)
    assert (Path(package_root) / "lmrunner" / "untrusted.py").is_file()


def test_command_falls_back_to_a_python_the_account_may_run(
    site: Path, lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = Path("/usr/bin/python3")
    try:
        real = system.resolve(strict=True)
    except OSError:
        pytest.skip("no /usr/bin/python3 on this host")
    if not all(p.stat().st_mode & 0o001 for p in (real, *real.parents)):
        pytest.skip("/usr/bin/python3 is not runnable by others on this host")
    script = site / "metadata.py"
    shutil.copy(metadata.__file__, script)
    script.chmod(0o644)
    monkeypatch.setattr(metadata, "__file__", str(script))
    locked = folder(site / "root-only", 0o700)
    private = locked / "python3"
    private.write_text("")
    private.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(private))
    argv = metadata.command(lm, NOBODY)
    assert argv is not None and argv[0] == str(system)
    assert argv[2] == str(script)
    as_root = metadata.command(lm, (0, 0))
    assert as_root is not None and as_root[0] == str(private)  # root may run the private one
    # a link in an open folder to a Python in a closed one: the link's target counts
    link = folder(site / "open", 0o755) / "python3"
    link.symlink_to(private)
    monkeypatch.setattr(sys, "executable", str(link))
    argv = metadata.command(lm, NOBODY)
    assert argv is not None and argv[0] == str(system)


def test_command_is_none_when_the_account_cannot_read_the_handler(
    site: Path, lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = folder(site / "root-only", 0o700)
    script = locked / "metadata.py"
    shutil.copy(metadata.__file__, script)
    monkeypatch.setattr(metadata, "__file__", str(script))
    assert metadata.command(lm, NOBODY) is None
    script.chmod(0o600)
    locked.chmod(0o755)
    assert metadata.command(lm, NOBODY) is None  # the file itself is not readable
    assert metadata.command(lm, (0, 0)) is not None


# --- the handler as QEMU runs it ----------------------------------------------------------------


@pytest.mark.allow_subprocess
@pytest.mark.parametrize("account", ["root", "nobody"])
def test_the_handler_as_a_child_process_with_the_connection_as_stdin_and_stdout(
    site: Path, account: str
) -> None:
    """As slirp runs it: ``argv`` from :func:`metadata.command` for QEMU's account, standard
    input, output and error all the connection, a bare environment; several requests, then the
    guest hangs up. As ``nobody`` (QEMU's account after -runas), the Python found for it runs the
    handler, reading the LM's files and writing its joboutputs (owned by that account, as the
    core gives it to sc_user)."""
    owner = (0, 0) if account == "root" else NOBODY
    if account == "nobody" and os.geteuid() != 0:
        pytest.skip("needs root to start a process as another account")
    lm = make_lm(site)
    os.chown(lm / "joboutputs", *owner)
    argv = metadata.command(lm, owner)
    if argv is None:
        pytest.skip(f"no Python that uid {owner[0]} may run, and the handler it may read")
    as_root = account == "root"
    host, guest = socket.socketpair()
    guest.settimeout(30)  # the child imports lmrunner first
    with host:
        child = subprocess.Popen(
            argv, stdin=host.fileno(), stdout=host.fileno(), stderr=host.fileno(),
            env={"PATH": "/usr/bin:/bin"}, cwd=site, close_fds=True,
            user=None if as_root else owner[0], group=None if as_root else owner[1],
            extra_groups=None if as_root else [],
        )  # fmt: skip
    try:
        conn = GuestConnection(metadata.METADATA_ADDRESS)
        conn.sock = guest
        assert fetch(conn, "/latest/meta-data/instance-id")[:2] == (200, UUID.encode())
        assert fetch(conn, "/latest/user-data")[:2] == (200, USER_DATA)
        assert fetch(conn, "/jobfeatures/job_id")[:2] == (200, UUID.encode())
        assert fetch(conn, "/jobfeatures/../metadata.json")[0] == 404
        assert fetch(conn, "/joboutputs/heartbeat", "PUT", b"12345")[0] == 201
        assert fetch(conn, "/joboutputs/../x", "PUT", b"x")[0] == 403
        guest.shutdown(socket.SHUT_WR)
        assert guest.recv(100) == b""  # nothing else came on the connection (no stderr)
        assert child.wait(30) == 0
    finally:
        guest.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    written = lm / "joboutputs" / "heartbeat"
    assert written.read_bytes() == b"12345"
    assert (written.stat().st_uid, written.stat().st_gid) == owner
    assert leftovers(lm) == []
    assert not (lm / "x").exists()


@pytest.mark.allow_subprocess
def test_the_child_without_its_metadata_file_closes_the_connection(tmp_path: Path) -> None:
    lm = make_lm(tmp_path)
    (lm / metadata.METADATA_FILE).unlink()
    argv = metadata.command(lm, (0, 0))
    assert argv is not None
    host, guest = socket.socketpair()
    guest.settimeout(30)
    with host:
        child = subprocess.Popen(argv, stdin=host.fileno(), stdout=host.fileno(),
                                 stderr=host.fileno(), env={}, close_fds=True)  # fmt: skip
    with guest:
        assert guest.recv(100) == b""  # no answer, no traceback: the connection just ends
    assert child.wait(30) == 1
