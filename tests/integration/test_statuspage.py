"""The daemon's status page (``/`` on ``factory.metrics_listen``) in a real headless browser.

A real ``lmrunner daemon`` runs fake LMs of two machinetypes: ``long`` (an hour) and ``nowork``
(ends after a second with ``300 No more work``, then backs off for an hour). Its configuration
holds a secret in ``user_data_options`` (factory and machinetype) and in the ``user_data`` file.
Proven here:

- (a) Chromium (Debian's ``/usr/bin/chromium``, ``--headless --dump-dom``) renders ``/`` into a
  DOM whose text names the factory's hostname, each machinetype, each running LM (as the store
  has them) and the ``300 No more work`` outcome; it holds three inline ``<svg>`` plots, each in
  a ``<figure>`` with its ``<figcaption>``, no ``<script>`` and no ``src=``/``href=`` to an
  http(s) (or protocol-relative) URL; the secret is nowhere in the page (served or rendered)
  nor in ``/metrics``.
- (b) Chromium screenshots the page at a phone's 390x844 and a desktop's 1280x900: both are
  valid PNGs of that size, larger than a few KB (not blank); they are kept in
  ``build/test-artefacts/`` (git-ignored) for a human to look at.
- (c) Without a browser, the served HTML converted to text with ``html.parser`` (as a terminal
  browser would show it: one line per table row, cells in order) reads: the machinetypes table
  has one line per machinetype with its backend, the running LMs table one line per LM with its
  machinetype and state, and the recent ends name the nowork LM with its outcome.

Under ``CI=true`` a missing Chromium fails the tests; elsewhere they skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
import yaml

from lmrunner.lifecycle import LmState
from lmrunner.state import LmRecord, Store
from tests.integration.conftest import REPO, TIMESCALE, remove_lms

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
#: Chromium can be slow to start on this 2-core host.
BROWSER_TIMEOUT = 60.0 * TIMESCALE
HOSTNAME = "statuspage.example.com"
SECRET = "S3CR3T-DO-NOT-SHOW"
ARTEFACTS = REPO / "build" / "test-artefacts"  # /build/ is in .gitignore
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 5000
LONG = {"backend": "fake", "image": "fake:seconds=3600", "fizzle_seconds": 0}
NOWORK = {"backend": "fake", "image": "fake:seconds=1;message=300 No more work",
          "fizzle_seconds": 0, "backoff_seconds": 3600}  # fmt: skip


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} missing: install Debian's chromium (scripts/bootstrap)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


# --- the daemon ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Factory:
    top: Path
    config: Path
    url: str
    #: The running LMs when the page was taken (stable: nothing starts or ends meanwhile).
    running: list[LmRecord]
    #: The page as served (what a terminal browser gets).
    html: str


def write_config(top: Path, port: int) -> Path:
    user_data = top / "user_data"
    # The secret both literally and through its option: neither may reach the page.
    user_data.write_text(
        f"#!/bin/sh\n# token {SECRET}\nTOKEN='##user_data_option_secret_token##'\nsleep 3600\n"
    )
    document = {
        "factory": {
            "space": "statuspage.example.org",
            "hostname": HOSTNAME,
            "state_dir": str(top / "state"),
            "total_processors": 2,  # this host has 2 CPUs
            "overload_per_processor": 1000,
            "vacquery_port": 0,
            "disk_method": "none",
            "metrics_listen": f"127.0.0.1:{port}",
            "user_data_options": {"secret_token": SECRET},
        },
        "machinetypes": {
            "long": {
                **LONG,
                "target_share": 1,
                "user_data": str(user_data),
                "user_data_options": {"secret_token": SECRET},
            },
            "nowork": {**NOWORK, "target_share": 1, "user_data": str(user_data)},
        },
    }
    path = top / "lmrunner.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def active(state: Path) -> list[LmRecord]:
    if not (state / "lmrunner.db").exists():
        return []
    store = Store(state, readonly=True)
    try:
        return sorted(store.active(), key=lambda r: r.name)
    finally:
        store.close()


def finished(state: Path, machinetype: str) -> list[LmRecord]:
    if not (state / "lmrunner.db").exists():
        return []
    store = Store(state, readonly=True)
    try:
        return [r for r in store.recent() if r.machinetype == machinetype and not r.active]
    finally:
        store.close()


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_settled(state: Path, log: Path, daemon: subprocess.Popen[bytes]) -> list[LmRecord]:
    """Once nowork has ended and the same LMs have all run for 3 s: those LMs."""
    deadline = time.monotonic() + 60 * TIMESCALE
    seen: list[tuple[str, ...]] = []
    while time.monotonic() < deadline:
        assert daemon.poll() is None, f"the daemon exited:\n{_tail(log)}"
        now = active(state)
        names = tuple(r.name for r in now if r.state is LmState.RUNNING)
        seen.append(names if len(names) == len(now) else ())
        recent = seen[-6:]
        if finished(state, "nowork") and len(recent) == 6 and len(set(recent)) == 1 and names:
            return now
        time.sleep(0.5)
    raise AssertionError(f"the LMs did not settle: {seen[-6:]}\n{_tail(log)}")


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Factory]:
    top = tmp_path_factory.mktemp("statuspage")
    port = free_tcp_port()
    config = write_config(top, port)
    log = top / "daemon.log"
    with contextlib.ExitStack() as stack:
        stack.callback(remove_lms, config)  # last: LMs outlive their daemon by design
        with log.open("ab") as err:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "lmrunner", "daemon", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=REPO,
            )
        stack.callback(stop_process, daemon)
        running = wait_settled(top / "state", log, daemon)
        url = f"http://127.0.0.1:{port}/"
        answer = requests.get(url, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
        yield Factory(top, config, url, running, answer.text)
        assert [r.name for r in active(top / "state")] == [r.name for r in running]
        stop_process(daemon)
        assert "Traceback" not in log.read_text(errors="replace"), _tail(log)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL when it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the browser -----------------------------------------------------------------------------


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def run_chromium(binary: Path, profile: Path, *arguments: str) -> str:
    """Headless Chromium with ``arguments``, in its own process group, which is killed
    afterwards (its helpers must not outlive the test); its stdout."""
    command = [
        str(binary),
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *arguments,
    ]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: its helpers are found and ended
    )
    try:
        out, err = process.communicate(timeout=BROWSER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"chromium {arguments} took more than {BROWSER_TIMEOUT} s") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert process.returncode == 0, f"chromium exited {process.returncode}:\n{err.decode()[-3000:]}"
    return out.decode()


# --- HTML as text, as a terminal browser shows it --------------------------------------------


class TextView(HTMLParser):
    """Text lines of a document: a line per block and per table row (cells joined by " | "),
    no style, script or SVG drawing. Also notes each figure's caption and plot."""

    BLOCKS = frozenset(
        {"p", "h1", "h2", "h3", "div", "table", "figure", "figcaption", "details", "summary",
         "title", "body", "br"}
    )  # fmt: skip
    HIDDEN = frozenset({"style", "script", "svg"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.line: list[str] = []
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.hidden = 0
        self.figures: list[dict[str, int]] = []

    def _flush(self) -> None:
        text = " ".join("".join(self.line).split())
        if text:
            self.lines.append(text)
        self.line = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "figure":
            self.figures.append({"figcaption": 0, "svg": 0})
        elif tag in ("figcaption", "svg") and self.figures:
            self.figures[-1][tag] += 1
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag == "tr":
            self._flush()
            self.row = []
        elif tag in ("td", "th"):
            self.cell = []
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(self.hidden - 1, 0)
        elif tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.lines.append(" | ".join(self.row))
            self.row = None
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self.hidden:
            return
        if self.cell is not None:
            self.cell.append(data)
        else:
            self.line.append(data)

    @classmethod
    def of(cls, document: str) -> TextView:
        view = cls()
        view.feed(document)
        view.close()
        view._flush()
        return view


def cells(line: str) -> list[str]:
    return line.split(" | ")


# --- the tests -------------------------------------------------------------------------------


def test_the_dom_chromium_renders_shows_the_factory_and_no_secret(
    chromium: Path, factory: Factory, tmp_path: Path
) -> None:
    started = time.monotonic()
    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", factory.url)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "statuspage-dom.html").write_text(dom)
    print(f"DOM: {ARTEFACTS / 'statuspage-dom.html'} ({time.monotonic() - started:.1f} s)")
    assert "</html>" in dom, dom[-500:]
    view = TextView.of(dom)
    text = "\n".join(view.lines)
    assert HOSTNAME in text
    for machinetype in ("long", "nowork"):
        assert machinetype in text
    assert factory.running, "no LM runs"
    for record in factory.running:
        assert record.name in text, record.name
    assert "300 No more work" in text
    # Three inline plots, each a figure with its caption.
    assert dom.count("<svg") == 3, dom.count("<svg")
    assert dom.count("<figcaption") == 3
    assert view.figures == [{"figcaption": 1, "svg": 1}] * 3, view.figures
    captions = [line for line in view.lines if "per hour" in line or "Processors in use" in line]
    assert any("LMs started per hour" in c for c in captions), captions
    assert any(c.startswith("Processors in use") and "(of 2;" in c for c in captions), captions
    # Self-contained: no script, nothing fetched from elsewhere.
    for document in (dom, factory.html):
        assert "<script" not in document.lower()
        external = re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", document, re.I)
        assert not external, external
        assert SECRET not in document
    metrics = requests.get(factory.url + "metrics", timeout=10)
    assert metrics.status_code == 200 and SECRET not in metrics.text  # nor in /metrics
    # The secret really was in what the daemon had (so its absence means something).
    assert SECRET in factory.config.read_text()
    assert SECRET in (factory.top / "user_data").read_text()


@pytest.mark.parametrize(("kind", "width", "height"), [("phone", 390, 844), ("desktop", 1280, 900)])
def test_chromium_screenshots_the_page(
    chromium: Path, factory: Factory, tmp_path: Path, kind: str, width: int, height: int
) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTEFACTS / f"statuspage-{kind}-{width}x{height}.png"
    png.unlink(missing_ok=True)
    started = time.monotonic()
    run_chromium(
        chromium,
        tmp_path / "profile",
        f"--screenshot={png}",
        f"--window-size={width},{height}",
        factory.url,
    )
    print(f"screenshot: {png} ({time.monotonic() - started:.1f} s)")
    assert png.exists(), png
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC, data[:16]
    assert data[12:16] == b"IHDR", data[:32]
    assert struct.unpack(">II", data[16:24]) == (width, height)
    assert len(data) > MIN_PNG_BYTES, f"{png}: {len(data)} bytes (blank?)"


def test_the_page_reads_as_text_without_a_browser(factory: Factory) -> None:
    view = TextView.of(factory.html)
    lines = view.lines
    print("\n".join(lines[:40]))
    assert lines[0] == f"lmrunner {HOSTNAME}", lines[:3]  # the title
    assert HOSTNAME in lines
    header = "machinetype | backend | share | LMs | processors | backoff | last outcome"
    assert header in lines, lines
    rows = {cells(line)[0]: cells(line) for line in lines[lines.index(header) + 1 :][:2]}
    assert set(rows) == {"long", "nowork"}, rows
    assert rows["long"][1:4] == ["fake", "1", str(len(factory.running))], rows["long"]
    assert rows["nowork"][1:4] == ["fake", "1", "0"], rows["nowork"]
    assert rows["nowork"][5].startswith("until "), rows["nowork"]  # backing off for an hour
    assert rows["nowork"][6].startswith("300 No more work ("), rows["nowork"]
    running_header = (
        "name | machinetype | backend | state | processors | uptime | CPU | memory | disk"
    )
    assert running_header in lines, lines
    for record in factory.running:
        line = next((line for line in lines if cells(line)[0] == record.name), None)
        assert line is not None, (record.name, lines)
        assert cells(line)[1:4] == [record.machinetype, "fake", "running"], line
    ends_header = "name | machinetype | backend | ended | ran | outcome"
    assert ends_header in lines, lines
    ends = lines[lines.index(ends_header) + 1 :]
    nowork = [cells(line) for line in ends if len(cells(line)) == 6 and cells(line)[1] == "nowork"]
    assert len(nowork) == 1, ends
    assert nowork[0][5] == "300 No more work", nowork
    assert SECRET not in "\n".join(lines)
