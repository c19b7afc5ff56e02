"""The metadata service of one VM LM, as Vac's VMs had it (vac.md §4.1, §6, §7.1).

QEMU's user networking forwards the guest's TCP connections to ``169.254.169.254:80`` and
``169.254.169.253:80`` (``guestfwd=...-cmd:``) to a new process running this file, its standard
input and output being the connection. Each LM's QEMU starts it with that LM's folder only, so
an LM reaches its own data and nothing else, and needs no host address, bridge or firewall rule.
It runs as QEMU's account (sc_user) in the LM's cgroup: its CPU and memory are the LM's.

Served (GET and HEAD, on both addresses):

- EC2 and OpenStack metadata: ``/latest/user-data``, ``/<date>/user-data``,
  ``/openstack/<version>/user_data`` (and ``user-data``), ``/<version>/meta-data.json``,
  ``/openstack/<version>/meta_data.json`` (and ``meta-data.json``), the EC2 tree
  ``/<version>/meta-data/`` (``instance-id``, ``ami-id``, ``hostname``, ``local-hostname``,
  ``placement/availability-zone``, ``public-keys/0/openssh-key``);
- machine/job features: ``/machinefeatures`` and ``/jobfeatures`` (an HTML list), and each key;
- ``PUT /joboutputs/NAME`` (one path component, at most :data:`PUT_LIMIT` bytes): written
  atomically into the LM's ``joboutputs/``: 201, else 403 (413 when too large).

Anything else is 404. The folders are read and written through :mod:`lmrunner.untrusted` (the
guest also writes ``joboutputs/`` through 9p). Run as a script (:func:`command`),
not as ``-m lmrunner.backends.vm.metadata``: that would import every backend on each connection.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run by QEMU, maybe by another interpreter than the daemon's
    sys.path.insert(0, sys.argv[2])  # the folder lmrunner is imported from (see command())

from lmrunner import untrusted
from lmrunner.layout import root_of

#: The addresses Vac served on (EC2/OpenStack metadata, and MJF); both serve everything here.
METADATA_ADDRESS = "169.254.169.254"
MJF_ADDRESS = "169.254.169.253"
MJF_URL = f"http://{MJF_ADDRESS}"
#: The LM folder's file with what this service says about its LM (written by the VM backend).
METADATA_FILE = "metadata.json"
#: A lingering close reads and drops at most this much, for at most this long.
LINGER_BYTES = 1 << 20
LINGER_SECONDS = 0.5  # the guest is a local slirp link away
#: Largest file one PUT may write into joboutputs (logs, heartbeats, shutdown_message).
PUT_LIMIT = 64 * 1024 * 1024
#: Largest user_data or MJF value served (they are lmrunner's files, this is a safety net).
READ_LIMIT = 16 * 1024 * 1024
#: A connection idle this long is closed; a connection lives this long at most.
IDLE_SECONDS = 30
LIFETIME_SECONDS = 600
FEATURES = ("machinefeatures", "jobfeatures")
_VERSION = r"(?:latest|\d{4}-\d{2}-\d{2})"
_USER_DATA = re.compile(rf"/(?:openstack/)?{_VERSION}/user[-_]data")
_META_JSON = re.compile(rf"/(?:openstack/)?{_VERSION}/meta[-_]data\.json")
_EC2_TREE = re.compile(rf"/{_VERSION}/meta-data(?:/(?P<key>.*))?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")


def describe(
    *,
    uuid: str,
    hostname: str,
    machinetype: str,
    availability_zone: str,
    public_key: str | None,
) -> dict[str, Any]:
    """What :data:`METADATA_FILE` holds (the VM backend writes it at start)."""
    return {
        "uuid": uuid,
        "hostname": hostname,
        "machinetype": machinetype,
        "availability_zone": availability_zone,
        "public_key": public_key,
    }


def meta_data_json(facts: Mapping[str, Any]) -> dict[str, Any]:
    """Vac's ``meta-data.json``: OpenStack's fields, ``meta`` naming the MJF URLs."""
    body: dict[str, Any] = {
        "uuid": facts["uuid"],
        "hostname": facts["hostname"],
        "name": facts["hostname"],
        "availability_zone": facts["availability_zone"],
        "launch_index": 0,
        "meta": {
            "machinetype": facts["machinetype"],
            "machinefeatures": f"{MJF_URL}/machinefeatures",
            "jobfeatures": f"{MJF_URL}/jobfeatures",
            "joboutputs": f"{MJF_URL}/joboutputs",
        },
    }
    if facts.get("public_key"):
        body["public_keys"] = {"0": facts["public_key"]}
    return body


def ec2_tree(facts: Mapping[str, Any]) -> dict[str, str]:
    """EC2's ``meta-data/`` tree, flattened: key path -> value (folders end in ``/``)."""
    tree = {
        "ami-id": facts["uuid"],
        "instance-id": facts["uuid"],
        "hostname": facts["hostname"],
        "local-hostname": facts["hostname"],
        "placement/availability-zone": facts["availability_zone"],
    }
    if facts.get("public_key"):
        tree["public-keys/0/openssh-key"] = facts["public_key"]
        tree["public-keys/"] = "0=lmrunner"  # EC2 lists keys as INDEX=NAME
    return tree


def _listing(tree: Mapping[str, str], prefix: str) -> str | None:
    """The EC2 listing of folder ``prefix`` (``""``: the top), or None when it is no folder."""
    entries: set[str] = set()
    for key in tree:
        if key.startswith(prefix) and key != prefix:
            rest = key[len(prefix) :]
            head, slash, _ = rest.partition("/")
            entries.add(head + slash)
    if prefix == "public-keys/":
        return tree.get(prefix)
    return "\n".join(sorted(entries)) if entries else None


class Handler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection from the guest (keep-alive: several requests)."""

    protocol_version = "HTTP/1.1"  # curl's Expect: 100-continue needs it
    server_version = "lmrunner-metadata"
    sys_version = ""
    lm_dir: Path
    facts: Mapping[str, Any]

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: standard error is the guest's connection too (slirp gives it the socket)."""

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_PUT(self) -> None:
        path = self.path.partition("?")[0]
        folder, _, name = path.strip("/").partition("/")
        if folder != "joboutputs" or not _NAME.fullmatch(name):
            self._drain()
            self._reply(HTTPStatus.FORBIDDEN, b"one name under /joboutputs/ only\n")
            return
        try:
            written = untrusted.replace(
                root_of(self.lm_dir, "joboutputs"), f"joboutputs/{name}", self._body(), PUT_LIMIT
            )
        except _TooLarge:
            self.close_connection = True  # the rest of the body is not read
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"too large\n")
            return
        except (untrusted.UntrustedFileError, OSError, ValueError):
            self.close_connection = True
            self._reply(HTTPStatus.FORBIDDEN, b"cannot write it\n")
            return
        if written:
            self._reply(HTTPStatus.CREATED, b"")
        else:
            self._reply(HTTPStatus.FORBIDDEN, b"a folder of that name exists\n")

    # --- reading ----------------------------------------------------------------------------

    def _get(self, *, head: bool) -> None:
        found = self._lookup(self.path.partition("?")[0])
        if found is None:
            self._reply(HTTPStatus.NOT_FOUND, b"not found\n", head=head)
        else:
            body, kind = found
            self._reply(HTTPStatus.OK, body, kind, head=head)

    def _lookup(self, path: str) -> tuple[bytes, str] | None:
        text = "text/plain; charset=utf-8"
        if _USER_DATA.fullmatch(path):
            data = self._file("user_data")
            return None if data is None else (data, "application/octet-stream")
        if _META_JSON.fullmatch(path):
            return json.dumps(meta_data_json(self.facts), indent=1).encode(), "application/json"
        listings = {
            "": "latest\nopenstack",
            "/latest": "meta-data\nuser-data",
            "/openstack": "latest",
            "/openstack/latest": "meta_data.json\nuser_data\nvendor_data.json",
        }
        if path.rstrip("/") in listings:
            return listings[path.rstrip("/")].encode(), text
        if re.fullmatch(rf"/openstack/{_VERSION}/vendor_data\.json", path):
            return b"{}", "application/json"
        tree_match = _EC2_TREE.fullmatch(path)
        if tree_match:
            tree = ec2_tree(self.facts)
            wanted = tree_match.group("key") or ""
            if wanted in tree and not wanted.endswith("/"):
                return tree[wanted].encode(), text
            prefix = wanted if wanted.endswith("/") or not wanted else wanted + "/"
            folder_listing = _listing(tree, prefix)
            return None if folder_listing is None else (folder_listing.encode(), text)
        folder, _, key = path.strip("/").partition("/")
        if folder in FEATURES:
            if not key:
                return self._features_index(folder), "text/html; charset=utf-8"
            if "/" not in key and key not in (".", ".."):
                data = self._file(f"{folder}/{key}")
                return None if data is None else (data, text)
        return None

    def _file(self, name: str) -> bytes | None:
        try:
            found = untrusted.read(root_of(self.lm_dir, name), name, READ_LIMIT)
        except (untrusted.UntrustedFileError, OSError):
            return None
        return None if found is None else found.data

    def _features_index(self, folder: str) -> bytes:
        items = "".join(
            f'<li><a href="{html.escape(key)}">{html.escape(key)}</a></li>\n'
            for key in untrusted.names(root_of(self.lm_dir, folder), folder)
        )
        return f"<html><body><ul>\n{items}</ul></body></html>\n".encode()

    # --- the request body -----------------------------------------------------------------

    def _body(self) -> Iterator[bytes]:
        """The request body in chunks (Content-Length or chunked), refusing more than the cap."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._chunked()
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > PUT_LIMIT:
            raise _TooLarge
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                raise ValueError("the body ended early")
            length -= len(chunk)
            yield chunk

    def _chunked(self) -> Iterator[bytes]:
        total = 0
        while True:
            size = int(self.rfile.readline(100).split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while self.rfile.readline(1000) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            total += size
            if total > PUT_LIMIT:
                raise _TooLarge
            left = size
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    raise ValueError("the body ended early")
                left -= len(chunk)
                yield chunk
            self.rfile.readline(10)  # the CRLF after each chunk

    def _drain(self) -> None:
        """Skip a refused request's body (the connection is closed instead when it is big)."""
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= 65536:
            self.rfile.read(int(length))
        elif length or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    def _reply(
        self, status: HTTPStatus, body: bytes, kind: str = "text/plain", *, head: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _TooLarge(Exception):
    pass


def serve(connection: socket.socket, lm_dir: Path) -> None:
    """Answer the requests of one connection about the LM in ``lm_dir``."""
    found = untrusted.read(lm_dir, METADATA_FILE, READ_LIMIT)
    if found is None:
        raise FileNotFoundError(lm_dir / METADATA_FILE)
    facts = json.loads(found.data)
    handler = type("LmHandler", (Handler,), {"lm_dir": lm_dir, "facts": facts})
    connection.settimeout(IDLE_SECONDS)
    with contextlib.suppress(OSError, ValueError):
        handler(connection, ("guest", 0), None)
    _linger(connection)


def _linger(connection: socket.socket) -> None:
    """A lingering close (RFC 9112 section 9.6): after an early answer (400, 413, 414) the
    guest may still be sending; closing with its bytes unread makes the kernel send a reset,
    which destroys the answer before the guest reads it. So: no more writes, then read and drop
    what comes, bounded in bytes and time."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(LINGER_SECONDS)
        left = LINGER_BYTES
        while left > 0 and (chunk := connection.recv(min(65536, left))):
            left -= len(chunk)


def command(lm_dir: Path, owner: tuple[int, int]) -> tuple[str, ...] | None:
    """The argv QEMU runs per connection for the LM in ``lm_dir``, as the account ``owner``
    (QEMU's after -runas); None when no Python this account may run is found.

    The daemon's own interpreter may sit where only root can reach it (a pyenv under /root):
    then the system's Python runs this file, importing lmrunner from the daemon's copy.
    """
    package_root = Path(untrusted.__file__).resolve().parent.parent
    script = Path(__file__).resolve()
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if _may_run(Path(python), owner) and _may_read(script, owner):
            return (python, "-I", str(script), str(lm_dir), str(package_root))
    return None


def reachable(lm_dir: Path, owner: tuple[int, int]) -> bool:
    """Whether ``owner`` may list ``lm_dir`` (and so reach its files): the handler runs as it."""
    return _allowed(lm_dir, owner, 0o5) and all(_allowed(p, owner, 0o1) for p in lm_dir.parents)


def _may_run(path: Path, owner: tuple[int, int]) -> bool:
    try:
        real = path.resolve(strict=True)
    except OSError:
        return False
    return _allowed(real, owner, 0o1) and all(_allowed(p, owner, 0o1) for p in real.parents)


def _may_read(path: Path, owner: tuple[int, int]) -> bool:
    return _allowed(path, owner, 0o4) and all(_allowed(p, owner, 0o1) for p in path.parents)


def _allowed(path: Path, owner: tuple[int, int], bit: int) -> bool:
    """Whether ``owner`` (uid, gid) has every permission of ``bit`` (r=4, x=1) on ``path``, by
    its mode."""
    try:
        info = path.stat()
    except OSError:
        return False
    uid, gid = owner
    if uid == 0:
        return True
    if info.st_uid == uid:
        return info.st_mode & (bit << 6) == bit << 6
    if info.st_gid == gid:
        return info.st_mode & (bit << 3) == bit << 3
    return info.st_mode & bit == bit


def main(argv: list[str]) -> int:
    """``THIS_FILE LM_DIR PACKAGE_ROOT``, run by QEMU per guest connection (stdin: the
    connection)."""
    # Standard error is the connection too: nothing may be written there.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    signal.alarm(LIFETIME_SECONDS)  # a connection the guest keeps open does not live for ever
    connection = socket.socket(fileno=os.dup(0))
    try:
        serve(connection, Path(argv[0]))
    except Exception:  # the guest sees the connection close; the LM goes on
        return 1
    finally:
        connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
