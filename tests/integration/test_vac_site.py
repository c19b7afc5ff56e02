"""A Vac site runs unchanged: its vac.conf, converted by ``lmrunner import-vac-conf``, names its
images, user_data and Vacuum Pipe by ``https://`` URL, and the real daemon runs real LMs from them.

One HTTPS server with its own CA (trustme) serves an Apptainer SIF and a VM kernel built from
vcbusybox, the user_data templates and the pipe's JSON, counting every request. The test proves:

- LMs of every machinetype start, the pipe's included (a new install: the daemon fetches the
  pipe itself, nobody runs ``check --refresh-pipes``);
- each image is downloaded once for all the LMs that use it;
- a changed pipe document is applied by the running daemon within its ``cache_seconds``;
- with the server stopped, new LMs still start from the cached image (and the last good
  user_data), and the pipe's last good copy stays in use.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.lifecycle import LmState
from tests.integration import daemons
from tests.integration.conftest import REPO, remove_lms

trustme = pytest.importorskip("trustme", reason="trustme (dev extra) makes the test CA")

pytestmark = [pytest.mark.apptainer, pytest.mark.qemu, pytest.mark.slow]

CACHE_SECONDS = 5
DONE = "200 Intended work completed ok"
SC_PAYLOAD = f"#!/bin/sh\nsleep 2\necho '{DONE}' > \"$JOBOUTPUTS/shutdown_message\"\n"
# As Vac's VM payloads: MJF from the metadata service's URL (busybox wget: GET only; the
# message goes through the 9p share that URL's folder is also shared as).
VM_PAYLOAD = (
    "#!/bin/sh\n"
    "mf='##user_data_machinefeatures_url##'\n"
    'cpus=$(wget -qO- "$mf/total_cpu") && [ "$cpus" = 1 ] || exit 1\n'
    f"echo '{DONE}' > /var/spool/joboutputs/shutdown_message\n"
)


class Server:
    """An HTTPS server of fixed files with ETag/Last-Modified, counting (method, path, status)."""

    def __init__(self, ca: Any, files: dict[str, bytes]) -> None:
        self.files = files
        self.counts: Counter[tuple[str, str, int]] = Counter()
        self.modified = email.utils.formatdate(time.time() - 60, usegmt=True)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = server.files.get(self.path)
                if body is None:
                    return self._send(404, b"")
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                if self.headers.get("If-None-Match") == etag:
                    return self._send(304, b"", etag)
                self._send(200, body, etag)

            def _send(self, status: int, body: bytes, etag: str | None = None) -> None:
                server.counts[("GET", self.path, status)] += 1
                self.send_response(status)
                if etag:
                    self.send_header("ETag", etag)
                    self.send_header("Last-Modified", server.modified)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.base = f"https://localhost:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def downloads(self, path: str) -> int:
        return self.counts[("GET", path, 200)]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def site_dir() -> Iterator[Path]:
    """A 0755 folder outside pytest's 0700 tree: LM accounts (sc_user) must reach LM folders."""
    top = Path(tempfile.mkdtemp(prefix="lmrunner-vac-site-"))
    top.chmod(0o755)
    yield top
    subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


def vac_conf(base: str) -> str:
    """A Vac site's configuration, as vac.md §2 describes it (INI, Vac's names)."""
    return f"""\
[settings]
vac_space = site.example.com
total_processors = 2
mb_per_processor = 256
disk_gb_per_processor = 0
singularity_user = lmrunner-sc

[machinetype sc]
machine_model = singularity
root_image = {base}/images/vcbusybox.sif
user_data = {base}/user_data/sc
target_share = 1
fizzle_seconds = 0
max_wallclock_seconds = 600

[machinetype vm]
machine_model = vm-raw
root_image = {base}/images/vcbusybox-vmlinuz
user_data = {base}/user_data/vm
target_share = 1
fizzle_seconds = 0
max_wallclock_seconds = 600

[vacuum_pipe pipe]
vacuum_pipe_url = {base}/pipe.json
target_share = 1
"""


def pipe_document(base: str, *suffixes: str) -> bytes:
    entries = [
        {
            "suffix": suffix,
            "machine_model": "singularity",
            "root_image": f"{base}/images/vcbusybox.sif",
            "user_data": f"{base}/user_data/sc",
            "target_share": 1,
            "fizzle_seconds": 0,
            "max_wallclock_seconds": 600,
        }
        for suffix in suffixes
    ]
    return json.dumps({"cache_seconds": CACHE_SECONDS, "machinetypes": entries}).encode()


def finished(state: Path, machinetype: str, after: float = 0.0) -> list[Any]:
    snap = daemons.snapshot_retrying(state)
    records = [] if snap is None else snap.records
    return [
        r
        for r in records
        if r.machinetype == machinetype and r.state is LmState.FINISHED and r.created >= after
    ]


def wait(what: str, done: Any, timeout: float, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert daemon.poll() is None, f"daemon exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, (
            f"{what}: not within {timeout} s\n{log.read_text()[-4000:]}"
        )
        time.sleep(0.5)


def test_a_converted_vac_site_runs_from_https_images_user_data_and_a_live_pipe(
    site_dir: Path, vcbusybox: Path, sc_user: str, apptainer: str, qemu: str
) -> None:
    sif = vcbusybox / "apptainer" / "vcbusybox.sif"
    kernel, initrd = vcbusybox / "vm" / "vmlinuz", vcbusybox / "vm" / "initramfs.cpio.gz"
    for needed in (sif, kernel, initrd):
        assert needed.is_file(), f"{needed}: run scripts/bootstrap"
    ca = trustme.CA()
    ca_file = site_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    files: dict[str, bytes] = {}
    server = Server(ca, files)
    base = server.base
    files.update({
        "/images/vcbusybox.sif": sif.read_bytes(),
        "/images/vcbusybox-vmlinuz": kernel.read_bytes(),
        "/user_data/sc": SC_PAYLOAD.encode(),
        "/user_data/vm": VM_PAYLOAD.encode(),
        "/pipe.json": pipe_document(base, "sif"),
    })  # fmt: skip
    try:
        _run_site(site_dir, server, ca_file, initrd)
    finally:
        server.stop()


def _run_site(site_dir: Path, server: Server, ca_file: Path, initrd: Path) -> None:
    base = server.base
    state = site_dir / "state"
    (site_dir / "vac.conf").write_text(vac_conf(base))
    converted = subprocess.run(
        [sys.executable, "-m", "lmrunner", "import-vac-conf", str(site_dir / "vac.conf")],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    assert "disk_gb_per_processor" in converted.stderr  # Vac's 0 said plainly, not dropped
    config = site_dir / "lmrunner.yaml"
    config.write_text(converted.stdout)
    # What the admin adds beside the converted file: this host's names, the site's CA (Vac
    # used /etc/grid-security/certificates), and the VM kernel's initramfs (no Vac option).
    (site_dir / "conf.d").mkdir()
    (site_dir / "conf.d" / "host.yaml").write_text(yaml.safe_dump({
        "factory": {
            "hostname": "vacsite.example.com",
            "state_dir": str(state),
            "ca_path": str(ca_file),
            "cgroup_parent": f"/lmrunner-test-vacsite-{uuid.uuid4().hex[:8]}",
            "vm_accel": "tcg",
        },
        "machinetypes": {"vm": {"vm_initrd": str(initrd)}},
    }))  # fmt: skip
    check = daemons.cli(config, "check", "--no-probe", timeout=120)
    assert check.returncode == 0, check.text()
    assert "is not downloaded yet" in check.text()  # said, not silently passed

    log = site_dir / "daemon.log"
    daemon = daemons.start(config, log, "--reconcile", "2")
    try:
        # A new install: the daemon fetches the pipe itself; every type's LMs run to 200.
        def all_ran() -> bool:
            return (
                len(finished(state, "sc")) >= 2
                and len(finished(state, "pipe-sif")) >= 2
                and len(finished(state, "vm")) >= 1
            )

        wait("LMs of every machinetype", all_ran, 300, daemon, log)
        for name in ("sc", "pipe-sif", "vm"):
            for record in finished(state, name):
                assert record.outcome is not None and record.outcome.code == 200, record
        # One download of each image for all its LMs (two machinetypes share the SIF).
        assert server.downloads("/images/vcbusybox.sif") == 1, server.counts
        assert server.downloads("/images/vcbusybox-vmlinuz") == 1, server.counts

        # A changed pipe document is applied by the running daemon within cache_seconds.
        server.files["/pipe.json"] = pipe_document(base, "sif", "new")
        changed = time.time()
        wait("the pipe's new machinetype", lambda: finished(state, "pipe-new"), 120, daemon, log)
        first_new = finished(state, "pipe-new")[0]
        assert first_new.created - changed < CACHE_SECONDS + 20, (first_new.created, changed)
        assert "machinetype pipe-new added" in log.read_text()
        assert server.downloads("/images/vcbusybox.sif") == 1, server.counts

        # The server goes away: new LMs start from the cached image and the last good user_data;
        # the pipe's last good copy stays (its types keep starting).
        server.stop()
        stopped = time.time()

        def ran_after_stop() -> bool:
            return len(finished(state, "sc", stopped)) >= 1 and (
                len(finished(state, "pipe-sif", stopped))
                + len(finished(state, "pipe-new", stopped))
                >= 1
            )

        wait("LMs after the server stopped", ran_after_stop, 180, daemon, log)
        # The pipe's next refresh comes when its cache_seconds run out, which may be after
        # those LMs (CI saw it so once).
        wait("the pipe's failed refresh", lambda: "keeping the last good copy" in log.read_text(),
             60, daemon, log)  # fmt: skip
        for record in finished(state, "sc", stopped) + finished(state, "pipe-new", stopped):
            assert record.outcome is not None and record.outcome.code == 200, record
        text = log.read_text()
        assert "using the last good copy" in text  # user_data
        assert "keeping the last good copy" in text  # the pipe
    finally:
        daemons.stop(daemon)
        with contextlib.suppress(Exception):
            remove_lms(config)
